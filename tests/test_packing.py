"""Correct before fast: packing rows into one padding-free batch must not change what the model learns."""

import os
import sys

import pytest
from helpers import ROOT, tiny_run_args, tutorial_rows
from transformers import TrainerCallback

import finetune

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench  # noqa: E402


def test_packed_batch_gives_the_loss_and_gradients_of_its_rows(tiny_model):
    """On the CPU default (sdpa), through finetune.py's 4-bit model with LoRA, with trl's padding-free collator."""
    model, tokenizer = bench.lora_model(tiny_model, "sdpa", {"": "cpu"})
    result = bench.packed_vs_rows(model, tokenizer, tutorial_rows()[:3] + tutorial_rows()[40:41])
    assert result["tokens"] > 40
    assert result["loss_rel_diff"] < 1e-5
    assert result["grad_rel_diff"] < 1e-4


def test_padding_a_packed_batch_to_a_fixed_length_changes_nothing(tiny_model):
    """--pad_to_full_length pads the packed batch with tokens at position 0 and no labels: the rows' loss and
    gradients must stay those of the rows run one by one."""
    model, tokenizer = bench.lora_model(tiny_model, "sdpa", {"": "cpu"})
    result = bench.packed_vs_rows(model, tokenizer, tutorial_rows()[:3] + tutorial_rows()[40:41], pad_to=128)
    assert result["padded_length"] == 128 > result["tokens"] + 4
    assert result["loss_rel_diff"] < 1e-5
    assert result["grad_rel_diff"] < 1e-4


def test_the_check_catches_rows_that_see_each_other(tiny_model):
    """The same check on a packed batch whose positions run straight through, so each row attends to the rows before
    it, must fail: otherwise the check above proves nothing."""
    model, tokenizer = bench.lora_model(tiny_model, "sdpa", {"": "cpu"})
    rows = tutorial_rows()[:3] + tutorial_rows()[40:41]
    result = bench.packed_vs_rows(model, tokenizer, rows, restart_positions=False)
    assert result["grad_rel_diff"] > 1e-3


class BatchLengths(TrainerCallback):
    """The length of every batch the model is given while training."""

    def __init__(self):
        self.lengths = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.register_forward_pre_hook(lambda module, a, kw: self.lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)


@pytest.mark.parametrize("pad, expected", [(False, {96}), (True, {120})])
def test_pad_to_full_length_gives_every_packed_batch_one_length(tiny_model, tutorial_data, tmp_path, pad, expected):
    """Packed bins of up to 60 tokens, 2 a step: three 16-token rows fit a bin, so a batch is 96 tokens; padded to its
    full length it is 2 x 60 = 120 at every step, the one shape flex attention then compiles for."""
    lengths = BatchLengths()
    argv = ["--packing", "--per_device_train_batch_size", "2", "--max_length", "60", "--max_steps", "3",
            "--report_to", "none", "--sample_max_new_tokens", "0", "--eval_fraction", "0"]  # fmt: skip
    argv += ["--pad_to_full_length"] if pad else []
    finetune.main(tiny_run_args(tiny_model, tutorial_data, tmp_path) + argv, callbacks=[lengths])
    assert len(lengths.lengths) == 3 and set(lengths.lengths) == expected
