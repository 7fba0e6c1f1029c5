"""The speed settings that fit the GPU: chosen from its free memory, and never over what the user named."""

import pytest
import torch

import finetune

GIB = 2**30


def on_a_gpu_with(monkeypatch, free_gib, bf16=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(free_gib * GIB), int(141 * GIB)))


def test_the_default_on_a_gpu_is_the_recipe_for_its_memory(monkeypatch):
    on_a_gpu_with(monkeypatch, 139)
    settings = finetune.parse_settings_for_this_gpu([])
    assert settings.gpu_recipe == "large"
    assert settings == finetune.parse_settings_for_this_gpu(["--gpu_recipe", "large"])


@pytest.mark.parametrize("argv", [[], ["--gpu_recipe", "auto"]])
def test_the_default_on_the_cpu_keeps_the_settings_as_written(argv):
    settings = finetune.parse_settings_for_this_gpu(argv)
    assert settings.gpu_recipe == "tutorial"
    assert settings == finetune.parse_settings(finetune.Settings, ["--gpu_recipe", "tutorial"])


def test_a_gpu_without_bf16_keeps_the_settings_as_written(monkeypatch):
    """The recipes were measured in bf16 with flex attention and Liger's kernels: a T4 or V100 keeps the tutorial's."""
    on_a_gpu_with(monkeypatch, 15, bf16=False)
    settings = finetune.parse_settings_for_this_gpu([])
    assert settings.gpu_recipe == "tutorial"
    assert settings == finetune.parse_settings(finetune.Settings, ["--gpu_recipe", "tutorial"])


def test_fsdp_keeps_the_settings_as_written(monkeypatch):
    """The recipes' memory was measured with the whole model on one GPU; under FSDP each GPU holds a shard."""
    on_a_gpu_with(monkeypatch, 139)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with configs/fsdp_qlora.yaml sets
    assert finetune.parse_settings_for_this_gpu([]).gpu_recipe == "tutorial"


@pytest.mark.parametrize(
    "free_gib, recipe, batch, checkpointing, every_n, offload",
    [
        (139, "large", 8, False, 1, False),
        (23, "24gb", 6, True, 2, False),
        (11.5, "12gb", 8, True, 1, False),
        (7.5, "8gb", 6, True, 1, True),
    ],
)
def test_free_memory_picks_the_recipe(monkeypatch, free_gib, recipe, batch, checkpointing, every_n, offload):
    on_a_gpu_with(monkeypatch, free_gib)
    settings = finetune.parse_settings_for_this_gpu([])
    assert settings.gpu_recipe == recipe
    assert (settings.per_device_train_batch_size, settings.gradient_checkpointing) == (batch, checkpointing)
    assert (settings.checkpoint_every_n_layers, settings.activation_offloading) == (every_n, offload)
    assert settings.packing and settings.padding_free and settings.use_liger_kernel and settings.pad_to_full_length
    assert (settings.attn_implementation, settings.lora_target_modules, settings.lora_dropout) == (
        "flex_attention", "all-linear", 0
    )  # fmt: skip
    assert settings.learning_rate == 2e-3  # fewer, larger updates (bench/RESULTS.md)
    # the user's named settings stay
    assert (settings.lora_r, settings.lora_alpha, settings.optim, settings.bnb_4bit_quant_type) == (
        64, 16, "paged_adamw_32bit", "nf4"
    )  # fmt: skip
    assert settings.lr_scheduler_type == "cosine" and settings.use_4bit


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
