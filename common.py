"""What finetune.py and merge_and_push.py share: the settings they both name, the command line, the tokenizer
set-up, the choice of device, and the one-line error a user sees instead of a traceback."""

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
