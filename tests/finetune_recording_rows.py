"""finetune.py as `accelerate launch` runs it, plus a TrainerCallback that records what each process trained on.

Test-only: tests/test_multi_gpu.py launches this script instead of finetune.py so it can see, per rank, the input ids
of every batch the model was given and the LoRA weights the process held at the end. finetune.py itself runs
unchanged: the callback only observes.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from safetensors.torch import save_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import finetune  # noqa: E402


class RecordRows(TrainerCallback):
    """Writes rows-rank<N>.json (the input ids of each training forward) and held-rank<N>.safetensors (the LoRA
    weights after training) to output_dir."""

    def __init__(self):
        self.batches = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def record(module, call_args, call_kwargs):
            if module.training:
                self.batches.append(call_kwargs["input_ids"].tolist())

        model.register_forward_pre_hook(record, with_kwargs=True)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rank = args.process_index
        with open(os.path.join(args.output_dir, f"rows-rank{rank}.json"), "w") as f:
            json.dump(self.batches, f)
        lora = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
        save_file(lora, os.path.join(args.output_dir, f"held-rank{rank}.safetensors"))


if __name__ == "__main__":
    finetune.run_cli(lambda: finetune.main(callbacks=[RecordRows()]))
