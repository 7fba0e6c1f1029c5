"""Speed and memory of finetune.py's training on one GPU: the tutorial's recipe, each change alone, combinations.

Every configuration trains a Llama-2-7B-shaped model (random weights: speed and memory do not depend on their
values) through finetune.main, the code users run, on 1,000 synthetic rows whose token lengths follow a chat mix like
guanaco-llama2-1k's. Run on the H200 through the device tool (see bench/RESULTS.md for the exact call):

    python3 bench/bench.py --out $OUT                       # every configuration, results in $OUT/bench.json
    python3 bench/bench.py --out $OUT --only tutorial,bf16   # some of them
"""

import argparse
import gc
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import finetune  # noqa: E402
import qlora  # noqa: E402
from timing import StepProfiler, StepTimer  # noqa: E402

ROWS = 1000
MAX_LENGTH = 1024
SEED = 0
H200_BF16_FLOPS = 790e12  # measured dense bf16 matrix rate of the H200 (shared/gpu/README.md)
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)

PACKED = ["--packing", "--padding_free", "--attn_implementation", "flex_attention", "--per_device_train_batch_size", "8"]
BF16 = ["--precision", "bf16"]
ALL = ["--lora_target_modules", "all-linear"]
RECIPE_KERNELS = BF16 + ALL + PACKED + ["--use_liger_kernel", "--lora_dropout", "0", "--pad_to_full_length"]
# name -> (finetune.py overrides, warm-up steps, timed steps). Liger patches transformers' Llama classes for the
# whole process, so the configurations with it come last.
CONFIGS = {
    "default": (["--gpu_recipe", "auto"], 6, 12),  # finetune.py as a user runs it: auto's pick for this GPU
    "tutorial": (["--precision", "fp16"], 5, 40),
    "bf16": (BF16, 5, 40),
    "bf16_all_linear": (BF16 + ALL, 5, 40),
    "bf16_batch16": (BF16 + ["--per_device_train_batch_size", "16"], 3, 12),
    "bf16_batch1_accum16": (BF16 + ["--gradient_accumulation_steps", "16"], 1, 4),
    "bf16_batch16_all_linear": (BF16 + ALL + ["--per_device_train_batch_size", "16"], 3, 12),
    "bf16_batch16_all_linear_dropout0": (BF16 + ALL + ["--per_device_train_batch_size", "16", "--lora_dropout", "0"], 3, 12),
    "packed_sdpa_all_linear": (BF16 + ALL + PACKED[:2] + ["--per_device_train_batch_size", "8"], 6, 12),
    "packed_flex_all_linear": (BF16 + ALL + PACKED, 6, 12),
    "packed_flex_all_linear_gc_every2": (BF16 + ALL + PACKED + ["--checkpoint_every_n_layers", "2"], 6, 12),
    "packed_flex_all_linear_offload": (BF16 + ALL + PACKED + ["--activation_offloading"], 6, 12),
    "packed_flex_all_linear_no_gc": (BF16 + ALL + PACKED + ["--no_gradient_checkpointing"], 6, 12),
    "packed_flex_all_linear_no_gc_dropout0": (BF16 + ALL + PACKED + ["--no_gradient_checkpointing", "--lora_dropout", "0"], 6, 12),
    "packed_flex_all_linear_no_gc_dropout0_compile": (
        BF16 + ALL + PACKED + ["--no_gradient_checkpointing", "--lora_dropout", "0", "--torch_compile"], 6, 12),
    "liger_packed_flex_all_linear": (BF16 + ALL + PACKED + ["--use_liger_kernel"], 6, 12),
    "liger_packed_flex_all_linear_dropout0": (BF16 + ALL + PACKED + ["--use_liger_kernel", "--lora_dropout", "0"], 6, 12),
    "liger_packed_flex_all_linear_no_gc_dropout0": (
        BF16 + ALL + PACKED + ["--use_liger_kernel", "--no_gradient_checkpointing", "--lora_dropout", "0"], 6, 12),
    "liger_packed_flex_all_linear_gc_every2_dropout0": (
        BF16 + ALL + PACKED + ["--use_liger_kernel", "--checkpoint_every_n_layers", "2", "--lora_dropout", "0"], 6, 12),
    "liger_packed2_flex_all_linear_dropout0": (
        BF16 + ALL + PACKED[:4] + ["--per_device_train_batch_size", "2", "--use_liger_kernel", "--lora_dropout", "0"], 3, 20),
    "liger_packed_flex_qv_no_gc_dropout0": (
        BF16 + PACKED + ["--use_liger_kernel", "--no_gradient_checkpointing", "--lora_dropout", "0"], 6, 12),
    # The recipes of calls 7 and 8 (`--gpu_recipe 24gb`, `8gb`, `large` then), spelled out since the recipes changed
    "recipe_24gb": (RECIPE_KERNELS + ["--learning_rate", "2e-3", "--checkpoint_every_n_layers", "2",
                                      "--per_device_train_batch_size", "6"], 6, 12),
    "recipe_8gb": (RECIPE_KERNELS + ["--learning_rate", "2e-3", "--activation_offloading",
                                     "--per_device_train_batch_size", "6"], 3, 20),
    # the first step with empty compile caches (RESULTS.md, call 8)
    "cold_large": (RECIPE_KERNELS + ["--learning_rate", "2e-3", "--no_gradient_checkpointing"], 1, 2),
    "cold_large_sdpa": (RECIPE_KERNELS + ["--learning_rate", "2e-3", "--no_gradient_checkpointing",
                                          "--attn_implementation", "sdpa"], 1, 2),
    # The recipes' kernels spelled out (packed, flex, Liger, all linear, dropout 0, padded; the tutorial's learning
    # rate), so that these stay what was measured when the recipes change
    "large_pad": (RECIPE_KERNELS + ["--no_gradient_checkpointing"], 6, 12),
    "large_batch16_pad": (RECIPE_KERNELS + ["--no_gradient_checkpointing", "--per_device_train_batch_size", "16"], 4, 8),
    "24gb_pad": (RECIPE_KERNELS, 6, 12),
    "24gb_every2_pad": (RECIPE_KERNELS + ["--checkpoint_every_n_layers", "2"], 6, 12),
    "24gb_every2_batch6": (RECIPE_KERNELS + ["--checkpoint_every_n_layers", "2", "--per_device_train_batch_size", "6"], 6, 12),
    "24gb_offload_pad": (RECIPE_KERNELS + ["--activation_offloading"], 6, 12),
    "8gb_batch8_offload_pad": (RECIPE_KERNELS + ["--activation_offloading"], 4, 12),
    "8gb_batch4_pad": (RECIPE_KERNELS + ["--per_device_train_batch_size", "4"], 4, 12),
    "8gb_batch2_pad": (RECIPE_KERNELS + ["--per_device_train_batch_size", "2"], 3, 20),
}  # fmt: skip


