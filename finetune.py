"""Fine-tune a chat LLM with QLoRA: a 4-bit NF4 base model plus a LoRA adapter, trained on your data set.

Steps 1-10 of the tutorial, top to bottom. Every setting below can be edited here or overridden on the command line:

    python finetune.py                                      # Llama-2-7b-chat on guanaco-llama2-1k, fast settings for this GPU
    python finetune.py --gpu_recipe tutorial                # the tutorial's settings exactly (about 10 minutes on an H200)
    python finetune.py --dataset_name my_rows.jsonl         # your own rows: .jsonl/.json/.csv/.tsv/.parquet or a folder
    python finetune.py --dataset_name my_rows.jsonl --check_data   # check them first: no model weights are loaded
    python finetune.py --max_steps 20 --model_name ./my-model
    python finetune.py --help                               # every setting with its default
    accelerate launch --multi_gpu --num_processes 2 finetune.py   # on 2 GPUs, data-parallel (FSDP: see README)

The adapter and tokenizer land in --new_model; `python merge_and_push.py` then merges and publishes them.
After a crash or Ctrl-C, rerun the same command: it resumes from the newest checkpoint in --output_dir.
"""

# Step 1. Imports
import dataclasses
import difflib
import hashlib
import json
import math
import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version


import startup

startup.before_the_imports(as_script=__name__ == "__main__")  # Ctrl-C while loading, and the libraries' noise

# Before torch starts CUDA: the allocator grows its memory segments in place instead of reserving new blocks for each
# new size, so little more is reserved than is in use (bench/RESULTS.md). A setting of the user's own is kept.
if "PYTORCH_ALLOC_CONF" not in os.environ:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import bitsandbytes as bnb
import torch
from accelerate import PartialState
from bitsandbytes.optim.optimizer import Optimizer8bit
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback, TrainerState
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import SchedulerType, sort_checkpoints
from transformers.training_args import OptimizerNames
from transformers.utils import ADAPTER_SAFE_WEIGHTS_NAME
from trl import SFTConfig, SFTTrainer

import data
import recipes
from common import (
    ModelSettings,
    UserError,
    check_folder_can_be_written,
    check_model_fits_the_machine,
    check_model_weights,
    device_map_for,
    folder_written_whole,
    load_config,
    load_tokenizer,
    named_on_command_line,
    parse_settings,
    run_cli,
    setting,
    under_fsdp,
    write_json_whole,
)

startup.after_the_imports(as_script=__name__ == "__main__")


