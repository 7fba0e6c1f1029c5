"""Step timing shared by the benchmark's runs (ours and Unsloth's): it imports only torch and transformers, so the
Unsloth process, with its own older trl, can use it too."""

import time

import torch
from transformers import TrainerCallback


def real_tokens(batch):
    """The batch's non-padding tokens: the attention mask's ones; in a padding-free batch (one row of rows end to end,
    no mask), the tokens up to the last one whose position is not 0, since padding to a fixed length
    (pad_to_multiple_of) appends tokens at position 0. trl's own `num_tokens` counts that padding as real."""
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum())
    if batch.get("position_ids") is None:
        return batch["input_ids"].numel()
    positions = batch["position_ids"][0]
    return int(positions.nonzero().max()) + 1


class StepTimer(TrainerCallback):
    """Wall-clock time at the end of every optimizer step, after the GPU has finished it, and the running count of
    real tokens the model was given, counted as each batch enters the model's forward."""

    def __init__(self):
        self.step_ends = []
        self.tokens = {}
        self.seen = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.register_forward_pre_hook(self.count, with_kwargs=True)
        torch.cuda.synchronize()
        self.began = time.perf_counter()

    def count(self, module, args, kwargs):
        if module.training:  # not the sample answer's or an eval's forwards
            self.seen += real_tokens(kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())
        self.tokens[state.global_step] = self.seen

    def first_step_s(self):
        """The first step's time: with empty compile caches, mostly compiling."""
        return self.step_ends[0] - self.began if self.step_ends else None

    def steady_state(self, warmup_steps):
        """Real tokens/s and seconds/step over the steps after the warm-up ones."""
        steps = len(self.step_ends)
        if steps <= warmup_steps:
            return None, None
        seconds = self.step_ends[-1] - self.step_ends[warmup_steps - 1]
        tokens = self.tokens[steps] - self.tokens[warmup_steps]
        return tokens / seconds, seconds / (steps - warmup_steps)


# Where the GPU's time goes: kernels grouped by what they do, matched on their names (first match wins)
KERNEL_GROUPS = [
    ("4-bit dequantize (bitsandbytes)", ("dequant",)),
    ("flex attention", ("flex", "triton_tem")),
    ("Liger kernels", ("liger", "rms_norm", "swiglu", "rope", "_cross_entropy")),
    ("optimizer", ("optimizer", "adam")),
    ("matrix multiplies", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "sm90", "sm100")),
    ("copies and fills", ("memcpy", "memset", "copy", "fill")),
    ("other PyTorch kernels", ("elementwise", "reduce", "triton", "vectorized", "index", "cat")),
]


class StepProfiler(TrainerCallback):
    """torch.profiler over a few optimizer steps after the warm-up ones; `summary()` gives the GPU's busy time by
    kernel group, per step, and the share of the steps' wall time the GPU had no kernel running."""

    def __init__(self, start_step, steps=2):
        self.start_step, self.steps = start_step, steps
        self.profiler = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.start_step and self.profiler is None:
            torch.cuda.synchronize()
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None and state.global_step == self.start_step + self.steps:
            torch.cuda.synchronize()
            self.wall_s = time.perf_counter() - self.started
            self.profiler.__exit__(None, None, None)

    def summary(self):
        kernels = [e for e in self.profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        groups = {name: 0.0 for name, _ in KERNEL_GROUPS}
        groups["unmatched"] = 0.0
        top = []
        for event in kernels:
            seconds = event.self_device_time_total / 1e6
            name = event.key.lower()
            group = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "unmatched")
            groups[group] += seconds
            top.append((seconds, event.key[:120], group))
        busy = sum(groups.values())
        return {
            "steps": self.steps, "wall_s_per_step": self.wall_s / self.steps, "gpu_busy_s_per_step": busy / self.steps,
            "groups_s_per_step": {g: s / self.steps for g, s in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top_kernels_s_per_step": [(s / self.steps, k, g) for s, k, g in sorted(top, reverse=True)[:25]],
        }  # fmt: skip
