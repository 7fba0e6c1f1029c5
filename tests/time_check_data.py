"""Times `finetune.py --check_data` on generated 100,000-row files (README's figure): python tests/time_check_data.py"""

import json
import os
import tempfile
import time

from helpers import build_tiny_model, run_script


def write_rows(path, shape, n=100_000):
    with open(path, "w") as f:
        for i in range(n):
            a, b = i % 997, i % 991
            question, answer = f"What is {a} plus {b}? Explain it in a sentence.", f"{a} plus {b} is {a + b}."
            if shape == "text":
                row = {"text": f"<s>[INST] {question} [/INST] {answer} </s>"}
            else:
                row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    folder = tempfile.mkdtemp()
    model = build_tiny_model(os.path.join(folder, "tiny-llama"))
    for shape in ("text", "messages"):
        path = os.path.join(folder, f"{shape}.jsonl")
        write_rows(path, shape)
        start = time.perf_counter()
        result = run_script("finetune.py", "--check_data", "--model_name", model, "--dataset_name", path)
        seconds = time.perf_counter() - start
        assert result.returncode == 0, result.stderr
        print(f"{shape}: {seconds:.1f} s for 100,000 rows (whole command, imports included)")
        print("   ", result.stdout.splitlines()[0])
