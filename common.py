"""What finetune.py and merge_and_push.py share: the settings they both name, the command line, the tokenizer
set-up, the choice of device, the one-line error a user sees instead of a traceback, and the two records the scripts
leave for each other and for the model card (training_info.json, verification.json), each defined once here."""

import argparse
import copy
import dataclasses
import difflib
import glob
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

# Bigger models are refused on a machine without CUDA: the CPU path is for tests and smoke runs, and a 7B model in
# 4-bit would take days per epoch there.
CPU_MAX_PARAMS = 1_000_000_000


class UserError(Exception):
    """A mistake in the user's settings or files: shown as one line, with the fix, and a non-zero exit."""


def setting(default, help, **metadata):
    """A dataclass field whose help text `--help` prints; `choices=[...]` limits the values."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class ModelSettings:
    """The names both scripts use, so the adapter merge_and_push.py reads is the one finetune.py wrote."""

    # Step 2. The base model and the new model's name
    model_name: str = setting("NousResearch/Llama-2-7b-chat-hf", "base model: a Hub id or a local folder")
    new_model: str = setting("llama-2-7b-yubong", "folder the fine-tuned LoRA adapter is saved to (and read from)")
    trust_remote_code: bool = setting(
        False, "run Python code shipped in the model's Hub repository (off: only code of installed libraries runs)"
    )


class SettingsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """HfArgumentParser takes each setting as `--a_b` and `--a-b`: --help names the first only. A help that states its
    own default (one computed from another setting) is not given the dataclass's placeholder as a second one."""

    def _format_action_invocation(self, action):
        shown = copy.copy(action)
        shown.option_strings = [name for name in action.option_strings if "-" not in name.lstrip("-")]
        return super()._format_action_invocation(shown)

    def _get_help_string(self, action):
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


def settings_parser(settings_class):
    """HfArgumentParser, whose `--no_x` for a setting that is on by default repeats x's help with the default False:
    it is left out of --help, and x's help says it is there."""
    parser = HfArgumentParser(settings_class, formatter_class=SettingsHelp)
    switches = {action.dest: action for action in parser._actions if action.option_strings[0].startswith("--no_")}
    for action in parser._actions:
        if action.dest in switches and action is not switches[action.dest]:
            also = "" if f"--no_{action.dest}" in action.help else f"; --no_{action.dest} turns it off"
            action.help += f" (default: %(default)s{also})"
            switches[action.dest].help = argparse.SUPPRESS
    return parser


def parse_settings(settings_class, argv=None):
    """The dataclass's defaults, with whatever the command line overrides (`--name value`)."""
    parser = settings_parser(settings_class)
    settings, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        fields = dataclasses.fields(settings_class)
        known = [f"--{f.name}" for f in fields] + [f"--no_{f.name}" for f in fields if f.default is True]
        first = unknown[0]
        if not first.startswith("-"):
            raise UserError(
                f"unexpected '{first}' on the command line: settings go as --name value (--help lists them)"
            )
        close = difflib.get_close_matches(first.split("=")[0], known, n=2)
        hint = f"did you mean {' or '.join(close)}?" if close else "--help lists every setting"
        raise UserError(f"unknown setting {first}: {hint}")
    return settings


def named_on_command_line(settings_class, argv):
    """The names of the settings the command line gives a value, whatever the value (`--x 1`, `--x=1`, `--no_x`)."""
    parser = settings_parser(settings_class)
    unset = object()
    parser.set_defaults(**{action.dest: unset for action in parser._actions})
    return {name for name, value in vars(parser.parse_args(argv)).items() if value is not unset}


