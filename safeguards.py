"""What keeps a run from wasting the user's time or work. For finetune.py: the settings checked before anything loads,
a rerun resuming only a checkpoint of the same run, Ctrl-C saving a checkpoint to resume from, a loss that turns NaN
stopping the run, and a resumed run training in the precision it started in. For merge_and_push.py: its settings, the
adapter, the merged folder, the disk and the Hub token, all checked before the merge."""

import dataclasses
import difflib
import hashlib
import json
import math
import os
import shutil
import signal
import sys
from contextlib import contextmanager

import torch
from bitsandbytes.optim.optimizer import Optimizer8bit
from huggingface_hub import get_token, interpreter_login
from huggingface_hub.utils import HFValidationError, validate_repo_id
from peft import set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback, TrainerState
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import SchedulerType, sort_checkpoints
from transformers.training_args import OptimizerNames
from transformers.utils import ADAPTER_SAFE_WEIGHTS_NAME

import data
from common import UserError, check_folder_can_be_written, count_parameters, write_json_whole

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
    """finetune.py's settings (its Settings, whose defaults the messages name), before anything is loaded."""
    defaults = {field.name: field.default for field in dataclasses.fields(settings)}
    for field in dataclasses.fields(settings):  # nan passes every comparison below, inf most of them
        value = getattr(settings, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{field.name} must be a finite number (got {value}); the default is {field.default}")
    for name in MUST_BE_POSITIVE:
        if getattr(settings, name) <= 0:
            raise UserError(
                f"--{name} must be above 0 (got {getattr(settings, name)}); the default is {defaults[name]}"
            )
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
        if data.is_local(getattr(settings, key)):
            digest = hashlib.sha256()
            for file in data.data_files(getattr(settings, key))[0]:  # a folder's files, in order, as one stream
                with open(file, "rb") as f:
                    for chunk in iter(lambda: f.read(2**20), b""):
                        digest.update(chunk)
            keys[f"{key.removesuffix('_name')}_sha256"] = digest.hexdigest()
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


def train_or_resume(trainer, checkpoint):
    """trainer.train(), from checkpoint_to_resume's checkpoint where there is one; a checkpoint of the run's last step
    is taken as it is, not trained again."""
    if checkpoint and run_is_finished(checkpoint):
        print(f"{checkpoint} is the last step of this run: saving its adapter, not training again")
        take_finished_checkpoint(trainer, checkpoint)
        return
    if checkpoint:
        print(f"resuming from {checkpoint} (step {read_trainer_state(checkpoint)['global_step']}): the same settings' "
              "earlier run")  # fmt: skip
    trainer.train(resume_from_checkpoint=checkpoint)


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
    (logging_nan_inf_filter, turned off in finetune.py's SFTConfig) and has no stop for them. Checked in every log, and
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


# merge_and_push.py: before the merge, what would stop it later: its settings, the adapter, the merged folder, the
# disk, the Hub token
def check_merge_settings(settings):
    if settings.verify_rows < 1:
        raise UserError(
            f"--verify_rows must be at least 1 (got {settings.verify_rows}): the merged model is checked on that many "
            "rows before it is pushed; the default is 8"
        )
    if not (math.isfinite(settings.verify_max_kl) and settings.verify_max_kl >= 0):
        raise UserError(
            f"--verify_max_kl must be a finite number, 0 or more (got {settings.verify_max_kl}); the default is 0.01"
        )


def check_adapter(settings):
    """The adapter finetune.py wrote is there, whole, and was trained on the base model this script will load."""
    adapter_config = os.path.join(settings.new_model, "adapter_config.json")
    weights = os.path.join(settings.new_model, "adapter_model.safetensors")
    if not os.path.isdir(settings.new_model):
        raise UserError(f"adapter folder '{settings.new_model}' not found: run finetune.py first, or check --new_model")
    for path in (adapter_config, weights):
        if not os.path.isfile(path):
            raise UserError(
                f"adapter folder '{settings.new_model}' is incomplete: it has no {os.path.basename(path)}. "
                "Run finetune.py again to save the adapter, or check --new_model"
            )
    with open(adapter_config) as f:
        lora = json.load(f)
    trained_on = lora.get("base_model_name_or_path")
    if not same_model(trained_on, settings.model_name):
        raise UserError(
            f"the adapter in '{settings.new_model}' was trained on '{trained_on}', not on '{settings.model_name}': "
            f"pass --model_name {trained_on}"
        )
    check_adapter_rank(settings.new_model, lora, weights)


def check_adapter_rank(folder, lora, weights):
    """The LoRA weights have the rank adapter_config.json says (their shapes, from the file's header): a folder that
    mixes two runs' files would otherwise stop only once the base model is loaded."""
    try:
        with safe_open(weights, "pt") as f:
            ranks = {f.get_slice(name).get_shape()[0] for name in f.keys() if "lora_A" in name}
    except Exception as error:  # safetensors raises its own error types, and OSError
        raise UserError(f"'{weights}' is not a whole safetensors file ({error}): run finetune.py again") from None
    if not lora.get("rank_pattern") and ranks and ranks != {lora.get("r")}:
        raise UserError(
            f"'{folder}' does not hold one adapter: adapter_config.json says rank {lora.get('r')}, "
            f"adapter_model.safetensors holds rank {', '.join(map(str, sorted(ranks)))}. Copy the folder again whole, "
            "or run finetune.py again"
        )


def same_model(a, b):
    """One Hub id or one folder, however the path to it is spelled."""
    return a == b or (os.path.isdir(a or "") and os.path.isdir(b) and os.path.samefile(a, b))


def check_merged_dir(settings):
    """merged_dir can be written: its parent folder exists, and it is no file."""
    parent = os.path.dirname(os.path.abspath(settings.merged_dir))
    if not os.path.isdir(parent):
        raise UserError(
            f"the folder '{parent}' that would hold --merged_dir does not exist: create it, or choose another "
            "--merged_dir"
        )
    check_folder_can_be_written(settings.merged_dir, "merged_dir")


def merged_folder_bytes(settings, config):
    """What the merged folder takes: the weights in fp16 (2 bytes a parameter), plus the tokenizer, the card and its
    plot, counted as the whole adapter folder they are made from (more than they take), plus a margin of 5% and
    16 MB for the config files and the file system's own blocks."""
    extras = sum(entry.stat().st_size for entry in os.scandir(settings.new_model) if entry.is_file())
    return int((count_parameters(config) * 2 + extras) * 1.05) + 16 * 2**20


def check_disk_space(settings, config):
    """The merged folder is written next to the folder it replaces."""
    needed = merged_folder_bytes(settings, config)
    parent = os.path.dirname(os.path.abspath(settings.merged_dir))
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise UserError(
            f"not enough disk space for the merged model: it needs about {needed / 1e9:.3g} GB and {parent} has "
            f"{free / 1e9:.3g} GB free. Free some space, or pass a --merged_dir on another disk"
        )


def check_hub_login(settings):
    """Before any work: the push needs a token (HF_TOKEN or `hf auth login`), asked for only at a terminal."""
    try:
        validate_repo_id(settings.hub_repo)
    except HFValidationError as error:
        raise UserError(f"--hub_repo '{settings.hub_repo}' is not a valid repo id: {error}") from None
    if get_token() is None:
        if not sys.stdin.isatty():
            raise UserError(
                "pushing needs a Hugging Face token and none was found: set HF_TOKEN, run `hf auth login`, "
                "or pass --no_push to only save the merged model locally"
            )
        interpreter_login()
