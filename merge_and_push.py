"""Merge the LoRA adapter finetune.py trained into its base model and publish the result on the Hugging Face Hub.

Steps 11-12 of the tutorial. Every setting below can be edited here or overridden on the command line:

    python merge_and_push.py --hub_repo you/llama-2-7b-mine   # merge, save locally, push (token: HF_TOKEN or `hf auth login`)
    python merge_and_push.py --no_push                        # merge and save locally only
    python merge_and_push.py --help                           # every setting with its default

The merged model is saved to --merged_dir first, then that folder is uploaded.
"""

import os
import sys
from dataclasses import dataclass

import torch
from huggingface_hub import HfApi, RepoUrl, get_token, interpreter_login
from huggingface_hub.utils import HFValidationError, validate_repo_id
from peft import PeftModel
from transformers import AutoModelForCausalLM

from common import ModelSettings, UserError, load_tokenizer, parse_settings, run_cli, setting


@dataclass
class Settings(ModelSettings):
    merged_dir: str = setting("", "folder the merged model is saved to (default: <new_model>-merged)")
    hub_repo: str = setting("", "Hub repo to push to, 'user/name' or 'name' (default: the new_model folder's name)")
    push: bool = setting(True, "upload the merged model; --no_push stops after the local save")
    private: bool = setting(False, "create the Hub repo as private")


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


def save_merged(model, tokenizer, merged_dir):
    model.save_pretrained(merged_dir)  # safetensors
    tokenizer.save_pretrained(merged_dir)
    print(f"merged model saved to {merged_dir}")


# Step 12. Push the merged model and tokenizer to the Hub
def push_folder(folder, repo_id, private):
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=url.repo_id, folder_path=folder, commit_message="Upload QLoRA fine-tuned model")
    print(f"pushed {folder} to {url}")


def main(argv=None):
    settings = parse_settings(Settings, argv)
    settings.merged_dir = settings.merged_dir or f"{settings.new_model.rstrip('/')}-merged"
    settings.hub_repo = settings.hub_repo or os.path.basename(settings.new_model.rstrip("/"))
    if settings.push:
        check_hub_login(settings)

    model = merge_adapter(settings)
    # The tokenizer finetune.py saved beside the adapter: the one the model was trained with
    tokenizer = load_tokenizer(settings.new_model, settings.trust_remote_code)
    save_merged(model, tokenizer, settings.merged_dir)

    if settings.push:
        push_folder(settings.merged_dir, settings.hub_repo, settings.private)


if __name__ == "__main__":
    run_cli(main)
