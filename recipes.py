"""finetune.py's step 8: the speed settings that fit this GPU, this model and this row length.

On a GPU with bf16, `--gpu_recipe auto` trains with the kernels measured fastest on the H200 (bench/RESULTS.md):
rows packed into steps of about 8,192 tokens with flex attention keeping them apart, Liger's kernels, LoRA on all
linear layers without dropout, and a learning rate for the fewer, larger steps. How much of the backward pass to
recompute (the memory mode) is chosen by predicting each mode's peak GPU memory from the base model's config and
taking the fastest whose prediction fits the free memory with a margin (bench/memory.py measured and fitted it).

A recipe only changes a setting that still holds the tutorial's value: one you edited at the top of finetune.py or
named on the command line stays yours.
"""

import dataclasses
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import AutoModelForCausalLM, TrainerCallback
from transformers.utils import is_liger_kernel_available

from common import UserError, named_on_command_line, under_fsdp

# The tutorial's value of every setting a recipe may change: a setting the user left at it is the recipe's to set
TUTORIAL = {
    "packing": False,
    "padding_free": False,
    "attn_implementation": "sdpa",
    "use_liger_kernel": False,
    "lora_target_modules": "",
    "lora_dropout": 0.1,
    "per_device_train_batch_size": 1,
    "pad_to_full_length": False,
    "learning_rate": 2e-4,
    "gradient_checkpointing": True,
    "checkpoint_every_n_layers": 1,
    "activation_offloading": False,
}
# Every memory mode shares these. A step then holds about 24 of the tutorial's rows instead of 1, so an epoch makes
# 24 times fewer updates: at 10x the tutorial's learning rate it ended lower than the tutorial's on the same rows
# (bench/learning.py).
KERNELS = {
    "packing": True,
    "padding_free": True,
    "attn_implementation": "flex_attention",
    "use_liger_kernel": True,
    "lora_target_modules": "all-linear",
    "lora_dropout": 0.0,
    "pad_to_full_length": True,
    "learning_rate": 2e-3,
}
# Fastest first. The Llama-2-7B shape on an H200 at 8,192 tokens a step (bench/RESULTS.md): real tokens/s, peak GiB
CHECKPOINTING = {"gradient_checkpointing": True, "checkpoint_every_n_layers": 1, "activation_offloading": False}
MEMORY_MODES = {
    "no_checkpointing": {"gradient_checkpointing": False},  # 14,515 tokens/s, 37.1 GiB
    "checkpoint_every_2": {**CHECKPOINTING, "checkpoint_every_n_layers": 2},  # 11,757, 22.0
    "checkpoint_every_layer": CHECKPOINTING,  # 10,480, 7.6
    "offload": {**CHECKPOINTING, "activation_offloading": True},  # 8,767, 6.0
}
# A packed step holds BATCH rows of max_length, and at most TOKENS_PER_STEP tokens: 8 rows of 1,024 (as measured),
# 4 of 2,048, 2 of 4,096, so memory and the updates an epoch makes stay where they were measured at longer rows
BATCH = 8
TOKENS_PER_STEP = 8192
NAMES = ["auto", "tutorial", *MEMORY_MODES]

# The memory model, fitted by bench/memory.py on the H200 (bench/results/memory_fit.json): the peak memory PyTorch
# reserves from the GPU (allocated, and the allocator's blocks around it) =
# the weights + LoRA's weights and gradients + tokens a step x (the activations each layer keeps + the rest).
# A layer's activations are FULL_LAYER x (6 hidden + 2 key/value + 3 intermediate) bf16 values a token when it is
# not checkpointed, CHECKPOINT x its hidden input when it is; one checkpointed layer is rebuilt at a time.
FIT = {"full_layer": 1.018, "checkpoint": 1.18, "recompute": 0.5457, "per_token_hidden": 41.41, "per_token_vocab": -0.05151, "constant_gib": 0.01169}
# Room left beside the prediction: more than the fit's largest error on the measured cells (8.9%), and half a GiB
# for what PyTorch does not count (the kernels' workspaces)
MARGIN_FRACTION = 0.10
MARGIN_GIB = 0.5
NF4_BYTES = 0.5 + 4 / 64  # 4 bits a weight and one fp32 scale per block of 64 (no double quantization)
GIB = 2**30