def build_checkpoint(folder, shape=LLAMA2_7B, max_positions=4096):
    """A Llama of this shape (the 7B one by default) in fp16 with random weights, and a word-level tokenizer of its
    vocabulary size in which every word is a token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if any(os.path.exists(os.path.join(folder, name)) for name in ("model.safetensors.index.json", "model.safetensors")):
        return
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, shape["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, max_position_embeddings=max_positions)
    torch.manual_seed(SEED)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.float16)  # in fp16 from the start: 13B fits
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()


def write_rows(path):
    """1,000 rows whose token lengths are log-normal like a chat mix (median ~280, mean ~350, a tail past 1,000)."""
    rng = np.random.default_rng(SEED)
    lengths = np.clip(rng.lognormal(mean=math.log(280), sigma=0.67, size=ROWS).astype(int), 16, 4000)
    with open(path, "w") as f:
        for n in lengths:
            words = " ".join(f"w{i}" for i in rng.integers(3, LLAMA2_7B["vocab_size"], size=n - 2))
            f.write(json.dumps({"text": f"<s> {words} </s>"}) + "\n")  # n tokens with BOS and EOS
    cut = np.minimum(lengths, MAX_LENGTH)
    return {"rows": ROWS, "median": float(np.median(lengths)), "mean": float(lengths.mean()),
            "p95": float(np.percentile(lengths, 95)), "over_1024": int((lengths > MAX_LENGTH).sum()),
            "real_tokens_after_cut": int(cut.sum()), "mean_after_cut": float(cut.mean())}  # fmt: skip


def flops_per_token(trainable, mean_length):
    """shared/gpu/README.md's count: 4 N_frozen + 6 N_lora + attention, per real token."""
    c = LLAMA2_7B
    frozen = c["num_hidden_layers"] * (4 * c["hidden_size"] ** 2 + 3 * c["hidden_size"] * c["intermediate_size"])
    frozen += c["vocab_size"] * c["hidden_size"]  # lm_head
    attention = 6 * c["num_hidden_layers"] * c["hidden_size"] * mean_length
    return 4 * frozen + 6 * trainable + attention


