"""The speed settings that fit the GPU: the fastest memory mode predicted to fit this model, never over a setting the
user chose, and a smaller batch after an out-of-memory error."""

import importlib.util
import json
import os

import pytest
import torch
from transformers import LlamaConfig, TrainerCallback

import common
import finetune
import recipes
from helpers import ROOT, tiny_run_args

GIB = 2**30
MEASURED = json.load(open(os.path.join(ROOT, "bench", "results", "memory.json")))["cells"]
# bench/memory.py's shapes, as their configs
SHAPES = {cell["shape"]: cell["config"] for cell in MEASURED}


def on_a_gpu_with(monkeypatch, free_gib, bf16=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(recipes, "free_gpu_gib", lambda: free_gib)
    monkeypatch.setattr(recipes, "is_liger_kernel_available", lambda: True)  # requirements-gpu.txt installed it


def pick(argv, shape="7b", module=finetune):
    settings = module.parse_settings(module.Settings, argv)
    return recipes.pick(settings, recipes.settings_you_chose(module.Settings, argv), LlamaConfig(**SHAPES[shape]))


@pytest.mark.parametrize("argv", [[], ["--gpu_recipe", "auto"]])
def test_the_default_on_the_cpu_keeps_the_settings_as_written(argv):
    settings, choice = pick(argv)
    assert choice.name == "tutorial" and not choice.changes
    assert settings == finetune.parse_settings(finetune.Settings, ["--gpu_recipe", "tutorial"])


def test_a_gpu_without_bf16_keeps_the_settings_as_written(monkeypatch):
    """The recipes were measured in bf16 with flex attention and Liger's kernels: a T4 or V100 keeps the tutorial's."""
    on_a_gpu_with(monkeypatch, 15, bf16=False)
    settings, choice = pick([])
    assert choice.name == "tutorial" and settings == finetune.parse_settings(finetune.Settings, ["--gpu_recipe", "tutorial"])


def test_a_gpu_without_liger_installed_keeps_the_settings_as_written_and_says_why(monkeypatch, capsys):
    """Liger comes with requirements-gpu.txt only: every recipe turns it on, so without it none is picked."""
    on_a_gpu_with(monkeypatch, 139)
    monkeypatch.setattr(recipes, "is_liger_kernel_available", lambda: False)
    settings, choice = pick([])
    assert choice.name == "tutorial" and not settings.use_liger_kernel
    assert capsys.readouterr().out.splitlines() == [
        "gpu_recipe: the speed settings need liger-kernel, which is not installed (pip install -r requirements-gpu.txt): "
        "the settings stay as written"
    ]


@pytest.mark.parametrize("argv, words", [
    (["--gpu_recipe", "no_checkpointing"], "--gpu_recipe no_checkpointing turns on Liger's kernels"),
    (["--use_liger_kernel"], "--use_liger_kernel needs liger-kernel"),
])  # fmt: skip
def test_a_setting_that_needs_liger_without_it_installed_is_one_line(monkeypatch, argv, words):
    on_a_gpu_with(monkeypatch, 139)
    monkeypatch.setattr(recipes, "is_liger_kernel_available", lambda: False)
    with pytest.raises(common.UserError, match=words) as refused:
        pick(argv)
    assert "pip install -r requirements-gpu.txt" in str(refused.value)


def test_fsdp_keeps_the_settings_as_written(monkeypatch):
    """The memory was measured with the whole model on one GPU; under FSDP each GPU holds a shard."""
    on_a_gpu_with(monkeypatch, 139)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with configs/fsdp_qlora.yaml sets
    assert pick([])[1].name == "tutorial"


def test_the_prediction_is_within_the_margin_of_every_measured_peak():
    """bench/memory.py measured three shapes (1B, 7B, 13B) in every memory mode at 8,192 to 32,768 tokens a step:
    the predicted peak reserved memory is within 10% of each."""
    assert len({cell["shape"] for cell in MEASURED}) == 3 and len(MEASURED) >= 27
    for cell in MEASURED:
        settings = finetune.parse_settings(finetune.Settings, [
            "--per_device_train_batch_size", str(cell["batch"]), "--max_length", str(cell["max_length"]),
            *{"no_checkpointing": ["--no_gradient_checkpointing"], "checkpoint_every_2": ["--checkpoint_every_n_layers", "2"],
              "checkpoint_every_layer": [], "offload": ["--activation_offloading"]}[cell["mode"]],
        ])  # fmt: skip
        shape = recipes.model_shape(LlamaConfig(**cell["config"]), 64, "all-linear")
        predicted = recipes.predicted_peak_gib(shape, settings)
        assert abs(predicted / cell["peak_reserved_gib"] - 1) <= recipes.MARGIN_FRACTION, (cell, predicted)


def fastest_that_fitted(shape, card_gib):
    """From the measurements alone: the fastest mode whose measured peak reserved memory at 8,192 tokens a step,
    with the recipe's margin, fits the card."""
    for mode in recipes.MEMORY_MODES:
        cell = next(c for c in MEASURED if (c["shape"], c["mode"], c["batch"], c["max_length"]) == (shape, mode, 8, 1024))
        if cell["peak_reserved_gib"] * (1 + recipes.MARGIN_FRACTION) + recipes.MARGIN_GIB <= card_gib:
            return mode
    return "tutorial"


@pytest.mark.parametrize("card_gb", [24, 40, 48, 80])
@pytest.mark.parametrize("shape, max_length", [("7b", 1024), ("7b", 4096), ("13b", 1024), ("13b", 4096), ("1b", 4096)])
def test_each_simulated_card_gets_the_fastest_mode_that_fitted_there(monkeypatch, card_gb, shape, max_length):
    """The cells bench/memory.py ran on the H200 capped to each card's memory (bench/RESULTS.md): chosen from the
    config alone, the pick is the fastest mode that was measured to fit, with the batch that keeps a step at 8,192
    tokens."""
    card_gib = card_gb * 1e9 / GIB
    on_a_gpu_with(monkeypatch, card_gib)
    settings, choice = pick(["--max_length", str(max_length)], shape)
    assert choice.name == fastest_that_fitted(shape, card_gib)
    assert choice.needed_gib <= card_gib
    assert settings.per_device_train_batch_size * max_length == recipes.TOKENS_PER_STEP  # 8 x 1,024 or 2 x 4,096
    assert settings.gpu_recipe == choice.name


def test_the_recipe_keeps_the_tutorials_named_settings(monkeypatch):
    on_a_gpu_with(monkeypatch, 139)
    settings, choice = pick([])
    assert choice.name == "no_checkpointing" and settings.packing and settings.use_liger_kernel
    assert (settings.lora_r, settings.lora_alpha, settings.optim, settings.bnb_4bit_quant_type) == (
        64, 16, "paged_adamw_32bit", "nf4"
    )  # fmt: skip
    assert settings.lr_scheduler_type == "cosine" and settings.use_4bit and settings.learning_rate == 2e-3


def test_the_command_line_wins_even_with_the_tutorials_value(monkeypatch):
    on_a_gpu_with(monkeypatch, 139)
    settings, choice = pick(["--lora_dropout", "0.1", "--per_device_train_batch_size=2", "--gradient_checkpointing", "true"])
    assert (settings.lora_dropout, settings.per_device_train_batch_size) == (0.1, 2)
    assert settings.gradient_checkpointing and choice.name == "checkpoint_every_2"  # the fastest mode that keeps it on
    assert not {"lora_dropout", "per_device_train_batch_size", "gradient_checkpointing"} & set(choice.changes)
    assert settings.packing and settings.learning_rate == 2e-3  # the settings left at the tutorial's value follow it


def edited_finetune(tmp_path, edits):
    """finetune.py with its constants edited, as a user edits them at the top of the file, imported as a module."""
    source = open(os.path.join(ROOT, "finetune.py")).read()
    for old, new in edits:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    path = tmp_path / "finetune_edited.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("finetune_edited", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_constant_edited_in_the_file_is_left_alone(monkeypatch, tmp_path):
    module = edited_finetune(tmp_path, [
        ('learning_rate: float = setting(2e-4,', 'learning_rate: float = setting(5e-5,'),
        ('lora_dropout: float = setting(0.1,', 'lora_dropout: float = setting(0.05,'),
    ])  # fmt: skip
    on_a_gpu_with(monkeypatch, 139)
    settings, choice = pick([], module=module)
    assert (settings.learning_rate, settings.lora_dropout) == (5e-5, 0.05)
    assert "learning_rate" not in choice.changes and "lora_dropout" not in choice.changes
    assert settings.packing and choice.changes["packing"] is True  # what still held the tutorial's value changed
    # The unedited file: the recipe sets both
    settings, choice = pick([])
    assert (settings.learning_rate, settings.lora_dropout) == (2e-3, 0.0)


def test_one_table_shows_each_changed_setting_with_the_files_value_and_the_recipes(monkeypatch):
    on_a_gpu_with(monkeypatch, 139)
    _, choice = pick(["--lora_dropout", "0.2"])
    lines = recipes.describe(choice, {k: finetune.Settings.__dataclass_fields__[k].default for k in choice.changes})
    lines = lines.splitlines()
    assert lines[0].startswith("gpu_recipe: no_checkpointing, predicted to need")
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows["learning_rate"] == ["0.0002", "0.002"] and rows["packing"] == ["False", "True"]
    assert rows["per_device_train_batch_size"] == ["1", "8"] and rows["gradient_checkpointing"] == ["True", "False"]
    assert "lora_dropout" not in rows and len(rows) == len(choice.changes)


def test_a_model_that_fits_no_mode_stops_before_it_loads(monkeypatch, tmp_path, capsys):
    """A 13B-shaped model on a 6 GB card: one line with what to change. The folder has a config and no weights, so
    the run cannot have got as far as loading them."""
    LlamaConfig(**SHAPES["13b"]).save_pretrained(tmp_path)
    on_a_gpu_with(monkeypatch, 6e9 / GIB)
    with pytest.raises(common.UserError, match=r"needs about .* GiB of GPU memory even with .*lower --max_length"):
        finetune.main(["--model_name", str(tmp_path)])


def test_a_small_card_offloads_at_a_smaller_batch_then_keeps_the_tutorials_settings(monkeypatch):
    """The 7B shape on a card too small for a full packed step (the old `8gb` recipe's case): offloaded checkpointing
    at half the batch. On a card too small for any packed step but big enough for batch 1 unpacked with LoRA on q,v
    only: the settings as written."""
    on_a_gpu_with(monkeypatch, 6.5)
    settings, choice = pick([])
    assert choice.name == "offload" and settings.per_device_train_batch_size == 4 and choice.needed_gib <= 6.5
    shape = recipes.model_shape(LlamaConfig(**SHAPES["7b"]), 64, "")
    tutorial = recipes.needed_gib(shape, finetune.parse_settings(finetune.Settings, []))
    on_a_gpu_with(monkeypatch, tutorial + 0.05)
    settings, choice = pick([])
    assert choice.name == "tutorial" and not choice.changes and not settings.packing


def test_a_memory_mode_named_without_a_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(recipes, "is_liger_kernel_available", lambda: True)  # so the GPU is what is missing
    with pytest.raises(common.UserError, match="--gpu_recipe offload is a GPU memory mode and no CUDA GPU was found"):
        pick(["--gpu_recipe", "offload"])


def test_a_model_whose_sizes_the_memory_model_cannot_read_keeps_the_settings_as_written(monkeypatch, capsys):
    """GPT-2's config names no intermediate size: one line, and the tutorial's settings, not a traceback."""
    from transformers import GPT2Config

    on_a_gpu_with(monkeypatch, 139)
    settings = finetune.parse_settings(finetune.Settings, [])
    settings, choice = recipes.pick(settings, set(), GPT2Config(n_layer=2, n_embd=64, n_head=2))
    assert choice.name == "tutorial" and not settings.packing
    assert "the memory model cannot read this model's sizes" in capsys.readouterr().out


class OutOfMemoryAbove(TrainerCallback):
    """Stands in for a GPU that holds `batch` rows a step: a larger step raises the error CUDA raises."""

    def __init__(self, batch):
        self.batch = batch

    def on_step_begin(self, args, state, control, **kwargs):
        if state.train_batch_size > self.batch:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_starts_again_at_a_smaller_batch(tiny_model, tutorial_data, tmp_path, capsys):
    argv = tiny_run_args(tiny_model, tutorial_data, tmp_path, "--packing", "--padding_free", "--pad_to_full_length",
                         "--per_device_train_batch_size", "4", "--max_length", "64", "--sample_max_new_tokens", "0")  # fmt: skip
    trainer = finetune.main(argv, callbacks=[OutOfMemoryAbove(2)])
    err = capsys.readouterr().err
    assert "out of GPU memory at batch 4: training at batch 3 instead" in err
    assert "out of GPU memory at batch 3: training at batch 2 instead" in err
    assert trainer.state.train_batch_size == 2 and trainer.state.global_step == 6
    assert trainer.data_collator.pad_to_multiple_of == 2 * 64  # padded to the smaller batch's full length
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")


def test_out_of_memory_at_a_batch_of_1_is_one_line(tiny_model, tutorial_data, tmp_path):
    argv = tiny_run_args(tiny_model, tutorial_data, tmp_path, "--per_device_train_batch_size", "2")
    with pytest.raises(common.UserError, match="out of GPU memory even at a batch of 1: lower --max_length"):
        finetune.main(argv, callbacks=[OutOfMemoryAbove(0)])