@dataclass
class ModelShape:
    """What the memory model reads from a base model's config, counted on the meta device (nothing is loaded)."""

    layers: int
    hidden: int
    key_value: int  # the width of k_proj and v_proj's outputs
    intermediate: int
    vocab: int
    quantized: int  # weights of the linear layers bitsandbytes stores in 4 bits
    unquantized: int  # embeddings, norms, lm_head: kept in the compute dtype
    lora: int  # LoRA weights for the settings' rank and target layers


def layer_counts(config):
    """The model's parameter count and its linear layers but lm_head, as (name, inputs, outputs): counted on the meta
    device, so nothing is downloaded or allocated."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings().weight
    linears = [(name.rsplit(".", 1)[-1], m.in_features, m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m.weight is not head]  # fmt: skip
    return sum(p.numel() for p in model.parameters()), linears


def model_shape(config, lora_r, lora_target_modules, counts=None):
    total, linears = counts or layer_counts(config)
    targets = lora_targets(config, lora_target_modules)
    quantized = sum(inputs * outputs for _, inputs, outputs in linears)
    lora = sum(lora_r * (inputs + outputs) for name, inputs, outputs in linears
               if targets == "all-linear" or name in targets)  # fmt: skip
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    key_value_heads = getattr(text, "num_key_value_heads", None) or heads
    return ModelShape(
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        key_value=key_value_heads * head_dim,
        intermediate=text.intermediate_size,
        vocab=text.vocab_size,
        quantized=quantized,
        unquantized=total - quantized,
        lora=lora,
    )


def lora_targets(config, names):
    """The layer names peft gives LoRA to, as finetune.py's LoraConfig asks: 'all-linear', a list, or its default."""
    if names == "all-linear":
        return names
    if names:
        return [name.strip() for name in names.split(",")]
    return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(config.model_type, ["q_proj", "v_proj"])


def tokens_per_step(settings):
    """The most tokens one forward pass holds: a packed step's rows end to end, or the batch of rows padded."""
    return settings.per_device_train_batch_size * settings.max_length


def memory_terms(shape, settings):
    """The memory model's terms in GiB, each before its fitted factor: the bytes a term stands for, counted."""
    full_layer = 2 * (6 * shape.hidden + 2 * shape.key_value + 3 * shape.intermediate)
    if not settings.gradient_checkpointing:
        kept, checkpointed = shape.layers, 0
    elif settings.activation_offloading:  # the checkpointed inputs wait in CPU memory
        kept, checkpointed = 0, 0
    else:
        checkpointed = math.ceil(shape.layers / settings.checkpoint_every_n_layers)
        kept = shape.layers - checkpointed
    tokens = tokens_per_step(settings)
    return {
        "full_layer": tokens * kept * full_layer / GIB,
        "checkpoint": tokens * checkpointed * 2 * shape.hidden / GIB,
        "recompute": tokens * full_layer / GIB if settings.gradient_checkpointing else 0.0,
        "per_token_hidden": tokens * shape.hidden / GIB,
        "per_token_vocab": tokens * shape.vocab / GIB,  # the loss's logits, which Liger computes a chunk at a time
        "constant_gib": 1.0,
    }


def weights_gib(shape):
    """The 4-bit weights, the unquantized ones in bf16, and LoRA's bf16 weights and their gradients."""
    return (shape.quantized * NF4_BYTES + shape.unquantized * 2 + shape.lora * 4) / GIB


def predicted_peak_gib(shape, settings):
    """Peak GPU memory PyTorch reserves while training with these settings. The paged optimizer's states are
    outside it: they sit in CUDA unified memory, which the driver moves to CPU memory when the GPU is full."""
    terms = memory_terms(shape, settings)
    return weights_gib(shape) + sum(FIT[key] * value for key, value in terms.items())


def needed_gib(shape, settings):
    return predicted_peak_gib(shape, settings) * (1 + MARGIN_FRACTION) + MARGIN_GIB