def under_fsdp():
    """True under `accelerate launch` with an FSDP config (configs/fsdp_qlora.yaml): the flag accelerate reads."""
    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def run_cli(main):
    """Runs main() and turns a UserError into one line on stderr and exit status 2, Ctrl-C into one line and 130."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): rerun the same command to continue", file=sys.stderr)
        sys.exit(130)


def load_config(model_name, trust_remote_code):
    if os.path.isfile(model_name):
        raise UserError(
            f"--model_name '{model_name}' is a file: name the folder that holds the model "
            f"('{os.path.dirname(model_name) or '.'}'), or a Hub id"
        )
    try:
        return AutoConfig.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise UserError(
            f"the model '{model_name}' needs Python code of its own to load (its config's auto_map), which runs only "
            "with --trust_remote_code: pass it if you trust that code"
        ) from None
    except OSError as error:
        raise UserError(
            f"cannot load the model '{model_name}': not a local folder with a config.json, and not reachable on "
            f"the Hugging Face Hub ({str(error).splitlines()[0]}). Check --model_name, your network or `hf auth login`."
        ) from None


def check_model_weights(model_name):
    """A local model folder holds whole safetensors weights, read from their headers (nothing is loaded): pickled
    weights (pytorch_model.bin) are never loaded, as loading them can run code, and a cut-off or corrupt file stops
    here rather than in the middle of the load. A Hub id is left to from_pretrained(use_safetensors=True)."""
    if not os.path.isdir(model_name):
        return
    files = sorted(glob.glob(os.path.join(model_name, "*.safetensors")))
    if not files:
        pickles = sorted(name for name in os.listdir(model_name) if name.endswith((".bin", ".pt", ".pth", ".ckpt")))
        held = f" (it holds {', '.join(pickles)})" if pickles else ""
        raise UserError(
            f"the model folder '{model_name}' has no .safetensors weights{held}: pickled weights are not loaded, as "
            "loading them can run code. Convert them where you trust them (load, then save_pretrained: it writes "
            "safetensors), or use the model's safetensors release"
        )
    for file in files:
        try:
            with safe_open(file, "pt") as f:
                f.keys()
        except Exception as error:  # safetensors raises its own error types, and OSError
            raise UserError(
                f"'{file}' is not a whole safetensors file ({str(error).splitlines()[0] if str(error) else error!r}): "
                "it may be cut off or corrupt. Download or copy it again"
            ) from None


def check_folder_can_be_written(path, option):
    """Before any work: a folder the run writes is not an existing file, and the disk it goes on takes files."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(
            f"--{option} '{path}' is a file, not a folder: choose another --{option} (the file is left as it is)"
        )
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--{option} '{path}' cannot be made: '{existing}' is a file. Choose another --{option}")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise UserError(
            f"--{option} '{path}': cannot write in '{existing}' ({error.strerror}): choose a --{option} on a disk "
            "you can write to"
        ) from None


