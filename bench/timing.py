"""Step timing shared by the benchmark's runs (ours and Unsloth's): it imports only torch and transformers, so the
Unsloth process, with its own older trl, can use it too."""

import time

import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Wall-clock time at the end of every optimizer step, after the GPU has finished it, and trl's running count of
    real (non-padding) tokens, which it logs as `num_tokens` (run with logging_steps=1)."""

    def __init__(self):
        self.step_ends = []
        self.tokens = {}

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "num_tokens" in logs:
            self.tokens[state.global_step] = float(logs["num_tokens"])

    def steady_state(self, warmup_steps):
        """Real tokens/s and seconds/step over the steps after the warm-up ones."""
        steps = len(self.step_ends)
        if steps <= warmup_steps or warmup_steps not in self.tokens or steps not in self.tokens:
            return None, None
        seconds = self.step_ends[-1] - self.step_ends[warmup_steps - 1]
        tokens = self.tokens[steps] - self.tokens[warmup_steps]
        return tokens / seconds, seconds / (steps - warmup_steps)