def free_gpu_gib():
    """What this process may still allocate: the GPU's free memory, within the process's cap where one is set
    (torch.cuda.set_per_process_memory_fraction, how bench/memory.py stands in for smaller cards)."""
    free, total = torch.cuda.mem_get_info()
    cap = torch.cuda.get_per_process_memory_fraction() * total - torch.cuda.memory_reserved()
    return min(free, cap) / GIB


def runs_the_recipes():
    """Liger and flex attention are GPU kernels, and the recipes were measured in bf16 on a GPU that has it: the CPU
    and GPUs without bf16 (compute capability below 8: T4, V100) keep the settings as written. So does FSDP: the
    memory was measured with the whole model on one GPU, and FSDP never trained here. Liger comes with
    requirements-gpu.txt only (on the CPU it would pull in triton for nothing): a GPU without it keeps them too."""
    if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not under_fsdp()):
        return False
    if not is_liger_kernel_available():
        print("gpu_recipe: the speed settings need liger-kernel, which is not installed (pip install -r "
              "requirements-gpu.txt): the settings stay as written")
        return False
    return True


@dataclass
class Choice:
    name: str  # the recipe as picked: tutorial, or a memory mode
    changes: dict  # setting -> the recipe's value, only those it changed
    needed_gib: float | None = None
    free_gib: float | None = None


