"""Merge the LoRA adapter finetune.py trained into its base model and publish the result on the Hugging Face Hub.

Steps 11-12 of the tutorial. Every setting below can be edited here or overridden on the command line:

    python merge_and_push.py --hub_repo you/llama-2-7b-mine   # merge, save locally, push (token: HF_TOKEN or `hf auth login`)
    python merge_and_push.py --no_push                        # merge and save locally only
    python merge_and_push.py --help                           # every setting with its default

The adapter is merged into the dequantized NF4 weights and into the original fp16 weights, each measured in memory on
the held-out rows, and the merge of the lower held-out loss is saved to --merged_dir (--merge_base forces one). That
folder is checked against base + adapter and against the base model's held-out loss (verification.json), given a
model card (README.md, training_loss.png), and only then uploaded.
"""

import hashlib
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import startup

startup.before_the_imports(as_script=__name__ == "__main__")  # Ctrl-C while loading, and the libraries' noise

import httpx2  # huggingface_hub's HTTP client: its connection errors are not OSErrors
import torch
import torch.nn.functional as F
from huggingface_hub import CommitOperationAdd, HfApi
from peft import PeftModel
from transformers import AutoModelForCausalLM

import card
import data
import gguf_export
import safeguards
from common import (
    TRAINING_INFO,
    VERIFICATION,
    ModelSettings,
    Verification,
    UserError,
    check_model_weights,
    device_map_for,
    folder_written_whole,
    load_config,
    load_tokenizer,
    parse_settings,
    read_training_info,
    read_verification,
    run_cli,
    setting,
    write_record,
)
from qlora import (
    ATTENTION,
    PRECISIONS,
    QUANT_TYPES,
    count_loss_tokens,
    heldout_loss,
    load_base_model,
    make_bnb_config,
    pick_precision,
    sample_answer,
)

startup.after_the_imports(as_script=__name__ == "__main__")

# Written last into the merged folder: which adapter it was merged from. A folder that has it, with today's adapter,
# is complete and current: a rerun (after a failed upload) pushes it as it is.
MERGE_SOURCE_FILE = "merge_source.json"
# The weights an adapter can be merged into, as the summary and the card name them
MERGE_BASES = {"nf4": "dequantized NF4 weights", "fp16": "original fp16 weights"}


@dataclass
class Settings(ModelSettings):
    merged_dir: str = setting("", "folder the merged model is saved to (default: <new_model>-merged)")
    hub_repo: str = setting("", "Hub repo to push to, 'user/name' or 'name' (default: the new_model folder's name)")
    push: bool = setting(True, "upload the merged model; --no_push stops after the local save")
    private: bool = setting(False, "create the Hub repo as private")
    overwrite_merged: bool = setting(False, "replace what merged_dir holds: another run's merge, or other files")
    merge_base: str = setting(
        "auto",
        "weights the adapter is merged into. auto: both merges are made in memory and measured on the held-out rows, "
        "and the one with the lower held-out loss is saved (see README); nf4: the base's 4-bit NF4 weights the "
        "adapter was trained on, dequantized to fp16; fp16: the original fp16 weights (the tutorial's merge)",
        choices=["auto", *MERGE_BASES],
    )
    verify_rows: int = setting(
        8, "held-out rows on which the merged model's logits are compared with base + adapter (the held-out loss "
        "is measured on all of them)"
    )
    verify_max_kl: float = setting(
        0.01, "largest mean KL divergence per token allowed between the merged model and base + adapter"
    )
    push_unverified: bool = setting(
        False, "push even when the merged model disagrees with the adapter beyond verify_max_kl, or scores a higher "
        "held-out loss than the base model (warns loudly)"
    )
    push_adapter: bool = setting(False, "also push the LoRA adapter, with its own card, to adapter_repo")
    adapter_repo: str = setting("", "Hub repo of the adapter (default: <hub_repo>-adapter)")
    gguf: str = setting(
        "", "also export GGUF files for llama.cpp and Ollama, checked against the merged model: comma-separated, "
        f"out of {', '.join(gguf_export.GGUF_TYPES)} (e.g. q8_0 or f16,q4_k_m; needs llama-cpp-python)"
    )
    gguf_dir: str = setting("", "folder the GGUF files and the Modelfile are written to (default: <merged_dir>-gguf)")
    gguf_same_repo: bool = setting(False, "push the GGUF files into hub_repo itself, not into <hub_repo>-GGUF")