def count_parameters(config):
    """Parameters of the model a config describes, counted on the meta device: nothing is downloaded or allocated."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def check_model_fits_the_machine(model_name, config):
    """Without CUDA only a small model can train (on the CPU): a bigger one stops here, before anything loads."""
    if torch.cuda.is_available():
        return
    n_params = count_parameters(config)
    if n_params > CPU_MAX_PARAMS:
        raise UserError(
            f"'{model_name}' has {n_params / 1e9:.1f}B parameters and no CUDA GPU was found: a model this size needs "
            f"a CUDA GPU (the CPU path takes models up to {CPU_MAX_PARAMS / 1e9:.0f}B, for tests and smoke runs)."
        )


def device_map_for():
    """The tutorial's step 6: the whole model on one GPU, the one accelerate gives this process under `accelerate
    launch` (GPU 0 in a plain run); without CUDA, the CPU."""
    return {"": PartialState().local_process_index} if torch.cuda.is_available() else {"": "cpu"}


def load_tokenizer(name, trust_remote_code):
    """The tutorial's step 9 tokenizer: padding with the EOS token, on the right."""
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # the tutorial: "fix weird overflow issue with fp16 training"
    return tokenizer


def write_json_whole(path, value):
    """A JSON file written beside its place and renamed into it: a crash mid-write leaves the old file or none."""
    with open(f"{path}.partial", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(f"{path}.partial", path)


@contextmanager
def folder_written_whole(path, main_process=True):
    """Yields a fresh folder beside `path` to write into; when the block ends without an error, that folder takes
    `path`'s place by renames. A crash mid-write leaves `<path>.partial`, never a half-written `path`, so the next
    script never reads half a model. Whether an existing `path` may be replaced is the caller's question to ask.
    The other processes of a multi-process run get the same folder's name and leave the folder to the main one."""
    path = path.rstrip("/")
    partial, old = f"{path}.partial", f"{path}.old"
    if not main_process:
        yield partial
        return
    shutil.rmtree(partial, ignore_errors=True)  # what a crashed earlier write left
    os.makedirs(partial)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a full disk gets its space back; `path` is as it was
        raise
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)  # a directory cannot be os.replace()d over a non-empty one: step it aside first
        os.rename(partial, path)
        shutil.rmtree(old)
    else:
        os.rename(partial, path)


# The records. training_info.json: what finetune.py leaves beside the adapter for merge_and_push.py and the card
TRAINING_INFO = "training_info.json"
LIBRARIES = ["torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "huggingface_hub"]


@dataclass
class TrainingInfo:
    settings: dict  # every setting of the run (there is no token among them)
    versions: dict  # of LIBRARIES
    gpu: str
    train_runtime_s: float | None
    global_step: int
    tokens_seen: int | None  # trl's running count; the trainer's own is off by default
    final_train_loss: float | None
    final_eval_loss: float | None
    log_history: list  # the trainer's
    heldout_loss: dict | None  # heldout_summary(): the held-out loss before and after training
    # the sample answer, kept for the record: merge_and_push.py asks the models it loads for their own
    sample: dict


def training_info(settings, trainer_state, answer, heldout):
    """The TrainingInfo of a finished run: its settings, versions, GPU, and what the trainer logged."""
    log_history = trainer_state.log_history

    def last_logged(key):
        return next((entry[key] for entry in reversed(log_history) if key in entry), None)

    tokens_seen = last_logged("num_tokens")
    return TrainingInfo(
        settings=dataclasses.asdict(settings),
        versions={name: version(name) for name in LIBRARIES},
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)",
        train_runtime_s=last_logged("train_runtime"),
        global_step=trainer_state.global_step,
        tokens_seen=None if tokens_seen is None else int(tokens_seen),
        final_train_loss=last_logged("loss"),
        final_eval_loss=last_logged("eval_loss"),
        log_history=log_history,
        heldout_loss=heldout,
        sample={"prompt": settings.sample_prompt, "answer": answer},
    )


def heldout_summary(rows, tokens, answers_only, before, after):
    """What finetune.py measured on the held-out rows: TrainingInfo.heldout_loss, shown again by merge_and_push.py."""
    loss_on = "answers" if answers_only else "all"
    return {"rows": rows, "tokens": tokens, "loss_on": loss_on, "before_training": before, "after_training": after}


def read_training_info(adapter_dir):
    """The TrainingInfo finetune.py saved in adapter_dir; one line where it is missing or not whole."""
    path = os.path.join(adapter_dir, TRAINING_INFO)
    if not os.path.isfile(path):
        raise UserError(
            f"'{adapter_dir}' has no {TRAINING_INFO}: it was not written by this project's finetune.py. "
            "Check --new_model, or train the adapter again with finetune.py"
        )
    try:
        with open(path) as f:
            info = TrainingInfo(**json.load(f))
        if not isinstance(info.settings, dict):
            raise TypeError("its settings are no mapping")
    except (ValueError, TypeError) as error:
        raise UserError(f"'{path}' is not whole ({error}): train the adapter again with finetune.py") from None
    return info


# verification.json: what merge_and_push.py measured of the merged folder, read back by a rerun and by the cards
VERIFICATION = "verification.json"


@dataclass
class Verification:
    merge_base: str  # "nf4" or "fp16"
    merged_into: str  # the same, in words
    merge_choice: str  # why
    compute_dtype: str
    heldout: dict  # which rows: rows_from, rows, tokens, loss_on
    loss_base: float  # the original weights: what the user started from
    loss_merged: float  # the merged folder as saved, loaded back
    loss_unmerged: float  # the merge's base + the adapter
    loss_4bit_adapter: float  # the adapter on the 4-bit base it was trained on
    merges: dict  # {base: {"loss_base", "loss_merged"}} of each merge measured in memory
    finetune: dict | None  # finetune.py's own before and after (TrainingInfo.heldout_loss), on the same rows
    rows: int  # the rows the logits are compared on
    tokens: int
    max_abs_logit_diff: float
    mean_kl: float  # merged vs base + adapter
    mean_kl_to_4bit_adapter: float
    max_kl: float  # the limit mean_kl was held to
    sample: dict  # prompt, max_new_tokens, merged_answer, adapter_answer
    passed: bool  # mean_kl within max_kl
    beats_base: bool  # loss_merged at most loss_base
    heldout_losses: list  # (what, loss) of every model measured, the base first and the published model last
    gguf: dict | None = None  # the GGUF files' own report (gguf_export.py), when --gguf made them


def read_verification(folder):
    """The Verification of an earlier run in folder (a rerun after a failed upload), or None: none there, or one an
    earlier version wrote with other keys."""
    path = os.path.join(folder, VERIFICATION)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            return Verification(**json.load(f))
        except (TypeError, ValueError):
            return None


def write_record(folder, name, record):
    """A TrainingInfo or Verification, as JSON, written whole."""
    write_json_whole(os.path.join(folder, name), dataclasses.asdict(record))
