"""The memory model behind `--gpu_recipe auto` (recipes.py): measured on the H200, fitted here, then checked on
simulated smaller cards. Three Llama shapes with random weights (speed and memory do not depend on their values),
built and loaded through finetune.main as a user's model would be:

    python3 bench/memory.py measure --out $OUT        # on the GPU: peak memory of each cell (memory.json)
    python3 bench/memory.py fit bench/results/memory.json   # anywhere: fit recipes.FIT, print each cell's error
    python3 bench/memory.py cards --out $OUT          # on the GPU: `auto` under 24/40/48/80 GB caps (cards.json)
    python3 bench/memory.py cards --out $OUT --caps 24 --cells 13b:1024 --extra "--gpu_recipe no_checkpointing"
                                                      # a recipe that cannot fit: the out-of-memory retry

`--only 7b,13b` limits the shapes, `--caps 24,80` the cards.
"""

import argparse
import gc
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import recipes  # noqa: E402

# The three shapes: Llama-3.2-1B (grouped-query attention, a 128k vocabulary, tied embeddings), Llama-2-7B, -13B
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                vocab_size=32000),
}  # fmt: skip
MODE_FLAGS = {
    "no_checkpointing": ["--no_gradient_checkpointing"],
    "checkpoint_every_2": ["--checkpoint_every_n_layers", "2"],
    "checkpoint_every_layer": [],
    "offload": ["--activation_offloading"],
}
# (memory mode, batch, max_length): every mode at auto's 8,192 tokens a step; auto's batch at the longer rows; and
# the batch of 8 a user might set at 2,048 and 4,096 (16,384 and 32,768 tokens a step)
CELLS = [(mode, 8, 1024) for mode in MODE_FLAGS] + [
    ("no_checkpointing", 4, 2048), ("checkpoint_every_layer", 4, 2048),
    ("no_checkpointing", 2, 4096), ("checkpoint_every_layer", 2, 4096),
    ("checkpoint_every_layer", 8, 2048), ("checkpoint_every_layer", 8, 4096), ("offload", 8, 4096),
]  # fmt: skip
KERNEL_FLAGS = ["--precision", "bf16", "--packing", "--padding_free", "--attn_implementation", "flex_attention",
                "--use_liger_kernel", "--lora_target_modules", "all-linear", "--lora_dropout", "0",
                "--pad_to_full_length", "--learning_rate", "2e-3"]  # fmt: skip
CARD_CELLS = [("7b", 1024), ("7b", 4096), ("13b", 1024), ("13b", 4096), ("1b", 4096)]


def train(argv, timer):
    """finetune.main on these settings; returns what the run measured."""
    import torch

    import finetune

    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer = finetune.main(argv, callbacks=[timer])
    result = {
        "wall_s": time.perf_counter() - started,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "batch": trainer.state.train_batch_size,
        "steps": trainer.state.global_step,
        "final_loss": next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None),
    }
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return result


def common_argv(ckpt, data, workdir, steps):
    return ["--model_name", ckpt, "--dataset_name", data, "--output_dir", workdir,
            "--new_model", os.path.join(workdir, "adapter"), "--overwrite_adapter", "--logging_steps", "1",
            "--report_to", "none", "--sample_max_new_tokens", "0", "--save_steps", "0", "--eval_fraction", "0",
            "--max_steps", str(steps)]  # fmt: skip


def prepare(args, name):
    from bench import build_checkpoint, write_rows

    ckpt, data = os.path.join(args.work, name), os.path.join(args.work, "rows.jsonl")
    build_checkpoint(ckpt, SHAPES[name], max_positions=8192)
    if not os.path.exists(data):
        write_rows(data)
    return ckpt, data