def recipe_batch(max_length):
    return max(1, min(BATCH, TOKENS_PER_STEP // max_length))


def mode_settings(name, batch):
    """What the memory mode `name` sets, at this batch, with the kernels every mode shares."""
    return {**KERNELS, "per_device_train_batch_size": batch, **MEMORY_MODES[name]}


def candidates(settings, chosen):
    """(name, the settings it sets), fastest first: each memory mode that keeps the checkpointing settings the user
    chose, then offloading at smaller batches (a card too small for a full step: the old `8gb` recipe ran batch 6),
    then the tutorial's settings as written."""
    batch = recipe_batch(settings.max_length)
    out = [(name, mode_settings(name, batch))
           for name, mode in MEMORY_MODES.items() if not against(mode, settings, chosen)]  # fmt: skip
    if not against(MEMORY_MODES["offload"], settings, chosen):
        while batch > 1:
            batch //= 2
            out.append(("offload", mode_settings("offload", batch)))
    return out + [("tutorial", {})]


def applied(settings, values, chosen):
    """The settings with the recipe's values, except where the user chose a value; and the changes that made."""
    changes = {k: v for k, v in values.items() if k not in chosen and getattr(settings, k) != v}
    return dataclasses.replace(settings, **changes), changes


def against(values, settings, chosen):
    """True when a setting the user chose holds another value than these."""
    return any(key in chosen and getattr(settings, key) != value for key, value in values.items())


def check_liger_is_installed(settings):
    """Liger comes with requirements-gpu.txt only: a setting that needs it stops here, before the model loads, rather
    than at transformers' ImportError when training starts."""
    if is_liger_kernel_available():
        return
    install = "pip install -r requirements-gpu.txt (Liger's kernels run on a CUDA GPU only)"
    if settings.gpu_recipe in MEMORY_MODES:
        raise UserError(f"--gpu_recipe {settings.gpu_recipe} turns on Liger's kernels, and liger-kernel is not "
                        f"installed: {install}, or --gpu_recipe auto")  # fmt: skip
    if settings.use_liger_kernel:
        raise UserError(f"--use_liger_kernel needs liger-kernel, which is not installed: {install}")


def settings_you_chose(settings_class, argv):
    """The settings named on the command line, and those edited at the top of finetune.py away from the tutorial's
    value: a recipe leaves these alone."""
    defaults = {field.name: field.default for field in dataclasses.fields(settings_class)}
    edited = {name for name, value in TUTORIAL.items() if defaults[name] != value}
    return named_on_command_line(settings_class, argv) | edited


def full_length(settings):
    """A batch's length in tokens at its fullest: a packed or padding-free batch is one row of all its rows"""
    flat = settings.packing or settings.padding_free
    return settings.max_length * (settings.per_device_train_batch_size if flat else 1)


def pick(settings, chosen, config):
    """The recipe for these settings on this machine: (settings with the recipe applied, Choice)."""
    check_liger_is_installed(settings)
    if settings.gpu_recipe == "tutorial" or (settings.gpu_recipe == "auto" and not runs_the_recipes()):
        return dataclasses.replace(settings, gpu_recipe="tutorial"), Choice("tutorial", {})
    if not torch.cuda.is_available():  # a memory mode named: its kernels (flex attention, Liger) run on a GPU
        raise UserError(
            f"--gpu_recipe {settings.gpu_recipe} is a GPU memory mode and no CUDA GPU was found: use --gpu_recipe auto "
            "or tutorial"
        )
    try:
        counts = layer_counts(config)
        model_shape(config, settings.lora_r, settings.lora_target_modules, counts)
    except AttributeError as error:  # a config without the sizes the memory model reads (hidden_size, ...)
        print(f"gpu_recipe: tutorial, the settings as written: the memory model cannot read this model's sizes "
              f"({error})")  # fmt: skip
        return dataclasses.replace(settings, gpu_recipe="tutorial"), Choice("tutorial", {})
    free = free_gpu_gib()
    if settings.gpu_recipe == "auto":
        options = candidates(settings, chosen)
    else:
        options = [(settings.gpu_recipe, mode_settings(settings.gpu_recipe, recipe_batch(settings.max_length)))]
    tried = []
    for name, values in options:
        candidate, changes = applied(settings, values, chosen)
        need = needed_gib(model_shape(config, candidate.lora_r, candidate.lora_target_modules, counts), candidate)
        tried.append((name, need))
        if need <= free or settings.gpu_recipe != "auto":
            return dataclasses.replace(candidate, gpu_recipe=name), Choice(name, changes, need, free)
    smallest = min(tried, key=lambda t: t[1])
    raise UserError(
        f"'{settings.model_name}' at --max_length {settings.max_length} needs about {smallest[1]:.1f} GiB of GPU memory "
        f"even with {smallest[0]} (predicted), and this GPU has {free:.1f} GiB free: lower --max_length, "
        "or use a smaller --model_name"
    )


def describe(choice, file_values):
    """One line for the recipe, then a table of each setting it changed: this file's value, the recipe's."""
    if not choice.changes:
        return f"gpu_recipe: {choice.name} (the settings as written)"
    lines = [
        f"gpu_recipe: {choice.name}, predicted to need {choice.needed_gib:.1f} GiB of the GPU's "
        f"{choice.free_gib:.1f} GiB free; these settings changed (--gpu_recipe tutorial for none, or name one to keep "
        "yours):",
        f"  {'setting':<30} {'this file':<16} recipe",
    ]
    lines += [f"  {key:<30} {str(file_values[key]):<16} {value}" for key, value in choice.changes.items()]
    return "\n".join(lines)


class SmallerBatchAfterOutOfMemory(TrainerCallback):
    """transformers' auto_find_batch_size starts training again at a smaller batch after an out-of-memory error (it
    retries with 0.9 of the batch until one fits). This says so in one line and pads packed batches to the new
    batch's full length: padded to the old one, every step would still need the old batch's memory."""

    def __init__(self, collator, settings):
        self.collator, self.settings = collator, settings
        self.batch = settings.per_device_train_batch_size

    def on_train_begin(self, args, state, control, **kwargs):
        if state.train_batch_size == self.batch:
            return
        print(
            f"out of GPU memory at batch {self.batch}: training at batch {state.train_batch_size} instead "
            f"(--per_device_train_batch_size {state.train_batch_size} starts there)",
            file=sys.stderr,
        )
        self.batch = state.train_batch_size
        if self.settings.pad_to_full_length:
            smaller = dataclasses.replace(self.settings, per_device_train_batch_size=self.batch)
            self.collator.pad_to_multiple_of = full_length(smaller)


@contextmanager
def no_batch_fits_is_one_line():
    """The retry's end, when not even a batch of 1 fits: one line with what to change, not a traceback."""
    try:
        yield
    except RuntimeError as error:
        if "No executable batch size found" not in str(error):
            raise
        raise UserError(
            "out of GPU memory even at a batch of 1: lower --max_length, pass --activation_offloading, or use a "
            "smaller --model_name"
        ) from None