def merge_source(settings):
    """What a merge is made from: the adapter's bytes (its config names the base model, checked to be this one)."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(os.path.join(settings.new_model, name), "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return {"adapter_sha256": digest.hexdigest()}


def merged_dir_is_current(settings, source):
    """The weights merged_dir's complete merge of this adapter went into ('nf4' or 'fp16'), or None: it is free to
    write. Anything else in it (another adapter's merge, the other merge than --merge_base asks for, other files)
    stops the run, unless --overwrite_merged."""
    folder = settings.merged_dir
    if not os.path.isdir(folder) or not os.listdir(folder) or settings.overwrite_merged:
        return None
    try:
        with open(os.path.join(folder, MERGE_SOURCE_FILE)) as f:
            recorded = json.load(f)
        merged_into = recorded.pop("merge_base", None)
        if recorded != source:
            what = "a merge of another adapter"
        elif merged_into not in MERGE_BASES:
            what = "a merge of this adapter by an earlier version, which did not record the weights it went into"
        elif settings.merge_base in ("auto", merged_into):
            return merged_into
        else:
            what = f"this adapter merged into the {MERGE_BASES[merged_into]}, not the {settings.merge_base} merge"
    except (OSError, ValueError):
        what = "files that are no merge this script completed"
    raise UserError(
        f"'{folder}' already holds {what}: pass --overwrite_merged to replace it, or another --merged_dir"
    )


# The recorded settings merge_and_push.py takes from training_info.json, and the values each may hold: the file is
# input (from the Hub, or a colleague), and an attention implementation can name a kernel from the Hub, which is code
RECORDED_CHOICES = {
    "precision": PRECISIONS,
    "bnb_4bit_quant_type": QUANT_TYPES,
    "attn_implementation": ATTENTION,
    "loss_on": data.LOSS_ON,
}


def train_settings_for(settings, info):
    """The settings the base model is loaded with: the 4-bit set-up and the data as finetune.py recorded them, but the
    model and trust_remote_code as this command says. The adapter folder is input (from the Hub, or a colleague):
    nothing in it may turn on remote code or load another model than the --model_name checked against it."""
    recorded = info.settings
    for name, choices in RECORDED_CHOICES.items():
        if recorded.get(name) not in choices:
            raise UserError(
                f"'{os.path.join(settings.new_model, TRAINING_INFO)}' records {name} '{recorded.get(name)}', which "
                f"finetune.py does not take ({', '.join(choices)}): train the adapter again with finetune.py"
            )
    return SimpleNamespace(**{**recorded, "model_name": settings.model_name,
                              "trust_remote_code": settings.trust_remote_code})  # fmt: skip


def load_4bit_base(train_settings):
    """The base model exactly as finetune.py trained on it: quantized to 4 bits by the same code and settings."""
    compute_dtype, _ = pick_precision(train_settings.precision)
    bnb_config = make_bnb_config(train_settings, compute_dtype)
    model = load_base_model(train_settings, bnb_config, device_map_for())
    model.config.use_cache = True  # finetune.py turns it off for training; the published config must have it on
    return model


def load_dequantized_nf4_base(train_settings):
    """The 4-bit weights the adapter was trained against, dequantized to fp16 (transformers' dequantize() runs
    bitsandbytes' dequantize_4bit on every Linear4bit); the layers that were never quantized are cast to fp16 too."""
    return load_4bit_base(train_settings).dequantize(dtype=torch.float16).to(torch.float16)


def load_merge_base(settings, train_settings, merge_base):
    """The fp16 base model the adapter is (or was) merged into: 'nf4' or 'fp16'."""
    if merge_base == "nf4":
        return load_dequantized_nf4_base(train_settings)
    return AutoModelForCausalLM.from_pretrained(
        settings.model_name,
        dtype=torch.float16,
        device_map="cuda" if torch.cuda.is_available() else "cpu",
        trust_remote_code=settings.trust_remote_code,
        use_safetensors=True,
    )


# Step 11. Reload the base model in fp16, attach the adapter and merge it in
def merge_adapter(settings, train_settings, merge_base):
    return merge_into(load_merge_base(settings, train_settings, merge_base), settings.new_model)


def merge_into(base_model, adapter):
    return PeftModel.from_pretrained(base_model, adapter).merge_and_unload()


# Which weights to merge into: both merges measured in memory on the held-out rows, only the one chosen is saved
def compute_dtype():
    return torch.float16 if torch.cuda.is_available() else torch.float32  # fp32 compute on the CPU


def scoring_rows(settings, train_settings, tokenizer):
    """(rows, what they are): the rows finetune.py held out from training (its eval split, rebuilt from
    its own settings), as the trainer scores them, (ids, labels) with its loss mask; finetune.py measured its
    before and after losses on the same. With no eval set (--eval_fraction 0), the first verify_rows training rows."""
    train_rows, eval_rows = data.load_splits(train_settings)
    rows = eval_rows if eval_rows is not None else train_rows.select(range(min(settings.verify_rows, len(train_rows))))
    shape = data.detect_shape(
        rows.column_names, train_settings.text_column, train_settings.prompt_column, train_settings.response_column
    )
    answers_only = data.answers_only_for(shape, train_settings.loss_on)
    rows = data.loss_rows(data.rows_in_shape(rows, shape), tokenizer, answers_only, train_settings.max_length)
    return rows, {"rows_from": "held-out" if eval_rows is not None else "training", "rows": len(rows),
                  "tokens": count_loss_tokens(rows), "loss_on": "answers" if answers_only else "all"}  # fmt: skip


def loss_in_compute_dtype(model, rows):
    """The held-out loss of an fp16 model in the compute dtype, as the saved folder is measured when loaded back;
    cast back to fp16 after, which is exact (every weight came from fp16)."""
    loss = heldout_loss(model.to(compute_dtype()), rows)
    model.to(torch.float16)
    return loss


def measure_merges(settings, train_settings, rows, merges):
    """{base: {"loss_base": the held-out loss of those weights (the adapter off), "loss_merged": of the adapter
    merged into them}} for each base in merges, plus the original fp16 weights' loss, which the published model must
    beat. Merged in memory, one model at a time: nothing is written, so measuring two merges takes no more disk."""
    measured = {}
    for base in dict.fromkeys([*merges, "fp16"]):
        model = load_merge_base(settings, train_settings, base)
        measured[base] = {"loss_base": loss_in_compute_dtype(model, rows)}
        if base in merges:
            model = merge_into(model, settings.new_model)
            measured[base]["loss_merged"] = loss_in_compute_dtype(model, rows)
        del model
    return measured


def choose_merge(settings, measured):
    """(merge base, why): the one --merge_base names, or with auto the merge of the lower held-out loss (on a tie,
    nf4, the weights the adapter was trained on)."""
    if settings.merge_base != "auto":
        return settings.merge_base, f"--merge_base {settings.merge_base}"
    loss = {base: measured[base]["loss_merged"] for base in MERGE_BASES}
    best = min(MERGE_BASES, key=loss.get)
    other = next(base for base in MERGE_BASES if base != best)
    return best, (
        f"merge_base auto: the lower held-out loss, {loss[best]:.4f} merged into the {MERGE_BASES[best]} against "
        f"{loss[other]:.4f} into the {MERGE_BASES[other]}"
    )


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


@contextmanager
def disk_errors(what, folder):
    """A write that fails (a full disk) ends in one line; folder_written_whole has removed the half-written copy."""
    try:
        yield
    except OSError as error:
        raise UserError(
            f"writing {what} to '{folder}' failed ({error.strerror or error}): free some space or choose another "
            "--merged_dir, then rerun; what was there before is kept"
        ) from None


def save_merged(model, tokenizer, merged_dir, source):
    with disk_errors("the merged model", merged_dir), folder_written_whole(merged_dir) as folder:
        # a crash mid-save leaves no half model to push
        model.save_pretrained(folder)  # safetensors
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, MERGE_SOURCE_FILE), "w") as f:
            json.dump(source, f, indent=1)
    print(f"merged model saved to {merged_dir}")


