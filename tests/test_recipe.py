"""The speed settings that fit the GPU: chosen from its free memory, and never over what the user named."""

import pytest
import torch

import finetune

GIB = 2**30


def on_a_gpu_with(monkeypatch, free_gib):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(free_gib * GIB), int(141 * GIB)))


def test_the_default_keeps_the_settings_as_written(monkeypatch):
    on_a_gpu_with(monkeypatch, 139)
    settings = finetune.parse_settings_for_this_gpu([])
    assert settings.gpu_recipe == "tutorial"
    assert settings == finetune.parse_settings(finetune.Settings, ["--gpu_recipe", "tutorial"])


def test_auto_on_the_cpu_keeps_the_settings_as_written():
    settings = finetune.parse_settings_for_this_gpu(["--gpu_recipe", "auto"])
    assert settings.gpu_recipe == "tutorial"
    assert settings == finetune.parse_settings(finetune.Settings, ["--gpu_recipe", "tutorial"])


@pytest.mark.parametrize(
    "free_gib, recipe, batch, checkpointing", [(139, "large", 8, False), (22, "24gb", 8, True), (7.5, "8gb", 2, True)]
)
def test_free_memory_picks_the_recipe(monkeypatch, free_gib, recipe, batch, checkpointing):
    on_a_gpu_with(monkeypatch, free_gib)
    settings = finetune.parse_settings_for_this_gpu(["--gpu_recipe", "auto"])
    assert settings.gpu_recipe == recipe
    assert (settings.per_device_train_batch_size, settings.gradient_checkpointing) == (batch, checkpointing)
    assert settings.packing and settings.padding_free and settings.use_liger_kernel
    assert (settings.attn_implementation, settings.lora_target_modules, settings.lora_dropout) == (
        "flex_attention", "all-linear", 0
    )  # fmt: skip
    # the user's named settings stay
    assert (settings.lora_r, settings.lora_alpha, settings.optim, settings.bnb_4bit_quant_type) == (
        64, 16, "paged_adamw_32bit", "nf4"
    )  # fmt: skip


def test_the_command_line_wins_over_the_recipe(monkeypatch):
    on_a_gpu_with(monkeypatch, 139)
    argv = ["--gpu_recipe", "auto", "--per_device_train_batch_size", "4", "--lora_dropout", "0.1"]
    settings = finetune.parse_settings_for_this_gpu(argv)
    assert settings.gpu_recipe == "large" and settings.packing
    assert settings.per_device_train_batch_size == 4 and settings.lora_dropout == 0.1


def test_tutorial_recipe_on_a_gpu_changes_nothing(monkeypatch):
    on_a_gpu_with(monkeypatch, 139)
    settings = finetune.parse_settings_for_this_gpu(["--gpu_recipe", "tutorial"])
    assert not settings.packing and settings.per_device_train_batch_size == 1 and settings.lora_dropout == 0.1
