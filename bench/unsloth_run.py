"""Unsloth on the benchmark's checkpoint and rows, for the side-by-side in bench/RESULTS.md.

It runs as its own process with Unsloth's own install (older trl and datasets than ours), as
`../shared/gpu/unsloth-wheelhouse.sh` describes:

    PYTHONPATH=/tmp/site-unsloth UNSLOTH_DISABLE_STATISTICS=1 HF_HUB_OFFLINE=1 \
        python3 bench/unsloth_run.py --work /tmp/bench --out $OUT --mode packed

Same LoRA shape as our all-linear configurations (r=64, alpha=16, all linear layers), Unsloth's recommended
settings otherwise (dropout 0, its offloaded gradient checkpointing, bf16), paged_adamw_32bit and cosine as ours.
"""

import argparse
import json
import os
import sys
import time

import unsloth  # noqa: F401  (must come before transformers and trl: it patches them)
import torch
from datasets import load_dataset
from trl import SFTConfig, SFTTrainer
from unsloth import FastLanguageModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import StepTimer  # noqa: E402

MODES = {  # name -> (packing, batch size, warm-up steps, timed steps)
    "grouped": (False, 16, 3, 12),
    "packed": (True, 8, 3, 15),
}


def sampling(grouped):
    """transformers 5.17, which Unsloth runs on, may predate train_sampling_strategy: then group_by_length."""
    if "train_sampling_strategy" in SFTConfig.__dataclass_fields__:
        return {"train_sampling_strategy": "group_by_length" if grouped else "random"}
    return {"group_by_length": grouped}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/bench")
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=list(MODES), default="packed")
    parser.add_argument("--epoch", action="store_true", help="a whole epoch instead of the timed steps")
    args = parser.parse_args()
    packing, batch, warmup, timed = MODES[args.mode]
    ckpt, data = os.path.join(args.work, "llama-2-7b-shape"), os.path.join(args.work, "rows.jsonl")

    started = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=ckpt, max_seq_length=1024, dtype=torch.bfloat16, load_in_4bit=True
    )
    model = FastLanguageModel.get_peft_model(
        model, r=64, lora_alpha=16, lora_dropout=0, bias="none", random_state=0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth",
    )  # fmt: skip
    timer = StepTimer()
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=load_dataset("json", data_files=data, split="train"),
        callbacks=[timer],
        args=SFTConfig(
            output_dir=os.path.join(args.work, "unsloth"), per_device_train_batch_size=batch, packing=packing,
            max_length=1024, bf16=True, optim="paged_adamw_32bit", learning_rate=2e-4, lr_scheduler_type="cosine",
            warmup_steps=0.03, weight_decay=0.001, max_grad_norm=0.3, logging_steps=1, report_to="none",
            max_steps=-1 if args.epoch else warmup + timed, save_strategy="no", dataset_text_field="text",
            **sampling(grouped=not packing),
        ),
    )  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    tokens_s, step_s = timer.steady_state(warmup)
    result = {
        "name": f"unsloth_{args.mode}", "epoch": args.epoch, "steps": trainer.state.global_step,
        "tokens_per_s": tokens_s, "s_per_step": step_s,
        "train_runtime_s": trainer.state.log_history[-1].get("train_runtime"),
        "wall_s_including_load": time.perf_counter() - started,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "final_loss": next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None),
        "versions": {"unsloth": unsloth.__version__, "torch": torch.__version__},
    }  # fmt: skip
    print(json.dumps(result), flush=True)
    name = f"unsloth_{args.mode}{'_epoch' if args.epoch else ''}.json"
    json.dump(result, open(os.path.join(args.out, name), "w"), indent=1)


if __name__ == "__main__":
    main()