# After the merge: check the merged folder against the adapter the user means to publish
def row_logits(model, rows_ids):
    """Each row's logits, in float32 on the CPU, so the next model can take the GPU's memory."""
    model.eval()
    with torch.no_grad():
        return [model(torch.tensor([ids], device=model.device)).logits[0].float().cpu() for ids in rows_ids]


def mean_kl(reference, other):
    """KL(reference || other) per token, averaged over all tokens of the rows."""
    kl = [F.kl_div(o.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="none").sum(-1)
          for r, o in zip(reference, other)]  # fmt: skip
    return torch.cat(kl).mean().item()


def verify_merged(settings, info, train_settings, tokenizer, rows, merge):
    """Measures the merged model on disk, as the Hub will serve it: its held-out loss on `rows`, and its logits on the
    first verify_rows of them against the base model plus the unmerged adapter in --new_model, in the same dtype,
    and against the adapter on the 4-bit base it was trained on. Both sample answers come from the models named, on
    paths checked here: the merged folder, and the 4-bit base loaded with bitsandbytes' CPU repacking off
    (qlora.keep_4bit_weights_as_loaded). One model at a time is loaded, so a GPU that fits the merged model fits
    this too. `merge` holds the choice and measure_merges' numbers; all goes to <merged_dir>/verification.json."""
    dtype, device = compute_dtype(), "cuda" if torch.cuda.is_available() else "cpu"
    rows_ids = [ids for ids, _ in rows[: settings.verify_rows]]
    prompt, budget = train_settings.sample_prompt, train_settings.sample_max_new_tokens

    def answer(model):
        return sample_answer(model, tokenizer, prompt, budget) if budget > 0 else None  # 0: no sample

    merged = AutoModelForCausalLM.from_pretrained(
        settings.merged_dir, dtype=dtype, device_map=device, trust_remote_code=settings.trust_remote_code,
        use_safetensors=True,
    )
    merged_logits, loss_merged = row_logits(merged, rows_ids), heldout_loss(merged, rows)
    merged_answer = answer(merged)
    del merged  # each model is dropped before the next one loads
    base = load_merge_base(settings, train_settings, merge["base"]).to(dtype)
    unmerged = PeftModel.from_pretrained(base, settings.new_model)
    unmerged_logits, loss_unmerged = row_logits(unmerged, rows_ids), heldout_loss(unmerged, rows)
    del base, unmerged
    trained = PeftModel.from_pretrained(load_4bit_base(train_settings), settings.new_model)
    trained_logits, loss_trained = row_logits(trained, rows_ids), heldout_loss(trained, rows)
    adapter_answer = answer(trained)
    del trained

    report = Verification(
        merge_base=merge["base"],
        merged_into=MERGE_BASES[merge["base"]],
        merge_choice=merge["why"],
        compute_dtype=str(dtype).removeprefix("torch."),
        heldout=merge["heldout"],
        loss_base=merge["measured"]["fp16"]["loss_base"],  # the original weights: what the user started from
        loss_merged=loss_merged,
        loss_unmerged=loss_unmerged,
        loss_4bit_adapter=loss_trained,
        merges=merge["measured"],
        finetune=info.heldout_loss,  # finetune.py's own before and after, on the same rows
        rows=len(rows_ids),
        tokens=sum(len(ids) for ids in rows_ids),
        max_abs_logit_diff=max((m - u).abs().max().item() for m, u in zip(merged_logits, unmerged_logits)),
        mean_kl=mean_kl(unmerged_logits, merged_logits),
        mean_kl_to_4bit_adapter=mean_kl(trained_logits, merged_logits),
        max_kl=settings.verify_max_kl,
        sample={"prompt": prompt, "max_new_tokens": budget, "merged_answer": merged_answer,
                "adapter_answer": adapter_answer},
        passed=False,
        beats_base=loss_merged <= merge["measured"]["fp16"]["loss_base"],
        heldout_losses=[],
    )  # fmt: skip
    report.passed = report.mean_kl <= settings.verify_max_kl
    report.heldout_losses = heldout_table(report)  # what the summary prints and the card shows
    write_record(settings.merged_dir, VERIFICATION, report)  # read back by a rerun
    return report


