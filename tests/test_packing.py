"""Correct before fast: packing rows into one padding-free batch must not change what the model learns."""

import os
import sys

from conftest import ROOT, tutorial_rows

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench  # noqa: E402


def test_packed_batch_gives_the_loss_and_gradients_of_its_rows(tiny_model):
    """On the CPU default (sdpa), through finetune.py's 4-bit model with LoRA, with trl's padding-free collator."""
    model, tokenizer = bench.lora_model(tiny_model, "sdpa", {"": "cpu"})
    result = bench.packed_vs_rows(model, tokenizer, tutorial_rows()[:3] + tutorial_rows()[40:41])
    assert result["tokens"] > 40
    assert result["loss_rel_diff"] < 1e-5
    assert result["grad_rel_diff"] < 1e-4


def test_the_check_catches_rows_that_see_each_other(tiny_model):
    """The same check on a packed batch whose positions run straight through, so each row attends to the rows before
    it, must fail: otherwise the check above proves nothing."""
    model, tokenizer = bench.lora_model(tiny_model, "sdpa", {"": "cpu"})
    rows = tutorial_rows()[:3] + tutorial_rows()[40:41]
    result = bench.packed_vs_rows(model, tokenizer, rows, restart_positions=False)
    assert result["grad_rel_diff"] > 1e-3