@dataclass
class Settings(ModelSettings):
    # Step 2. The data set (the base model and the new model's name are in common.ModelSettings)
    dataset_name: str = setting(
        "mlabonne/guanaco-llama2-1k",
        "Hub data set id, or a local .jsonl/.json/.csv/.tsv/.parquet file or a folder of them; the shape (text, "
        "messages, conversations, prompt/completion, instruction/input/output, question/answer) comes from the columns",
    )
    dataset_config: str = setting("", "config name of a Hub data set that has several")
    dataset_split: str = setting("train", "split of a Hub data set to train on")
    text_column: str = setting("", "train on this column's ready-made text (for columns of other names)")
    prompt_column: str = setting("", "with response_column: the column holding the user's turn")
    response_column: str = setting("", "with prompt_column: the column holding the answer")
    loss_on: str = setting(
        "auto",
        "tokens that carry loss. auto: the answers for rows that mark them (chat, prompt/completion, ...), the whole "
        "text for ready-made text rows",
        choices=["auto", "answers", "all"],
    )
    check_data: bool = setting(False, "load, render and check the data set, print what was found, and stop")

    # Step 3. LoRA
    lora_r: int = setting(64, "rank of the LoRA update matrices: larger learns more and costs more memory")
    lora_alpha: int = setting(16, "LoRA scaling: the update is multiplied by lora_alpha / lora_r")
    lora_dropout: float = setting(0.1, "dropout on the LoRA layers' input")
    lora_target_modules: str = setting(
        "", "layers that get LoRA: comma-separated names, 'all-linear', or empty for peft's default (q_proj,v_proj on Llama)"
    )

    # Step 4. bitsandbytes
    use_4bit: bool = setting(True, "load the base model quantized to 4 bits (QLoRA)")
    bnb_4bit_quant_type: str = setting("nf4", "4-bit data type", choices=["nf4", "fp4"])
    use_nested_quant: bool = setting(False, "double quantization: quantize the quantization constants too")
    precision: str = setting(
        "auto",
        "compute dtype of the 4-bit layers and the trainer's mixed precision. auto: bf16 on a GPU of compute "
        "capability >= 8 (the tutorial's step 8 advice, applied), fp16 on older GPUs, fp32 on the CPU",
        choices=["auto", "bf16", "fp16", "fp32"],
    )

    # Step 5. TrainingArguments
    output_dir: str = setting("./results", "checkpoints and tensorboard logs")
    num_train_epochs: float = setting(1, "passes over the training data")
    per_device_train_batch_size: int = setting(1, "rows per GPU per step")
    gradient_accumulation_steps: int = setting(1, "steps whose gradients are added up before one optimizer update")
    gradient_checkpointing: bool = setting(True, "recompute activations in the backward pass: less memory, slower")
    max_grad_norm: float = setting(0.3, "gradient clipping")
    learning_rate: float = setting(2e-4, "initial AdamW learning rate (the tutorial's text says 2e-6: see README)")
    weight_decay: float = setting(0.001, "weight decay on all weights but biases and norms")
    optim: str = setting("paged_adamw_32bit", "optimizer (any name transformers' TrainingArguments takes)")
    lr_scheduler_type: str = setting("cosine", "learning-rate schedule")
    max_steps: int = setting(-1, "stop after this many steps; -1 runs num_train_epochs")
    warmup_ratio: float = setting(0.03, "fraction of the steps spent warming the learning rate up from 0")
    group_by_length: bool = setting(True, "batch rows of similar length together: less padding")
    save_steps: float = setting(0.1, "save a checkpoint every N steps (below 1: that fraction of the run; 0: none)")
    save_total_limit: int = setting(3, "checkpoints kept in output_dir: older ones are deleted")
    logging_steps: int = setting(25, "log the loss every N steps")
    report_to: str = setting("tensorboard", "where logs go: tensorboard, none, wandb, ...")
    checkpoint_every_n_layers: int = setting(
        1, "with gradient_checkpointing: recompute only every n-th layer (more memory, faster)"
    )
    activation_offloading: bool = setting(False, "with gradient_checkpointing: keep saved activations in CPU memory")
    use_liger_kernel: bool = setting(False, "Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, cross-entropy)")
    torch_compile: bool = setting(False, "compile the model with torch.compile")
    eval_dataset: str = setting(
        "", "eval rows: a split of the Hub data set ('test'), or a second file, folder or Hub id (default: held out)"
    )
    eval_fraction: float = setting(0.05, "without eval_dataset: fraction of the rows held out for eval; 0 for none")
    eval_seed: int = setting(42, "seed of the shuffle that picks the held-out rows")
    eval_steps: int = setting(100, "compute the eval loss every N steps (and at the end)")

    # Step 6. SFT
    max_length: int = setting(1024, "longest row in tokens; longer rows are cut")
    packing: bool = setting(False, "pack several short rows into one sequence")
    padding_free: bool = setting(False, "batch rows end to end with no padding (packing implies it)")
    pad_to_full_length: bool = setting(
        False, "pad every batch to its full size (max_length tokens a row; batch size x max_length when packed): one "
        "shape for every step, so flex attention compiles once instead of again for new lengths (costs the padding)"
    )
    attn_implementation: str = setting(
        "sdpa", "attention kernel; flex_attention keeps packed rows apart on the GPU", choices=["sdpa", "flex_attention", "eager"]
    )
    gpu_recipe: str = setting(
        "auto",
        "speed settings measured on the H200 (recipes.py, bench/RESULTS.md) for the settings still at the tutorial's "
        "value: yours (edited here or on the command line) win. auto: packed rows, flex attention, Liger, and the "
        "fastest memory mode predicted to fit this model in the GPU's free memory (on the CPU, GPUs without bf16 and "
        "under FSDP: tutorial); tutorial: the settings as written; or a memory mode by name",
        choices=recipes.NAMES,
    )
    auto_find_batch_size: bool = setting(
        True, "after an out-of-memory error in training, start again at a smaller batch (transformers' own retry)"
    )

    # After training: the answer printed to check the adapter
    sample_prompt: str = setting("What is a large language model?", "question answered after training")
    sample_max_new_tokens: int = setting(200, "length budget of that answer; 0 skips it")

    # Saving: an adapter an earlier run left in new_model is only replaced when asked
    overwrite_adapter: bool = setting(False, "replace an adapter already in the new_model folder")


