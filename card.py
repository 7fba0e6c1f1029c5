"""The model cards merge_and_push.py publishes: the merged model's and the adapter's README.md, with the training-loss
plot, built from what finetune.py saved beside the adapter (training_info.json) and the merge's verification numbers.

huggingface_hub's ModelCard and ModelCardData write the YAML front matter the Hub reads; the text below it is ours."""

import os

import matplotlib

matplotlib.use("Agg")  # no display: the plot only goes to a file
import matplotlib.pyplot as plt
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError, HFValidationError

from data import is_local

LOSS_PLOT = "training_loss.png"
TAGS = ["qlora", "lora", "peft", "trl", "sft"]


def plot_training_loss(log_history, path):
    """The loss the trainer logged every logging_steps (and the eval loss, when there was one), against the step."""
    figure, axes = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            axes.plot(*zip(*points), marker="." if len(points) < 50 else None, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def base_model_license(model_name):
    """The license in the base model's own card: its local README.md, or its Hub card when online. None if unknown."""
    local_card = os.path.join(model_name, "README.md")
    try:
        card = ModelCard.load(local_card if os.path.isdir(model_name) else model_name)
    except (OSError, EntryNotFoundError, HFValidationError):  # no card, offline, or not a Hub id
        return None
    return card.data.license


def hub_dataset(dataset_name):
    """The data set's Hub id, or None for a local file (the Hub's `datasets` field only takes Hub ids)."""
    return None if is_local(dataset_name) else dataset_name


def card_data(settings, library_name):
    dataset = hub_dataset(settings["dataset_name"])
    return ModelCardData(
        base_model=settings["model_name"],
        datasets=[dataset] if dataset else None,
        license=base_model_license(settings["model_name"]),
        library_name=library_name,
        pipeline_tag="text-generation",
        tags=TAGS,
    )


def pipeline_usage(repo_id, prompt, max_new_tokens):
    return f"""```python
from transformers import pipeline

generator = pipeline("text-generation", model="{repo_id}")
# The training rows' format, as the chat template renders it: it holds its own special tokens
prompt = {prompt!r}
result = generator(
    prompt, max_new_tokens={max_new_tokens}, do_sample=False, add_special_tokens=False, return_full_text=False
)
print(result[0]["generated_text"])
```"""


def chat_template_usage(repo_id, question, prompt, max_new_tokens):
    return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
model = AutoModelForCausalLM.from_pretrained("{repo_id}")
messages = [{{"role": "user", "content": {question!r}}}]
# The chat template renders the training rows' format: {prompt!r}
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=False)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
```"""


def adapter_usage(repo_id, prompt, max_new_tokens):
    return f"""```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")  # downloads the base model too
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
# The training rows' format, as the chat template renders it: it holds its own special tokens
inputs = tokenizer({prompt!r}, return_tensors="pt", add_special_tokens=False)
output = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=False)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
```"""


def table(rows, header):
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| `{key}` | {'`' + str(value) + '`' if value not in ('', None) else '(empty)'} |" for key, value in rows]
    return "\n".join(lines)


def number(value, digits=4):
    return "not logged" if value is None else f"{value:.{digits}g}"


def training_section(info, verification):
    settings = info.settings
    runtime = info.train_runtime_s
    eval_loss = info.final_eval_loss
    return f"""## How it was trained

QLoRA: the base model loaded in 4 bits ({settings["bnb_4bit_quant_type"]}), a LoRA adapter of rank {settings["lora_r"]}
trained on it with trl's `SFTTrainer`, by this project's `finetune.py`.

- Training time: {number(runtime)} s ({info.global_step} steps) on GPU: {info.gpu}
- Tokens seen: {info.tokens_seen if info.tokens_seen is not None else "not logged"}
- Final train loss (last logged step): {number(info.final_train_loss)}
- Final eval loss: {number(eval_loss) if eval_loss is not None else "no eval set was used"}

![training loss]({LOSS_PLOT})

Every setting of the run:

{table(settings.items(), ("setting", "value"))}

Library versions:

{table(info.versions.items(), ("library", "version"))}

## Verification of the merge

{verification_section(verification)}
"""


def verification_section(v):
    """The held-out losses (the base model's among them), the merged model against base + adapter, and the merged
    model's own sample answer: the published model's, from the folder that was checked."""
    heldout = v.heldout
    losses = "\n".join(f"| {what} | {number(loss)} |" for what, loss in v.heldout_losses)
    verdict = "passed" if v.passed and v.beats_base else "FAILED (published with --push_unverified)"
    answer = v.sample["merged_answer"]
    sample = "" if answer is None else f"""
Sample answer of this merged model to {v.sample["prompt"]!r}, greedy, at most {v.sample["max_new_tokens"]} new
tokens: {answer!r}
"""
    return f"""Merged into the base model's {v.merged_into}: {v.merge_choice}.

Held-out loss (mean cross-entropy per loss-carrying token, loss on {heldout["loss_on"]}) on {heldout["rows"]}
{heldout["rows_from"]} rows ({heldout["tokens"]} tokens), compute in {v.compute_dtype}:

| model | held-out loss |
| --- | --- |
{losses}

The merged model saved to disk, compared with the base model plus the unmerged adapter on {v.rows} of those rows
({v.tokens} tokens):

| measure | value |
| --- | --- |
| largest absolute logit difference, merged vs base + adapter | {number(v.max_abs_logit_diff)} |
| mean KL divergence per token, merged vs base + adapter | {number(v.mean_kl)} (limit {v.max_kl}) |
| mean KL divergence per token, merged vs the adapter on the 4-bit base | {number(v.mean_kl_to_4bit_adapter)} |
| lower held-out loss than the base model | {v.beats_base} |
| verification | {verdict} |
{sample}"""


def merged_model_card(info, verification, repo_id, render):
    """render(question) is the prompt the model was trained with for that question (its chat template's)."""
    settings = info.settings
    question, budget = settings["sample_prompt"], settings["sample_max_new_tokens"]
    body = f"""# {repo_id}

`{settings["model_name"]}` fine-tuned with QLoRA on `{settings["dataset_name"]}`, with the LoRA adapter merged into the
base model's {verification.merged_into}, saved in fp16.

## Usage

Prompt it in the format it was trained on, `{render("question")}`. With a `pipeline`:

{pipeline_usage(repo_id, render(question), budget)}

With the chat template:

{chat_template_usage(repo_id, question, render(question), budget)}

{training_section(info, verification)}"""
    return ModelCard(f"---\n{card_data(info.settings, 'transformers').to_yaml()}\n---\n\n{body}")


def adapter_model_card(info, verification, repo_id, merged_repo_id, render):
    settings = info.settings
    question, budget = settings["sample_prompt"], settings["sample_max_new_tokens"]
    body = f"""# {repo_id}

A LoRA adapter for the base model `{settings["model_name"]}`, trained with QLoRA on `{settings["dataset_name"]}`.
The same model with the adapter merged in is `{merged_repo_id}`.

## Usage

Prompt it in the format it was trained on, `{render("question")}`:

{adapter_usage(repo_id, render(question), budget)}

{training_section(info, verification)}"""
    return ModelCard(f"---\n{card_data(info.settings, 'peft').to_yaml()}\n---\n\n{body}")