def heldout_table(report):
    """(what, held-out loss) of every model measured, the base first and the published model last."""
    merges, before_after = report.merges, report.finetune or {}
    lines = [("the base model, original weights", report.loss_base)]
    if before_after:
        lines += [
            ("the base model in 4 bits, before training (finetune.py)", before_after["before_training"]),
            ("the adapter on the 4-bit base, after training (finetune.py)", before_after["after_training"]),
        ]
    lines.append(("the adapter on the 4-bit base, loaded again", report.loss_4bit_adapter))
    lines += [(f"merged into the {MERGE_BASES[base]}", merges[base]["loss_merged"])
              for base in MERGE_BASES if "loss_merged" in merges.get(base, {})]  # fmt: skip
    lines.append((f"published: the {report.merge_base} merge, saved and loaded back", report.loss_merged))
    return lines


def print_verification(report):
    heldout = report.heldout
    print(f"merged into the {report.merged_into}: {report.merge_choice}")
    print(f"held-out loss on {heldout['rows']} {heldout['rows_from']} rows ({heldout['tokens']} tokens, loss on "
          f"{heldout['loss_on']}, compute in {report.compute_dtype}):")  # fmt: skip
    for what, loss in report.heldout_losses:
        print(f"  {what:<62} {loss:.4f}")
    print(
        f"merged vs base + adapter on {report.rows} rows: largest logit difference "
        f"{report.max_abs_logit_diff:.4g}, mean KL {report.mean_kl:.3g} (limit {report.max_kl}); mean KL "
        f"to the adapter on the 4-bit base {report.mean_kl_to_4bit_adapter:.3g}"
    )
    sample = report.sample
    if sample["merged_answer"] is not None:  # sample_max_new_tokens 0 asks for none
        print(f"{sample['prompt']}\nthe adapter on the 4-bit base >>> {sample['adapter_answer']}")
        print(f"the merged model              >>> {sample['merged_answer']}")