def measure(args):
    """Peak memory of each (shape, memory mode, batch, max_length) cell, three steps each."""
    from bench import versions
    from timing import StepTimer

    report = {"versions": versions(), "cells": []}
    for name in args.only.split(","):
        ckpt, data = prepare(args, name)
        for mode, batch, max_length in CELLS:
            argv = common_argv(ckpt, data, os.path.join(args.work, "runs", name), 4) + [
                "--gpu_recipe", "tutorial", *KERNEL_FLAGS, *MODE_FLAGS[mode],
                "--per_device_train_batch_size", str(batch), "--max_length", str(max_length),
            ]  # fmt: skip
            cell = {"shape": name, "config": SHAPES[name], "mode": mode, "batch": batch, "max_length": max_length}
            timer = StepTimer()
            try:
                cell.update(train(argv, timer))
                cell["tokens_per_s"] = timer.steady_state(2)[0]
            except Exception as error:  # an out-of-memory error is a result too
                cell["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            report["cells"].append(cell)
            print(json.dumps(cell), flush=True)
            json.dump(report, open(os.path.join(args.out, "memory.json"), "w"), indent=1)


def cell_shape(cell):
    from transformers import LlamaConfig

    return recipes.model_shape(LlamaConfig(**cell["config"]), 64, "all-linear")


def cell_settings(cell):
    """The settings a cell trained with, as recipes.py reads them."""
    from types import SimpleNamespace

    return SimpleNamespace(
        per_device_train_batch_size=cell["batch"], max_length=cell["max_length"],
        gradient_checkpointing=cell["mode"] != "no_checkpointing",
        checkpoint_every_n_layers=2 if cell["mode"] == "checkpoint_every_2" else 1,
        activation_offloading=cell["mode"] == "offload",
    )  # fmt: skip


def fit(args):
    """Least squares over the measured cells' peak reserved memory (what PyTorch holds from the GPU, so what must
    fit in it): each term of recipes.memory_terms gets one factor. Writes
    memory_fit.json beside the results; recipes.FIT is then set to the factors it prints."""
    cells = [c for c in json.load(open(args.results))["cells"] if "peak_reserved_gib" in c]
    keys = list(recipes.FIT)
    rows, targets = [], []
    for cell in cells:
        shape = cell_shape(cell)
        terms = recipes.memory_terms(shape, cell_settings(cell))
        rows.append([terms[k] for k in keys])
        targets.append(cell["peak_reserved_gib"] - recipes.weights_gib(shape))
    # Each cell weighted by 1 / its measured peak: the fit minimises the relative error, the one the margin is in
    weights = np.array([1 / cell["peak_reserved_gib"] for cell in cells])
    solution = np.linalg.lstsq(np.array(rows) * weights[:, None], np.array(targets) * weights, rcond=None)[0]
    factors = dict(zip(keys, solution.tolist()))
    print("FIT =", json.dumps({k: round(v, 4) for k, v in factors.items()}))
    recipes.FIT.update(factors)
    print(f"{'shape':<5} {'mode':<24} {'batch':>5} {'max_length':>10} {'measured':>9} {'predicted':>9} {'error':>7}")
    errors = []
    for cell in cells:
        predicted = recipes.predicted_peak_gib(cell_shape(cell), cell_settings(cell))
        error = predicted / cell["peak_reserved_gib"] - 1
        errors.append({**{k: cell[k] for k in ("shape", "mode", "batch", "max_length", "peak_reserved_gib")},
                       "predicted_gib": predicted, "error": error})  # fmt: skip
        print(f"{cell['shape']:<5} {cell['mode']:<24} {cell['batch']:>5} {cell['max_length']:>10} "
              f"{cell['peak_reserved_gib']:>9.2f} {predicted:>9.2f} {error:>+7.1%}")  # fmt: skip
    worst = max(abs(e["error"]) for e in errors)
    print(f"largest error {worst:.1%} over {len(errors)} cells")
    out = os.path.join(os.path.dirname(args.results), "memory_fit.json")
    json.dump({"fit": factors, "largest_error": worst, "cells": errors}, open(out, "w"), indent=1)


def cards(args):
    """`auto`, as a user runs it, with the process capped to each card's memory: what it picked, its speed, its peak.
    The cap is torch's per-process memory fraction, which recipes.free_gpu_gib reads like a smaller card's."""
    import torch

    from bench import versions
    from timing import StepTimer

    total = torch.cuda.mem_get_info()[1]
    report = {"versions": versions(), "total_gib": total / 2**30, "cells": []}
    for cap in [float(c) for c in args.caps.split(",")]:
        cells = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells.split(",")] if args.cells else CARD_CELLS
        for name, max_length in cells:
            if name not in args.only.split(","):
                continue
            ckpt, data = prepare(args, name)
            torch.cuda.set_per_process_memory_fraction(cap * 1e9 / total)  # a card sold as N GB has N * 10^9 bytes
            argv = common_argv(ckpt, data, os.path.join(args.work, "cards", name), 8) + ["--max_length", str(max_length)]
            argv += args.extra.split()
            cell = {"card_gb": cap, "shape": name, "max_length": max_length, "extra": args.extra}
            timer = StepTimer()
            try:
                cell.update(train(argv, timer))
                cell["tokens_per_s"] = timer.steady_state(4)[0]
                with open(os.path.join(args.work, "cards", name, "run_settings.json")) as f:
                    cell["picked"] = json.load(f)["gpu_recipe"]
            except BaseException as error:  # a crash or a refusal is what this measures
                cell["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            torch.cuda.set_per_process_memory_fraction(1.0)
            gc.collect()
            torch.cuda.empty_cache()
            report["cells"].append(cell)
            print(json.dumps(cell), flush=True)
            json.dump(report, open(os.path.join(args.out, "cards.json"), "w"), indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["measure", "fit", "cards"])
    parser.add_argument("results", nargs="?", default="bench/results/memory.json", help="with fit: memory.json")
    parser.add_argument("--out", default=".", help="folder for memory.json or cards.json")
    parser.add_argument("--work", default="/tmp/bench", help="folder for the checkpoints, data and runs")
    parser.add_argument("--only", default="7b,13b,1b", help="comma-separated shapes")
    parser.add_argument("--caps", default="24,40,48,80", help="with cards: comma-separated card sizes in GB")
    parser.add_argument("--cells", default="", help="with cards: shape:max_length,... (default: CARD_CELLS)")
    parser.add_argument("--extra", default="", help="with cards: more finetune.py settings, e.g. a forced recipe")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    {"measure": measure, "fit": fit, "cards": cards}[args.command](args)


if __name__ == "__main__":
    main()