# Before anything is loaded: settings that cannot work stop here, with the fix
MUST_BE_POSITIVE = [
    "lora_r",
    "lora_alpha",
    "max_length",
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "logging_steps",
    "save_total_limit",
    "checkpoint_every_n_layers",
]


def check_settings(settings):
    for field in dataclasses.fields(Settings):  # nan passes every comparison below, inf most of them
        value = getattr(settings, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{field.name} must be a finite number (got {value}); the default is {field.default}")
    for name in MUST_BE_POSITIVE:
        if getattr(settings, name) <= 0:
            default = Settings.__dataclass_fields__[name].default
            raise UserError(f"--{name} must be above 0 (got {getattr(settings, name)}); the default is {default}")
    if settings.sample_max_new_tokens < 0:
        raise UserError(f"--sample_max_new_tokens must be 0 (no sample answer) or more (got {settings.sample_max_new_tokens})")
    if settings.max_steps == 0 or settings.max_steps < -1:
        raise UserError(f"--max_steps must be above 0, or -1 to run --num_train_epochs (got {settings.max_steps})")
    if settings.max_steps == -1 and settings.num_train_epochs <= 0:
        raise UserError(f"--num_train_epochs must be above 0 (got {settings.num_train_epochs})")
    for name in ("lora_dropout", "warmup_ratio"):
        if not 0 <= getattr(settings, name) < 1:
            raise UserError(f"--{name} must be at least 0 and below 1 (got {getattr(settings, name)})")
    if settings.save_steps < 0 or (settings.save_steps > 1 and settings.save_steps != int(settings.save_steps)):
        raise UserError(
            "--save_steps must be 0 (no checkpoints), a fraction of the run below 1, or a whole number of steps "
            f"(got {settings.save_steps})"
        )
    check_name("optim", settings.optim, [name.value for name in OptimizerNames])
    check_name("lr_scheduler_type", settings.lr_scheduler_type, [name.value for name in SchedulerType])
    check_report_to(settings.report_to)
    if settings.precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"--precision bf16: this GPU ({torch.cuda.get_device_name(0)}) does not support bf16: "
            "use --precision auto (fp16 on this GPU) or --precision fp16"
        )
    check_folder_can_be_written(settings.output_dir, "output_dir")
    check_folder_can_be_written(settings.new_model, "new_model")
    if os.path.isdir(settings.new_model) and os.listdir(settings.new_model) and not settings.overwrite_adapter:
        raise UserError(
            f"the adapter folder '{settings.new_model}' already holds files (an earlier run's adapter?): pass "
            "--overwrite_adapter to replace it at the end of this run, or choose another --new_model"
        )


def check_report_to(report_to):
    """A typo, or a logger that is not installed, would otherwise stop the run only once the model is loaded."""
    installed = get_available_reporting_integrations()
    for name in report_to.split(","):
        name = name.strip()
        check_name("report_to", name, ["none", "all", *INTEGRATION_TO_CALLBACK])
        # transformers can tell whether each is installed, except these two
        if name not in ("none", "all", "flyte", "kubeflow", *installed):
            raise UserError(
                f"--report_to {name}: the {name} package is not installed: install it, or pass --report_to "
                "tensorboard or --report_to none"
            )


