"""Merge the LoRA adapter finetune.py trained into its base model and publish the result on the Hugging Face Hub.

Steps 11-12 of the tutorial. Every setting below can be edited here or overridden on the command line:

    python merge_and_push.py --hub_repo you/llama-2-7b-mine   # merge, save locally, push (token: HF_TOKEN or `hf auth login`)
    python merge_and_push.py --no_push                        # merge and save locally only
    python merge_and_push.py --help                           # every setting with its default

The merged model is saved to --merged_dir first, checked against base + adapter (verification.json), given a model
card (README.md, training_loss.png), and only then is that folder uploaded.
"""

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from huggingface_hub import CommitOperationAdd, HfApi, RepoUrl, get_token, interpreter_login
from huggingface_hub.utils import HFValidationError, validate_repo_id
from peft import PeftModel
from transformers import AutoModelForCausalLM

import card
import finetune
from common import (
    ModelSettings,
    UserError,
    device_map_for,
    load_config,
    load_tokenizer,
    parse_settings,
    run_cli,
    setting,
)

VERIFICATION = "verification.json"


@dataclass
class Settings(ModelSettings):
    merged_dir: str = setting("", "folder the merged model is saved to (default: <new_model>-merged)")
    hub_repo: str = setting("", "Hub repo to push to, 'user/name' or 'name' (default: the new_model folder's name)")
    push: bool = setting(True, "upload the merged model; --no_push stops after the local save")
    private: bool = setting(False, "create the Hub repo as private")
    merge_base: str = setting(
        "nf4",
        "weights the adapter is merged into. nf4: the base's 4-bit NF4 weights the adapter was trained on, "
        "dequantized to fp16 (measured closest to the trained adapter: see README); fp16: the original fp16 "
        "weights (the tutorial's merge)",
        choices=["nf4", "fp16"],
    )
    verify_rows: int = setting(8, "rows of the data set the merged model is checked on against the adapter")
    verify_max_kl: float = setting(
        0.01, "largest mean KL divergence per token allowed between the merged model and base + adapter"
    )
    push_unverified: bool = setting(
        False, "push even when the merged model disagrees with the adapter beyond verify_max_kl (warns loudly)"
    )
    push_adapter: bool = setting(False, "also push the LoRA adapter, with its own card, to adapter_repo")
    adapter_repo: str = setting("", "Hub repo of the adapter (default: <hub_repo>-adapter)")


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


def read_training_info(adapter_dir):
    """What finetune.py recorded beside the adapter: its settings (the 4-bit set-up, the data), versions, losses."""
    path = os.path.join(adapter_dir, finetune.TRAINING_INFO)
    if not os.path.isfile(path):
        raise UserError(
            f"'{adapter_dir}' has no {finetune.TRAINING_INFO}: it was not written by this project's finetune.py. "
            "Check --new_model, or train the adapter again with finetune.py"
        )
    with open(path) as f:
        info = json.load(f)
    known = {field.name for field in dataclasses.fields(finetune.Settings)}
    return info, finetune.Settings(**{k: v for k, v in info["settings"].items() if k in known})


def load_4bit_base(train_settings):
    """The base model exactly as finetune.py trained on it: quantized to 4 bits by the same code and settings."""
    compute_dtype, _ = finetune.pick_precision(train_settings.precision)
    config = load_config(train_settings.model_name, train_settings.trust_remote_code)
    bnb_config = finetune.make_bnb_config(train_settings, compute_dtype)
    model = finetune.load_base_model(train_settings, bnb_config, device_map_for(train_settings.model_name, config))
    model.config.use_cache = True  # finetune.py turns it off for training; the published config must have it on
    return model


def load_dequantized_nf4_base(train_settings):
    """The 4-bit weights the adapter was trained against, dequantized to fp16 (transformers' dequantize() runs
    bitsandbytes' dequantize_4bit on every Linear4bit); the layers that were never quantized are cast to fp16 too."""
    return load_4bit_base(train_settings).dequantize(dtype=torch.float16).to(torch.float16)


def load_merge_base(settings, train_settings):
    """The fp16 base model the adapter is (or was) merged into, as merge_base says."""
    if settings.merge_base == "nf4":
        return load_dequantized_nf4_base(train_settings)
    return AutoModelForCausalLM.from_pretrained(
        settings.model_name,
        dtype=torch.float16,
        device_map="cuda" if torch.cuda.is_available() else "cpu",
        trust_remote_code=settings.trust_remote_code,
        use_safetensors=True,
    )


def merge_adapter_into_dequantized_nf4(settings, train_settings):
    model = PeftModel.from_pretrained(load_dequantized_nf4_base(train_settings), settings.new_model)
    return model.merge_and_unload()