def run_config(name, overrides, warmup, timed, ckpt, data, workdir, data_stats, epoch=False, profile=False):
    run = f"{name}_epoch" if epoch else name
    profiler = StepProfiler(start_step=warmup) if profile else None
    if profile:
        run, timed = f"{name}_profile", 2
    argv = [
        "--model_name", ckpt, "--dataset_name", data, "--output_dir", os.path.join(workdir, run),
        "--new_model", os.path.join(workdir, run, "adapter"), "--overwrite_adapter", "--max_length", str(MAX_LENGTH),
        "--gpu_recipe", "tutorial", "--logging_steps", "1", "--report_to", "none", "--sample_max_new_tokens", "0", "--save_steps", "0", "--eval_fraction", "0",
        "--max_steps", "-1" if epoch else str(warmup + timed), *overrides,
    ]  # fmt: skip
    timer = StepTimer()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer = finetune.main(argv, callbacks=[timer] + ([profiler] if profile else []))
    result = {
        "name": name, "overrides": overrides, "epoch": epoch, "steps": trainer.state.global_step,
        "wall_s_including_load": time.perf_counter() - started,
        "train_runtime_s": trainer.state.log_history[-1].get("train_runtime"),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "final_loss": next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None),
    }  # fmt: skip
    tokens_s, step_s = timer.steady_state(warmup)
    result.update(tokens_per_s=tokens_s, s_per_step=step_s, first_step_s=timer.first_step_s())
    if profile:
        result["profile"] = profiler.summary()
    if tokens_s:
        result["mfu"] = tokens_s * flops_per_token(result["trainable_params"], data_stats["mean_after_cut"]) / H200_BF16_FLOPS
        result["epoch_s_estimated"] = data_stats["real_tokens_after_cut"] / tokens_s
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return result


def lora_model(model_name, attn_implementation, device_map):
    """finetune.py's 4-bit base with LoRA on all linear layers, B initialised to small random values (it starts at
    zero, which would make every LoRA gradient but B's vanish and the check weaker)."""
    from peft import get_peft_model

    settings = finetune.parse_settings(finetune.Settings, [
        "--model_name", model_name, "--attn_implementation", attn_implementation,
        "--lora_target_modules", "all-linear", "--lora_dropout", "0",
    ])  # fmt: skip
    compute_dtype, _ = qlora.pick_precision("bf16" if torch.cuda.is_available() else "fp32")
    model = qlora.load_base_model(settings, qlora.make_bnb_config(settings, compute_dtype), device_map)
    model = get_peft_model(model, finetune.make_lora_config(settings))
    torch.manual_seed(SEED)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model, common.load_tokenizer(model_name, False)