def check_name(option, value, known):
    if value not in known:
        close = difflib.get_close_matches(value, known, n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else f"known: {', '.join(known)}"
        raise UserError(f"unknown --{option} '{value}': {hint}")


# Resuming: a rerun continues from the newest checkpoint in output_dir when that checkpoint is the same run's.
# These settings decide what the checkpoints hold and which rows step N trains on: with any of them changed, resuming
# would silently mix two runs. They are all that is written there: no token is a setting.
RUN_SETTINGS_FILE = "run_settings.json"
RUN_KEYS = [
    "gpu_recipe",  # as picked: with auto, another GPU or less free memory would pick another batch size
    "model_name",
    # the rows, and which of them are held out
    "dataset_name",
    "dataset_config",
    "dataset_split",
    "text_column",
    "prompt_column",
    "response_column",
    "loss_on",
    "eval_dataset",
    "eval_fraction",
    "eval_seed",
    "max_length",
    "packing",
    "padding_free",
    "group_by_length",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_train_epochs",
    # what an update does
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "use_4bit",
    "bnb_4bit_quant_type",
    "use_nested_quant",
    "precision",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "optim",
    "weight_decay",
    "max_grad_norm",
]


def run_settings(settings, recipe_changes):
    keys = {key: getattr(settings, key) for key in RUN_KEYS}
    keys["recipe_changes"] = recipe_changes  # with auto, another card or model length picks another memory mode
    for key in ("dataset_name", "eval_dataset"):  # a local file edited since is another data set under the same name
        if os.path.isfile(getattr(settings, key)):
            with open(getattr(settings, key), "rb") as f:
                keys[f"{key.removesuffix('_name')}_sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    return keys


def save_run_settings(settings, recipe_changes):
    os.makedirs(settings.output_dir, exist_ok=True)
    write_json_whole(os.path.join(settings.output_dir, RUN_SETTINGS_FILE), run_settings(settings, recipe_changes))


def checkpoint_to_resume(settings, recipe_changes):
    """The newest complete checkpoint in output_dir, or None; refuses one that a run with other settings made."""
    if not os.path.isdir(settings.output_dir):
        return None
    # Not transformers' get_last_checkpoint: it would pick a checkpoint cut off while being saved. The trainer writes
    # trainer_state.json last, so a checkpoint that has it whole is complete.
    checkpoints = sort_checkpoints(settings.output_dir)
    complete = [path for path in checkpoints if read_trainer_state(path) is not None]
    if not complete:
        return None
    try:
        with open(os.path.join(settings.output_dir, RUN_SETTINGS_FILE)) as f:
            before = json.load(f)
    except (OSError, ValueError):
        before = {}
    now = run_settings(settings, recipe_changes)
    changed = [
        f"{key} {before.get(key, '(not recorded)')} then, {now[key]} now"
        for key in now if before.get(key) != now[key]
    ]
    if changed:
        raise UserError(
            f"'{settings.output_dir}' holds checkpoints of a run with other settings ({'; '.join(changed)}): rerun "
            "with that run's settings to resume it, or start fresh with another --output_dir (or delete that folder)"
        )
    return complete[-1]


# Step 7. Load the data set: see data.py for the sources, shapes, rendering and the check


# Step 8. Check the GPU: the speed settings that fit it (recipes.py), and the compute dtype the tutorial tells the
# user to pick by hand
def settings_you_chose(argv):
    """The settings named on the command line, and those edited at the top of this file away from the tutorial's
    value: a recipe leaves these alone."""
    edited = {name for name, value in recipes.TUTORIAL.items() if Settings.__dataclass_fields__[name].default != value}
    return named_on_command_line(Settings, argv) | edited


def pick_precision(precision):
    """Returns (4-bit compute dtype, trainer bf16 flag)."""
    on_gpu = torch.cuda.is_available()
    if precision == "auto":
        precision = "fp32" if not on_gpu else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "bf16":
        return torch.bfloat16, True
    # fp16 keeps the tutorial's recipe: fp16 compute in the 4-bit layers, no mixed precision. (trl stores the LoRA
    # weights of a 4-bit model in bf16 whatever this says.)
    return (torch.float16 if precision == "fp16" else torch.float32), False


def make_bnb_config(settings, compute_dtype):
    return BitsAndBytesConfig(
        load_in_4bit=settings.use_4bit,
        bnb_4bit_quant_type=settings.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=settings.use_nested_quant,
        # FSDP shards floating-point tensors only: stored as the compute dtype, the packed 4-bit weights shard across
        # the GPUs like the rest of the model (uint8, bitsandbytes' default, would stay whole on every GPU)
        bnb_4bit_quant_storage=compute_dtype if under_fsdp() else torch.uint8,
    )


# Step 9. Load the base model and tokenizer, set up LoRA and the trainer
def load_base_model(settings, bnb_config, device_map):
    model = AutoModelForCausalLM.from_pretrained(
        settings.model_name,
        quantization_config=bnb_config,
        device_map=device_map,
        # The weights that stay unquantized (embeddings, norms, lm_head) in the compute dtype too. In the checkpoint's
        # own dtype (fp16 for Llama-2) under bf16 training, every layer's activations would flip between fp16 and
        # bf16, and each cast is another copy kept for the backward pass. FSDP needs it as well: it flattens each
        # wrapped block into one tensor of one dtype, the 4-bit weights' storage dtype, which is the compute dtype
        dtype=bnb_config.bnb_4bit_compute_dtype,
        trust_remote_code=settings.trust_remote_code,
        use_safetensors=True,
        attn_implementation=settings.attn_implementation,
    )
    model.config.use_cache = False  # the cache is useless while training and conflicts with gradient checkpointing
    keep_4bit_weights_as_loaded(model)
    return model


def keep_4bit_weights_as_loaded(model):
    """On a CPU with AVX512-BF16, bitsandbytes 0.50.2 repacks a Linear4bit's weights in place on its first eval-mode
    forward (its absmax turned to bf16 and transposed); the next state_dict() (every checkpoint, the adapter's save)
    unpacks the weights but leaves absmax transposed, so from then on the layer computes with scrambled scales (in
    issue 13 a run's loss jumped from 2.34 to 15.8 after an eval and a checkpoint). With the repacking off, an
    eval-mode forward runs the same dequantize-and-matmul as training. The switch only acts on CPU inputs."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def make_lora_config(settings):
    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=parse_target_modules(settings.lora_target_modules),
    )


def parse_target_modules(names):
    if not names:
        return None  # peft picks the architecture's default
    return names if names == "all-linear" else [name.strip() for name in names.split(",") if name.strip()]


def check_target_modules(settings, config):
    """Every layer name in --lora_target_modules names a layer of the model (peft's rule: the full name, or its end
    after a dot), found on the meta device before any weight loads. peft stops only when none matches, after loading."""
    names = parse_target_modules(settings.lora_target_modules)
    if not isinstance(names, list):
        return
    with torch.device("meta"):
        layers = dict(AutoModelForCausalLM.from_config(config).named_modules())
    missing = [name for name in names if not any(layer == name or layer.endswith(f".{name}") for layer in layers)]
    if missing:
        linear = {layer.rsplit(".", 1)[-1] for layer, module in layers.items() if isinstance(module, torch.nn.Linear)}
        raise UserError(
            f"--lora_target_modules: '{settings.model_name}' has no layer called {', '.join(missing)}: its linear "
            f"layers are {', '.join(sorted(linear))}; name some of them, or pass all-linear"
        )


def full_length(settings):
    """A batch's length in tokens at its fullest: a packed or padding-free batch is one row of all its rows"""
    flat = settings.packing or settings.padding_free
    return settings.max_length * (settings.per_device_train_batch_size if flat else 1)


def make_training_config(settings, bf16, has_eval=False):
    return SFTConfig(
        output_dir=settings.output_dir,
        num_train_epochs=settings.num_train_epochs,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        activation_checkpointing=settings.gradient_checkpointing,  # transformers 5's name for it
        activation_checkpointing_kwargs={
            "every_n_layers": settings.checkpoint_every_n_layers,
            "offload": settings.activation_offloading,
        },
        use_liger_kernel=settings.use_liger_kernel,
        torch_compile=settings.torch_compile,
        auto_find_batch_size=settings.auto_find_batch_size,
        max_grad_norm=settings.max_grad_norm,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        optim=settings.optim,
        lr_scheduler_type=settings.lr_scheduler_type,
        max_steps=settings.max_steps,
        warmup_steps=settings.warmup_ratio,  # a value below 1 is a fraction of the run, as warmup_ratio was
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
        save_strategy="steps" if settings.save_steps > 0 else "no",
        save_steps=settings.save_steps if settings.save_steps > 0 else 500,
        save_total_limit=settings.save_total_limit,
        logging_steps=settings.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss is logged as one, for StopWhenTrainingBreaks to see
        report_to=settings.report_to,
        bf16=bf16,
        fp16=False,
        max_length=settings.max_length,
        packing=settings.packing,
        padding_free=settings.padding_free,
        pad_to_multiple_of=full_length(settings) if settings.pad_to_full_length else None,
        dataset_text_field="text",
        # Chat rows come tokenized with their loss masks (data.py finds each answer for any template); trl's own
        # assistant_only_loss would need {% generation %} marks in the template
        assistant_only_loss=False,
        eval_strategy="steps" if has_eval else "no",  # every eval_steps, and once more at the last step
        eval_steps=settings.eval_steps,
        # Without CUDA, processes started by `accelerate launch` train together over gloo on the CPU; without this
        # each would silently train alone on all the rows
        use_cpu=not torch.cuda.is_available(),
        # Every LoRA weight takes part in every step; the trainer cannot tell for a peft model and would otherwise make
        # DDP search the autograd graph for unused weights at each step
        ddp_find_unused_parameters=False,
    )


# Step 10. Train and save the adapter, then let it answer one question
def read_trainer_state(checkpoint):
    """The checkpoint's trainer_state.json, or None where it is missing or cut off (a kill while it was written)."""
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME)) as f:
            state = json.load(f)
        return state if isinstance(state, dict) and "global_step" in state else None
    except (OSError, ValueError):
        return None