def align_special_tokens(model, tokenizer):
    """config.json, generation_config.json and the tokenizer name the same eos and pad ids, so generation stops at
    the EOS the training rows end with. A generation config that lists several eos ids keeps them all (Llama 3 stops
    on either of two), as long as the tokenizer's is one of them."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.config.eos_token_id, model.config.pad_token_id = eos, pad
    generation = model.generation_config
    if not (isinstance(generation.eos_token_id, list) and eos in generation.eos_token_id):
        generation.eos_token_id = eos
    generation.pad_token_id = pad


# The Llama-2 chat format of finetune.llama2_prompt and of the tutorial's rows, `<s>[INST] q [/INST] a </s>`, for a
# tokenizer that has no chat template of its own: then `apply_chat_template` prompts the model as it was trained
LLAMA2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}"
    "{% else %}{{ raise_exception('only user and assistant messages are supported') }}{% endif %}"
    "{% endfor %}"
)


def set_chat_template(tokenizer):
    """Gives the tokenizer the training format as its chat template when it has none. Returns whether its template
    renders a question exactly as the training rows do (the model card shows the chat-template usage only then)."""
    if tokenizer.chat_template is None:
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    question = "What is 2 plus 2?"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return rendered == finetune.llama2_prompt(question)


def save_merged(model, tokenizer, merged_dir):
    model.save_pretrained(merged_dir)  # safetensors
    tokenizer.save_pretrained(merged_dir)
    print(f"merged model saved to {merged_dir}")


# After the merge: check the merged folder against the adapter the user means to publish
def verification_rows(dataset_name, n_rows):
    """A few rows picked with a fixed seed from the data set finetune.py trained on. finetune.py trains on every row
    for now, so these were seen in training; the merged-vs-adapter comparison does not need unseen rows."""
    dataset = finetune.load_rows(dataset_name)
    n_rows = min(n_rows, len(dataset) - 1)
    return dataset.train_test_split(test_size=n_rows, seed=0)["test"]["text"] if n_rows > 0 else dataset["text"]


def tokenize_rows(tokenizer, rows, max_length):
    """As SFTTrainer tokenizes a 'text' row: the tokenizer's own special tokens, an EOS appended when missing."""
    return [
        tokenizer(row if row.endswith(tokenizer.eos_token) else row + tokenizer.eos_token)["input_ids"][:max_length]
        for row in rows
    ]


def row_logits(model, rows_ids):
    """Each row's logits, in float32 on the CPU, so the next model can take the GPU's memory."""
    model.eval()
    with torch.no_grad():
        return [model(torch.tensor([ids], device=model.device)).logits[0].float().cpu() for ids in rows_ids]


def mean_loss(logits, rows_ids):
    """Next-token loss over every token of the rows, as the trainer computes it on a 'text' data set."""
    nll = [F.cross_entropy(lg[:-1], torch.tensor(ids[1:]), reduction="sum") for lg, ids in zip(logits, rows_ids)]
    return (sum(nll) / sum(len(ids) - 1 for ids in rows_ids)).item()


def mean_kl(reference, other):
    """KL(reference || other) per token, averaged over all tokens of the rows."""
    kl = [F.kl_div(o.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="none").sum(-1)
          for r, o in zip(reference, other)]  # fmt: skip
    return torch.cat(kl).mean().item()


def verify_merged(settings, info, train_settings, tokenizer):
    """Compares the merged model on disk with the base model plus the unmerged adapter in --new_model, in the same
    dtype, and measures the gap to the adapter on the 4-bit base it was trained on. One model at a time is loaded,
    so a GPU that fits the merged model fits this too. The numbers go to <merged_dir>/verification.json."""
    compute_dtype = torch.float16 if torch.cuda.is_available() else torch.float32  # fp32 compute on the CPU
    rows = verification_rows(train_settings.dataset_name, settings.verify_rows)
    rows_ids = tokenize_rows(tokenizer, rows, train_settings.max_length)

    merged = AutoModelForCausalLM.from_pretrained(
        settings.merged_dir, dtype=compute_dtype, device_map="cuda" if torch.cuda.is_available() else "cpu"
    )
    merged_logits = row_logits(merged, rows_ids)
    prompt, budget = train_settings.sample_prompt, train_settings.sample_max_new_tokens
    merged_answer = finetune.sample_answer(merged, tokenizer, prompt, budget)
    del merged  # each model is dropped before the next one loads
    unmerged = PeftModel.from_pretrained(load_merge_base(settings, train_settings).to(compute_dtype), settings.new_model)
    unmerged_logits = row_logits(unmerged, rows_ids)
    del unmerged
    trained_logits = row_logits(PeftModel.from_pretrained(load_4bit_base(train_settings), settings.new_model), rows_ids)

    report = {
        "merge_base": settings.merge_base,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "rows": len(rows_ids),
        "tokens": sum(len(ids) for ids in rows_ids),
        "max_abs_logit_diff": max((m - u).abs().max().item() for m, u in zip(merged_logits, unmerged_logits)),
        "mean_kl": mean_kl(unmerged_logits, merged_logits),
        "loss_merged": mean_loss(merged_logits, rows_ids),
        "loss_unmerged": mean_loss(unmerged_logits, rows_ids),
        "loss_4bit_adapter": mean_loss(trained_logits, rows_ids),
        "mean_kl_to_4bit_adapter": mean_kl(trained_logits, merged_logits),
        "max_kl": settings.verify_max_kl,
        "sample": {"prompt": prompt, "max_new_tokens": budget, "finetune_answer": info["sample"]["answer"],
                   "merged_answer": merged_answer},
    }  # fmt: skip
    report["passed"] = report["mean_kl"] <= settings.verify_max_kl
    with open(os.path.join(settings.merged_dir, VERIFICATION), "w") as f:
        json.dump(report, f, indent=2)
    return report