def packed_vs_rows(model, tokenizer, rows, autocast_dtype=None, restart_positions=True, pad_to=None):
    """Correct before fast: one padding-free packed batch (trl's collator, as packing=True builds it) against the same
    rows run one at a time. Returns the two losses (means over all rows' tokens) and the relative differences of
    the losses and of the LoRA gradients. pad_to pads the packed batch to a multiple of that many tokens, as
    --pad_to_full_length does. restart_positions=False numbers the packed tokens straight through, so the
    model cannot tell the rows apart: the negative control that shows the check can fail."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = [{"input_ids": tokenizer(row, add_special_tokens=False).input_ids} for row in rows]
    n_tokens = sum(len(e["input_ids"]) - 1 for e in examples)  # each row's first token is predicted by nothing
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    packed = DataCollatorForLanguageModeling(
        pad_token_id=tokenizer.pad_token_id, padding_free=True, pad_to_multiple_of=pad_to
    )(examples)
    if not restart_positions:
        packed["position_ids"] = torch.arange(packed["input_ids"].shape[1])[None]
        del packed["cu_seq_lens_q"], packed["cu_seq_lens_k"], packed["max_length_q"], packed["max_length_k"]

    def loss_and_grads(batches):
        model.zero_grad()
        total = 0.0
        for batch in batches:
            batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.autocast(model.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = model(**batch).loss
            tokens = (batch["labels"][:, 1:] != -100).sum().item()
            (loss * tokens / n_tokens).backward()  # the model's mean over this batch, weighted back to all tokens
            total += loss.item() * tokens / n_tokens
        return total, torch.cat([p.grad.flatten().float() for p in model.parameters() if p.requires_grad])

    loss_packed, grad_packed = loss_and_grads([packed])
    loss_rows, grad_rows = loss_and_grads([collate([e]) for e in examples])
    # The noise floor: the same rows as one ordinary padded batch, a different but equally right computation
    loss_padded, grad_padded = loss_and_grads([collate(examples)])
    return {
        "rows": len(rows), "tokens": n_tokens, "padded_length": packed["input_ids"].shape[1], "packed_loss": loss_packed, "rows_loss": loss_rows,
        "loss_rel_diff": abs(loss_packed - loss_rows) / loss_rows,
        "grad_rel_diff": ((grad_packed - grad_rows).norm() / grad_rows.norm()).item(),
        "padded_batch_loss_rel_diff": abs(loss_padded - loss_rows) / loss_rows,
        "padded_batch_grad_rel_diff": ((grad_padded - grad_rows).norm() / grad_rows.norm()).item(),
    }  # fmt: skip


def packed_check_on_gpu(ckpt, data):
    model, tokenizer = lora_model(ckpt, "flex_attention", {"": 0})
    rows = [json.loads(line)["text"] for line in open(data)][:4]
    rows = [" ".join(row.split()[:300]) for row in rows]  # a few hundred tokens each
    # Padded as the recipes pad (--pad_to_full_length): the padding must change nothing either
    result = {"attn_implementation": "flex_attention", "padded_to": 2048,
              **packed_vs_rows(model, tokenizer, rows, torch.bfloat16, pad_to=2048)}  # fmt: skip
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def versions():
    import bitsandbytes, peft, transformers, trl  # noqa: E401

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
            "python": platform.python_version()}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for bench.json")
    parser.add_argument("--work", default="/tmp/bench", help="folder for the checkpoint, data and runs")
    parser.add_argument("--only", default="", help="comma-separated configuration names (default: all; none: only build and check)")
    parser.add_argument("--epoch", default="", help="comma-separated configuration names to also run a whole epoch of")
    parser.add_argument("--profile", default="", help="comma-separated configuration names to profile two steps of")
    parser.add_argument("--check", action="store_true", help="run the packed-versus-unpacked check")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    ckpt, data = os.path.join(args.work, "llama-2-7b-shape"), os.path.join(args.work, "rows.jsonl")
    started = time.perf_counter()
    build_checkpoint(ckpt)
    stats = write_rows(data)
    report = {"versions": versions(), "data": stats, "build_s": time.perf_counter() - started, "runs": []}
    out_file = os.path.join(args.out, "bench.json")
    if args.check:
        report["packed_check"] = packed_check_on_gpu(ckpt, data)
        print("packed check", report["packed_check"], flush=True)
    names = [] if args.only == "none" else args.only.split(",") if args.only else list(CONFIGS)
    jobs = [(n, False, False) for n in names] + [(n, True, False) for n in args.epoch.split(",") if n]
    jobs += [(n, False, True) for n in args.profile.split(",") if n]
    for name, epoch, profile in jobs:
        overrides, warmup, timed = CONFIGS[name]
        try:
            result = run_config(
                name, overrides, warmup, timed, ckpt, data, os.path.join(args.work, "runs"), stats, epoch, profile
            )
        except Exception as error:  # an out-of-memory or unsupported combination is a result too
            result = {"name": name, "epoch": epoch, "error": f"{type(error).__name__}: {str(error)[:300]}"}
            gc.collect()
            torch.cuda.empty_cache()
        report["runs"].append(result)
        print(json.dumps(result), flush=True)
        json.dump(report, open(out_file, "w"), indent=1)
    for r in report["runs"]:
        tps = r.get("tokens_per_s")
        kind = "epoch" if r["epoch"] else "prof " if "profile" in r else "     "
        print(f"{r['name']:<50} {kind} tok/s {tps or 0:8.0f} "
              f"alloc {r.get('peak_allocated_gib', 0):6.2f} GiB  train {r.get('train_runtime_s') or 0:6.1f} s "
              f"{r.get('error', '')[:80]}")  # fmt: skip


if __name__ == "__main__":
    main()