def verification_problems(report, settings):
    """What stops the push: a merged model that is not base + the adapter, or is worse than the base model."""
    problems = []
    if report.mean_kl > settings.verify_max_kl:  # today's limit, also for a report of an earlier run
        problems.append(
            f"the merged model in '{settings.merged_dir}' does not behave like base + the adapter in "
            f"'{settings.new_model}': mean KL {report.mean_kl:.3g} > verify_max_kl {settings.verify_max_kl}"
        )
    if not report.beats_base:
        heldout = report.heldout
        problems.append(
            f"the merged model's held-out loss is {report.loss_merged:.4f}, above the base model's "
            f"{report.loss_base:.4f} ({heldout['rows']} {heldout['rows_from']} rows): it is worse than the model "
            "you started from"
        )
    return problems


def check_verification(report, settings):
    """Refuses to go on (and so to push) when the merged model is not the adapter or is worse than the base model,
    unless push_unverified says so."""
    problems = verification_problems(report, settings)
    if not problems:
        return
    problem = f"{'; '.join(problems)} (numbers in {os.path.join(settings.merged_dir, VERIFICATION)})"
    if not settings.push_unverified:
        raise UserError(
            f"{problem}. Nothing was pushed. Train again (more steps, another learning rate), merge again, or pass "
            "--push_unverified to push it anyway"
        )
    print(f"WARNING: {problem}. --push_unverified is set: pushing it anyway.", file=sys.stderr)