def print_verification(report):
    print(
        f"merged vs base + adapter on {report['rows']} rows: largest logit difference "
        f"{report['max_abs_logit_diff']:.4g}, mean KL {report['mean_kl']:.3g} (limit {report['max_kl']}), loss "
        f"{report['loss_merged']:.4f} vs {report['loss_unmerged']:.4f}; the adapter on the 4-bit base: loss "
        f"{report['loss_4bit_adapter']:.4f}, mean KL to the merged model {report['mean_kl_to_4bit_adapter']:.3g}"
    )
    sample = report["sample"]
    print(f"{sample['prompt']}\nfinetune.py (adapter, 4-bit base) >>> {sample['finetune_answer']}")
    print(f"merged model                     >>> {sample['merged_answer']}")


def check_verification(report, settings):
    """Refuses to go on (and so to push) when the merged model is not the adapter, unless push_unverified says so."""
    if report["passed"]:
        return
    problem = (
        f"the merged model in '{settings.merged_dir}' does not behave like base + the adapter in "
        f"'{settings.new_model}': mean KL {report['mean_kl']:.3g} > verify_max_kl {settings.verify_max_kl} "
        f"(numbers in {os.path.join(settings.merged_dir, VERIFICATION)})"
    )
    if not settings.push_unverified:
        raise UserError(f"{problem}. Nothing was pushed. Merge again, or pass --push_unverified to push it anyway")
    print(f"WARNING: {problem}. --push_unverified is set: pushing it anyway.", file=sys.stderr)


def write_merged_card(settings, info, report, chat_template_matches):
    card.plot_training_loss(info["log_history"], os.path.join(settings.merged_dir, card.LOSS_PLOT))
    model_card = card.merged_model_card(info, report, settings.hub_repo, chat_template_matches)
    model_card.save(os.path.join(settings.merged_dir, "README.md"))


# Step 12. Push the merged model and tokenizer to the Hub
def push_folder(folder, repo_id, private):
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=url.repo_id, folder_path=folder, commit_message="Upload QLoRA fine-tuned model")
    print(f"pushed {folder} to {url}")


def push_adapter_folder(settings, info, report):
    """The adapter folder as finetune.py saved it, in one commit, with its own card and the loss plot; the card peft
    wrote there and trainer's pickled training_args.bin stay local (training_info.json holds the settings)."""
    api = HfApi()
    url = api.create_repo(settings.adapter_repo, private=settings.private, exist_ok=True)
    model_card = card.adapter_model_card(info, report, url.repo_id, settings.hub_repo)
    files = sorted(set(os.listdir(settings.new_model)) - {"README.md", "training_args.bin"})
    operations = [CommitOperationAdd(name, os.path.join(settings.new_model, name)) for name in files] + [
        CommitOperationAdd("README.md", str(model_card).encode()),
        CommitOperationAdd(card.LOSS_PLOT, os.path.join(settings.merged_dir, card.LOSS_PLOT)),
    ]
    api.create_commit(url.repo_id, operations=operations, commit_message="Upload QLoRA adapter")
    print(f"pushed the adapter {settings.new_model} to {url}")


def main(argv=None):
    settings = parse_settings(Settings, argv)
    settings.merged_dir = settings.merged_dir or f"{settings.new_model.rstrip('/')}-merged"
    settings.hub_repo = settings.hub_repo or os.path.basename(settings.new_model.rstrip("/"))
    settings.adapter_repo = settings.adapter_repo or f"{settings.hub_repo}-adapter"
    if settings.push:
        check_hub_login(settings)
    info, train_settings = read_training_info(settings.new_model)

    if settings.merge_base == "nf4":
        model = merge_adapter_into_dequantized_nf4(settings, train_settings)
    else:
        model = merge_adapter(settings)
    # The tokenizer finetune.py saved beside the adapter: the one the model was trained with
    tokenizer = load_tokenizer(settings.new_model, settings.trust_remote_code)
    align_special_tokens(model, tokenizer)
    chat_template_matches = set_chat_template(tokenizer)
    save_merged(model, tokenizer, settings.merged_dir)
    del model  # verification loads the saved folder back, as the Hub will serve it

    report = verify_merged(settings, info, train_settings, tokenizer)
    print_verification(report)
    write_merged_card(settings, info, report, chat_template_matches)
    check_verification(report, settings)

    if settings.push:
        push_folder(settings.merged_dir, settings.hub_repo, settings.private)
        if settings.push_adapter:
            push_adapter_folder(settings, info, report)


if __name__ == "__main__":
    run_cli(main)