def run_is_finished(checkpoint):
    """The checkpoint of a run's last step: resumed, the trainer would train one step past it."""
    state = read_trainer_state(checkpoint)
    return state["global_step"] >= state["max_steps"]


def take_finished_checkpoint(trainer, checkpoint):
    """The trainer as it ended the run: the checkpoint's LoRA weights, copied into the model's own (so in their dtype:
    peft's load_adapter would upcast them), and its state (steps, log history)."""
    set_peft_model_state_dict(trainer.model, load_file(os.path.join(checkpoint, ADAPTER_SAFE_WEIGHTS_NAME)))
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))


def heldout_loss(model, rows):
    """Mean cross-entropy per loss-carrying token over (ids, labels) rows (data.loss_rows), one row at a time, so no
    padding enters: the trainer's eval loss for rows that fit one batch, and the same number in every script."""
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids, labels in rows:
            n = sum(label != -100 for label in labels[1:])  # the model predicts each label from the tokens before it
            loss = model(input_ids=torch.tensor([ids], device=model.device),
                         labels=torch.tensor([labels], device=model.device)).loss  # fmt: skip
            total, tokens = total + loss.item() * n, tokens + n
    return total / tokens


def heldout_summary(rows, answers_only, before, after):
    """What finetune.py measured on the held-out rows, for training_info.json, the card and merge_and_push.py."""
    tokens = sum(sum(label != -100 for label in labels[1:]) for _, labels in rows)
    loss_on = "answers" if answers_only else "all"
    return {"rows": len(rows), "tokens": tokens, "loss_on": loss_on, "before_training": before, "after_training": after}


