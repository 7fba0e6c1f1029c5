"""Merge the LoRA adapter finetune.py trained into its base model and publish the result on the Hugging Face Hub.

Steps 11-12 of the tutorial. Every setting below can be edited here or overridden on the command line:

    python merge_and_push.py --hub_repo you/llama-2-7b-mine   # merge, save locally, push (token: HF_TOKEN or `hf auth login`)
    python merge_and_push.py --no_push                        # merge and save locally only
    python merge_and_push.py --help                           # every setting with its default

The merged model is saved to --merged_dir first, then that folder is uploaded.
"""

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass

import torch
from huggingface_hub import HfApi, RepoUrl, get_token, interpreter_login
from huggingface_hub.utils import HFValidationError, validate_repo_id
from peft import PeftModel
from transformers import AutoModelForCausalLM

from common import (
    ModelSettings,
    UserError,
    count_parameters,
    folder_written_whole,
    load_config,
    load_tokenizer,
    parse_settings,
    run_cli,
    setting,
)

# Written last into the merged folder: which adapter it was merged from. A folder that has it, with today's adapter,
# is complete and current: a rerun (after a failed upload) pushes it as it is.
MERGE_SOURCE_FILE = "merge_source.json"


@dataclass
class Settings(ModelSettings):
    merged_dir: str = setting("", "folder the merged model is saved to (default: <new_model>-merged)")
    hub_repo: str = setting("", "Hub repo to push to, 'user/name' or 'name' (default: the new_model folder's name)")
    push: bool = setting(True, "upload the merged model; --no_push stops after the local save")
    private: bool = setting(False, "create the Hub repo as private")
    overwrite_merged: bool = setting(False, "replace what merged_dir holds: another run's merge, or other files")


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
        trained_on = json.load(f).get("base_model_name_or_path")
    if not same_model(trained_on, settings.model_name):
        raise UserError(
            f"the adapter in '{settings.new_model}' was trained on '{trained_on}', not on '{settings.model_name}': "
            f"pass --model_name {trained_on}"
        )


def same_model(a, b):
    """One Hub id or one folder, however the path to it is spelled."""
    return a == b or (os.path.isdir(a or "") and os.path.isdir(b) and os.path.samefile(a, b))


def merge_source(settings):
    """What a merge is made from: the adapter's bytes (its config names the base model, checked to be this one)."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(os.path.join(settings.new_model, name), "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return {"adapter_sha256": digest.hexdigest()}


def merged_dir_is_current(settings, source):
    """True: merged_dir is a complete merge of this base model and adapter. False: it is free to write.
    Anything else in it stops the run, unless --overwrite_merged."""
    folder = settings.merged_dir
    if not os.path.isdir(folder) or not os.listdir(folder) or settings.overwrite_merged:
        return False
    try:
        with open(os.path.join(folder, MERGE_SOURCE_FILE)) as f:
            if json.load(f) == source:
                return True
        what = "a merge of another adapter"
    except (OSError, ValueError):
        what = "files that are no merge this script completed"
    raise UserError(
        f"'{folder}' already holds {what}: pass --overwrite_merged to replace it, or another --merged_dir"
    )


def check_disk_space(settings, config):
    """The merged model is written in fp16: 2 bytes a parameter, next to the folder it replaces."""
    needed = count_parameters(config) * 2
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


# Step 11. Reload the base model in fp16, attach the adapter and merge it in
def merge_adapter(settings):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base_model = AutoModelForCausalLM.from_pretrained(
        settings.model_name,
        dtype=torch.float16,
        device_map=device,
        trust_remote_code=settings.trust_remote_code,
        use_safetensors=True,
    )
    model = PeftModel.from_pretrained(base_model, settings.new_model)
    return model.merge_and_unload()


def save_merged(model, tokenizer, merged_dir, source):
    with folder_written_whole(merged_dir) as folder:  # a crash mid-save leaves no half model to push
        model.save_pretrained(folder)  # safetensors
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, MERGE_SOURCE_FILE), "w") as f:
            json.dump(source, f, indent=1)
    print(f"merged model saved to {merged_dir}")


# Step 12. Push the merged model and tokenizer to the Hub
def push_folder(folder, repo_id, private):
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    # With hf_xet (a huggingface_hub dependency), rerunning an interrupted upload_folder resumes it: files already
    # committed are skipped, chunks already uploaded are not sent again
    try:
        api.upload_folder(
            repo_id=url.repo_id,
            folder_path=folder,
            commit_message="Upload QLoRA fine-tuned model",
            ignore_patterns=[MERGE_SOURCE_FILE],  # local bookkeeping
        )
    except OSError as error:  # HfHubHTTPError and network errors are OSErrors
        raise UserError(
            f"the upload of {folder} to {url.repo_id} failed ({str(error).splitlines()[0]}): rerun the same command "
            "to resume it; the merged folder is kept and pushed as it is"
        ) from None
    print(f"pushed {folder} to {url}")


def main(argv=None):
    settings = parse_settings(Settings, argv)
    settings.merged_dir = settings.merged_dir or f"{settings.new_model.rstrip('/')}-merged"
    settings.hub_repo = settings.hub_repo or os.path.basename(settings.new_model.rstrip("/"))
    check_adapter(settings)
    if settings.push:
        check_hub_login(settings)
    source = merge_source(settings)

    if merged_dir_is_current(settings, source):
        print(f"{settings.merged_dir} is a complete merge of this adapter: using it, not merging again")
    else:
        check_disk_space(settings, load_config(settings.model_name, settings.trust_remote_code))
        model = merge_adapter(settings)
        # The tokenizer finetune.py saved beside the adapter: the one the model was trained with
        tokenizer = load_tokenizer(settings.new_model, settings.trust_remote_code)
        save_merged(model, tokenizer, settings.merged_dir, source)

    if settings.push:
        push_folder(settings.merged_dir, settings.hub_repo, settings.private)


if __name__ == "__main__":
    run_cli(main)