def write_merged_card(settings, info, report, tokenizer):
    with disk_errors("the model card", settings.merged_dir):
        write_card_files(settings, info, report, tokenizer)


def write_card_files(settings, info, report, tokenizer):
    card.plot_training_loss(info.log_history, os.path.join(settings.merged_dir, card.LOSS_PLOT))
    model_card = card.merged_model_card(info, report, settings.hub_repo, lambda question: data.prompt_text(tokenizer, question))
    model_card.save(os.path.join(settings.merged_dir, "README.md"))


# Step 12. Push the merged model and tokenizer to the Hub
@contextmanager
def hub_errors(folder, repo_id):
    """Any failure of a Hub call (an HTTP error, a refused or dropped connection) ends in one line: the merged folder
    stays, and the rerun pushes it without merging again."""
    try:
        yield
    except (OSError, httpx2.HTTPError) as error:  # HfHubHTTPError is both; httpx2's transport errors are neither
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        server_says = getattr(error, "server_message", None)  # the Hub's own words, where it answered
        if server_says:
            first_line += f": {server_says.strip().splitlines()[0]}"
        raise UserError(
            f"the upload of {folder} to {repo_id} failed ({first_line}): check your network and token, then rerun "
            "the same command to resume it; the merged folder is kept and pushed as it is"
        ) from None


def push_folder(folder, repo_id, private):
    api = HfApi()
    with hub_errors(folder, repo_id):
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        # With hf_xet (a huggingface_hub dependency), rerunning an interrupted upload_folder resumes it: files
        # already committed are skipped, chunks already uploaded are not sent again
        api.upload_folder(
            repo_id=url.repo_id,
            folder_path=folder,
            commit_message="Upload QLoRA fine-tuned model",
            ignore_patterns=[MERGE_SOURCE_FILE],  # local bookkeeping
        )
    print(f"pushed {folder} to {url}")


def push_adapter_folder(settings, info, report, tokenizer):
    """The adapter folder as finetune.py saved it, in one commit, with its own card and the loss plot; the card peft
    wrote there and trainer's pickled training_args.bin stay local (training_info.json holds the settings)."""
    api = HfApi()
    with hub_errors(settings.new_model, settings.adapter_repo):
        url = api.create_repo(settings.adapter_repo, private=settings.private, exist_ok=True)
        model_card = card.adapter_model_card(info, report, url.repo_id, settings.hub_repo, lambda question: data.prompt_text(tokenizer, question))
        files = sorted(set(os.listdir(settings.new_model)) - {"README.md", "training_args.bin"})
        operations = [CommitOperationAdd(name, os.path.join(settings.new_model, name)) for name in files] + [
            CommitOperationAdd("README.md", str(model_card).encode()),
            CommitOperationAdd(card.LOSS_PLOT, os.path.join(settings.merged_dir, card.LOSS_PLOT)),
        ]
        api.create_commit(url.repo_id, operations=operations, commit_message="Upload QLoRA adapter")
    print(f"pushed the adapter {settings.new_model} to {url}")