def sample_answer(model, tokenizer, question, max_new_tokens):
    # Rendered with the chat template the training rows were: the same tokens as a training prompt
    inputs = data.prompt_inputs(tokenizer, question).to(model.device)
    model.eval()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def held_out_line(summary):
    before, after = summary["before_training"], summary["after_training"]
    return (
        f"held-out loss ({summary['rows']} rows, {summary['tokens']} tokens, loss on {summary['loss_on']}): "
        f"{before:.4f} before training, {after:.4f} after ({100 * (after - before) / before:+.1f}%)"
    )


class SaveOnCtrlC(TrainerCallback):
    """Ctrl-C asks the trainer to save a checkpoint at the end of the current step and stop: the trainer's own
    checkpoint (adapter, optimizer, scheduler, RNG state), the one a rerun resumes from. A second Ctrl-C stops at
    once, as Python's default handler does."""

    def __init__(self):
        self.requested = False

    @contextmanager
    def listening(self):
        previous = signal.signal(signal.SIGINT, self.request)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def request(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # os.write, not print: a signal handler that prints can land in the middle of the progress bar's own print
        os.write(2, b"\nCtrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again: stop now)\n")

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True


class StopWhenTrainingBreaks(TrainerCallback):
    """A loss or gradient norm that is NaN or inf stops the run with one line: every update after it is NaN too, and
    the adapter saved at the end would be worthless. transformers only hides such losses in its logs
    (logging_nan_inf_filter, turned off in make_training_config) and has no stop for them. Checked in every log, and
    a log is asked for before every checkpoint, so no checkpoint of a broken run is saved either."""

    KEYS = ("loss", "grad_norm", "eval_loss", "train_loss")

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in self.KEYS:
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                print(file=sys.stderr)  # ends the progress bar's line, so the error has one of its own
                raise UserError(
                    f"training broke at step {state.global_step}: the {key} is {value}. Nothing was saved to "
                    f"--new_model, and no checkpoint after step {state.global_step - 1} either. Lower --learning_rate "
                    f"({args.learning_rate}) or --max_grad_norm ({args.max_grad_norm}) and start again in another "
                    "--output_dir"
                )


class KeepAdapterDtypes(TrainerCallback):
    """Resuming, the trainer loads the checkpoint's adapter with peft's load_adapter, which upcasts bf16 LoRA weights
    to fp32 (peft's autocast_adapter_dtype, which the trainer does not pass on): the resumed run would then train and
    save in another precision than the run it continues. Before the first step, this puts every trainable weight back
    in the dtype trl gave it, and the state of a torch optimizer with it (torch keeps it in the weight's dtype;
    bitsandbytes' optimizers keep theirs in fp32 whatever the weight's, as in the run being continued)."""

    def __init__(self, model):
        self.dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper around it
        for name, param in model.named_parameters():
            dtype = self.dtypes.get(name)
            if dtype is None or param.dtype == dtype:
                continue
            param.data = param.data.to(dtype)
            if optimizer is not None and not isinstance(optimizer, Optimizer8bit):
                moments = optimizer.state.get(param, {})
                for key, value in moments.items():
                    if torch.is_tensor(value) and value.is_floating_point() and value.shape == param.shape:
                        moments[key] = value.to(dtype)


TRAINING_INFO = "training_info.json"
LIBRARIES = ["torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "huggingface_hub"]


def last_logged(log_history, key):
    return next((entry[key] for entry in reversed(log_history) if key in entry), None)


def save_training_info(trainer, settings, answer, heldout, folder):
    """What the model card needs, beside the adapter: the settings (there is no token among them), versions, time,
    GPU, tokens seen, the trainer's log history, the held-out loss before and after training, and the sample answer
    (kept for the record: merge_and_push.py asks the models it loads for their own)."""
    log_history = trainer.state.log_history
    tokens_seen = last_logged(log_history, "num_tokens")  # trl's running count; the trainer's own is off by default
    info = {
        "settings": dataclasses.asdict(settings),
        "versions": {name: version(name) for name in LIBRARIES},
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)",
        "train_runtime_s": last_logged(log_history, "train_runtime"),
        "global_step": trainer.state.global_step,
        "tokens_seen": None if tokens_seen is None else int(tokens_seen),
        "final_train_loss": last_logged(log_history, "loss"),
        "final_eval_loss": last_logged(log_history, "eval_loss"),
        "log_history": log_history,
        "heldout_loss": heldout,
        "sample": {"prompt": settings.sample_prompt, "answer": answer},
    }
    write_json_whole(os.path.join(folder, TRAINING_INFO), info)



def main(argv=None, callbacks=()):
    """Runs steps 1-10; `callbacks` (TrainerCallback objects) let the benchmark time the steps."""
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = parse_settings(Settings, argv)
    check_settings(settings)
    config = load_config(settings.model_name, settings.trust_remote_code)
    if not settings.check_data:  # the check needs no model weights and no GPU
        check_model_fits_the_machine(settings.model_name, config)
    settings, recipe = recipes.pick(settings, settings_you_chose(argv), config)
    if not settings.check_data:
        check_model_weights(settings.model_name)
        check_target_modules(settings, config)  # the recipe's too: it names all linear layers
    print(recipes.describe(recipe, {name: Settings.__dataclass_fields__[name].default for name in recipe.changes}))
    checkpoint = checkpoint_to_resume(settings, recipe.changes)
    tokenizer = load_tokenizer(settings.model_name, settings.trust_remote_code)
    dataset = data.prepare_data(settings, tokenizer)  # stops here, with one line, on data nothing can be learnt from
    if settings.check_data:
        return dataset

    compute_dtype, bf16 = pick_precision(settings.precision)
    # Made before the device map: it sets up the processes `accelerate launch` started (the only one in a plain
    # run), which the device map and the main-process checks below read
    training_config = make_training_config(settings, bf16, dataset.eval is not None)
    # Every process runs this function; only the main one prints, saves and answers (the trainer keeps its logs and
    # checkpoints to it too)
    is_main_process = PartialState().is_main_process
    device_map = device_map_for()
    bnb_config = make_bnb_config(settings, compute_dtype)
    if is_main_process:
        print(f"4-bit compute dtype: {compute_dtype}, trainer bf16: {bf16}, device: {device_map['']}")
        if settings.attn_implementation == "flex_attention":
            # 54 s on the H200 with empty caches; PyTorch keeps the compiled kernels on disk for later runs
            print("flex attention: the first step compiles it, about a minute on a machine's first run")

    model = load_base_model(settings, bnb_config, device_map)
    ctrl_c = SaveOnCtrlC()
    trainer = SFTTrainer(
        model=model,
        args=training_config,
        train_dataset=dataset.train,
        eval_dataset=dataset.eval,
        processing_class=tokenizer,
        peft_config=make_lora_config(settings),
        callbacks=[ctrl_c, StopWhenTrainingBreaks(), *callbacks],
    )
    trainer.add_callback(KeepAdapterDtypes(trainer.model))
    trainer.add_callback(recipes.SmallerBatchAfterOutOfMemory(trainer.data_collator, settings, full_length))

    # The held-out loss before and after training, on the eval rows as the trainer scores them. Under FSDP a forward
    # needs every process in step (and the trainer wraps the model only in train()): its eval_loss is logged instead
    heldout = None
    if dataset.eval is not None and not under_fsdp():
        heldout = data.loss_rows(dataset.eval, tokenizer, dataset.answers_only, settings.max_length)
        with trainer.model.disable_adapter():
            before = heldout_loss(trainer.model, heldout)
    if is_main_process:
        save_run_settings(settings, recipe.changes)
    if checkpoint and run_is_finished(checkpoint):
        print(f"{checkpoint} is the last step of this run: saving its adapter, not training again")
        take_finished_checkpoint(trainer, checkpoint)
    else:
        if checkpoint:
            step = read_trainer_state(checkpoint)["global_step"]
            print(f"resuming from {checkpoint} (step {step}): the same settings' earlier run")
        with ctrl_c.listening(), recipes.no_batch_fits_is_one_line():
            trainer.train(resume_from_checkpoint=checkpoint)
    if ctrl_c.requested:
        print(
            f"stopped: checkpoint of step {trainer.state.global_step} saved in {settings.output_dir}. "
            "Run the same command again to resume from it",
            file=sys.stderr,
        )
        sys.exit(130)  # the shell's status for Ctrl-C: a script running this then merge_and_push.py stops here
    if dataset.eval is not None and is_main_process:
        final_eval = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
        if final_eval:
            print(f"eval loss at step {final_eval['step']}: {final_eval['eval_loss']:.4f}")

    # Every process calls save_model (under FSDP the adapter is gathered from all of them); only the main one writes,
    # and only it moves the finished folder, training_info.json in it, into place
    with folder_written_whole(settings.new_model, main_process=is_main_process) as folder:
        trainer.save_model(folder)  # the adapter (not the base model) and the tokenizer
        summary = None
        if heldout is not None:  # measured after the save, so it is the saved adapter's loss
            summary = heldout_summary(heldout, dataset.answers_only, before, heldout_loss(trainer.model, heldout))
        if is_main_process:
            if summary:
                print(held_out_line(summary))
            answer = None
            if under_fsdp():
                # Each GPU holds a shard of the model: generating would need every process in step with the main one
                print("no sample answer under FSDP (the model is sharded across the GPUs): try the merged model")
            elif settings.sample_max_new_tokens > 0:
                answer = sample_answer(trainer.model, tokenizer, settings.sample_prompt, settings.sample_max_new_tokens)
                print(f"{settings.sample_prompt}\n>>> {answer}")
            save_training_info(trainer, settings, answer, summary, folder)
    if is_main_process:
        print(f"adapter saved to {settings.new_model}")
    return trainer


if __name__ == "__main__":
    run_cli(main)