def main(argv=None):
    """Steps 11-12 with the settings above, after the checks that would otherwise stop them halfway."""
    settings = parse_settings(Settings, argv)
    settings.merged_dir = settings.merged_dir or f"{settings.new_model.rstrip('/')}-merged"
    settings.hub_repo = settings.hub_repo or os.path.basename(settings.new_model.rstrip("/"))
    settings.adapter_repo = settings.adapter_repo or f"{settings.hub_repo}-adapter"
    safeguards.check_merge_settings(settings)
    settings.gguf_dir = settings.gguf_dir or f"{settings.merged_dir.rstrip('/')}-gguf"  # GGUF export
    settings.gguf_repo = settings.hub_repo if settings.gguf_same_repo else f"{settings.hub_repo}-GGUF"
    safeguards.check_adapter(settings)
    safeguards.check_merged_dir(settings)
    if settings.push:
        safeguards.check_hub_login(settings)
    info = read_training_info(settings.new_model)
    train_settings = train_settings_for(settings, info)
    config = load_config(settings.model_name, settings.trust_remote_code)
    check_model_weights(settings.model_name)
    source = merge_source(settings)
    # The tokenizer finetune.py saved beside the adapter: the one the model was trained with, chat template included
    tokenizer = load_tokenizer(settings.new_model, settings.trust_remote_code)
    # GGUF export (gguf_export.py): its checks, before the merge
    settings.gguf_types = gguf_export.requested_types(settings.gguf)
    settings.gguf_make = gguf_export.check_gguf_request(settings, tokenizer) if settings.gguf_types else []

    # Step 11. Reload the base model in fp16, attach the adapter, merge_and_unload: into whichever weights (the
    # original fp16 ones, or the dequantized NF4 ones it was trained on) give the lower held-out loss, unless a merge
    # of this adapter is already saved. Then the saved folder is checked and given its card
    rows, heldout = scoring_rows(settings, train_settings, tokenizer)
    merged_into = merged_dir_is_current(settings, source)
    if merged_into:
        print(f"{settings.merged_dir} is a complete merge of this adapter: using it, not merging again")
        merge = {"base": merged_into, "why": "the merge saved by an earlier run", "measured": None}
    else:
        safeguards.check_disk_space(settings, config)
        merges = list(MERGE_BASES) if settings.merge_base == "auto" else [settings.merge_base]
        measured = measure_merges(settings, train_settings, rows, merges)
        base, why = choose_merge(settings, measured)
        print(f"merging into the {MERGE_BASES[base]}")
        merge = {"base": base, "why": why, "measured": measured}
        model = merge_adapter(settings, train_settings, base)  # merged again: only one model is kept in memory
        align_special_tokens(model, tokenizer)
        save_merged(model, tokenizer, settings.merged_dir, {**source, "merge_base": base})
        del model  # verification loads the saved folder back, as the Hub will serve it

    report = read_verification(settings.merged_dir)
    if report is None:
        merge["measured"] = merge["measured"] or measure_merges(settings, train_settings, rows, [])
        report = verify_merged(settings, info, train_settings, tokenizer, rows, {**merge, "heldout": heldout})
    print_verification(report)
    write_merged_card(settings, info, report, tokenizer)
    check_verification(report, settings)
    if settings.gguf_make:  # GGUF export (gguf_export.py): convert, check against the merged folder, Modelfile, card
        rows_ids = [ids for ids, _ in rows[: settings.verify_rows]]  # the rows the merged folder was checked on
        gguf_report = gguf_export.export_gguf(settings, info, train_settings, tokenizer, source, rows_ids)
        gguf_export.check_gguf_verification(gguf_report, settings)

    # Step 12. Push the merged model and tokenizer to the Hub (and the adapter, and the GGUF files, where asked)
    if settings.push:
        push_folder(settings.merged_dir, settings.hub_repo, settings.private)
        if settings.push_adapter:
            push_adapter_folder(settings, info, report, tokenizer)
        if settings.gguf_make:  # GGUF export (gguf_export.py)
            gguf_export.push_gguf(settings)


if __name__ == "__main__":
    run_cli(main)
