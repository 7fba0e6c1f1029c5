"""finetune.py under `accelerate launch`: two processes training data-parallel on the CPU (gloo), and the FSDP
config's launch reaching the 4-bit storage dtype. The GPU runs themselves (speed, memory) are not made here."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, free_port, tiny_run_args, tutorial_rows
from safetensors.torch import load_file
from transformers import AutoTokenizer

import finetune
import qlora

FSDP_CONFIG = os.path.join(ROOT, "configs", "fsdp_qlora.yaml")


def accelerate_launch(*args, cwd, env=None):
    # HF_HOME of its own: no accelerate config file of this machine's user is read
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf-home"), **(env or {})}
    # A rendezvous port of its own: the launch cannot meet another test run's processes on the default port
    command = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), *args]
    return subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def two_processes(tiny_model, tutorial_data, tmp_path_factory):
    """finetune.py launched as on two GPUs, through a helper that records each rank's batches and final LoRA weights."""
    workdir = tmp_path_factory.mktemp("ddp")
    recorder = os.path.join(ROOT, "tests", "finetune_recording_rows.py")
    result = accelerate_launch(
        "--multi_gpu", "--num_processes", "2", recorder, *tiny_run_args(tiny_model, tutorial_data, workdir), cwd=workdir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = workdir / "results"
    rows = [json.load(open(results / f"rows-rank{rank}.json")) for rank in (0, 1)]
    held = [load_file(results / f"held-rank{rank}.safetensors") for rank in (0, 1)]
    return result, workdir, rows, held


def test_each_rank_trains_on_its_own_rows(two_processes, tiny_model):
    _, _, rows, _ = two_processes
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data_rows = {tuple(tokenizer(text, add_special_tokens=False).input_ids) for text in tutorial_rows()}  # rows hold their <s>
    seen = [{tuple(row) for batch in batches for row in batch} for batches in rows]
    assert [len(batches) for batches in rows] == [6, 6], "each rank runs every one of the 6 steps"
    assert seen[0] <= data_rows and seen[1] <= data_rows, "what the model was given are rows of the data set"
    assert len(seen[0]) == len(seen[1]) == 6
    assert not seen[0] & seen[1], "both ranks trained on the same rows: the data was not split between them"


def test_gradients_are_shared_so_both_ranks_hold_the_same_adapter(two_processes):
    """Different rows on each rank, yet identical weights after 6 updates: the gradients were averaged across them."""
    _, _, _, (rank0, rank1) = two_processes
    assert any(w.abs().sum() > 0 for name, w in rank0.items() if "lora_B" in name), "LoRA B is still zero"
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)


def test_saved_adapter_is_the_one_rank0_held(two_processes):
    _, workdir, _, (rank0, _) = two_processes
    saved = load_file(workdir / "adapter" / "adapter_model.safetensors")
    # peft leaves the adapter's name ("default") out of the names it saves
    assert saved.keys() == {name.replace(".default.", ".") for name in rank0}
    for name, weight in rank0.items():
        torch.testing.assert_close(saved[name.replace(".default.", ".")], weight, rtol=0, atol=0)


def test_only_the_main_process_prints_and_logs(two_processes):
    result, workdir, _, _ = two_processes
    assert result.stdout.count("4-bit compute dtype") == 1
    assert result.stdout.count("adapter saved to") == 1
    assert result.stdout.count("\n>>> ") == 1, "the sample answer is given once"
    events = [f for _, _, files in os.walk(workdir / "results" / "runs") for f in files if "tfevents" in f]
    assert len(events) == 1, events


def test_fsdp_config_launches_fsdp_for_qlora(tmp_path):
    """accelerate reads configs/fsdp_qlora.yaml and starts two processes with FSDP set up the way QLoRA needs."""
    script = 'env > "$ENV_DIR/env-$RANK.txt"'
    result = accelerate_launch(
        "--config_file", FSDP_CONFIG, "--no_python", "sh", "-c", script, cwd=tmp_path, env={"ENV_DIR": str(tmp_path)}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        lines = (tmp_path / f"env-{rank}.txt").read_text().splitlines()
        env = dict(line.split("=", 1) for line in lines if "=" in line)
        assert env["WORLD_SIZE"] == "2"
        assert env["ACCELERATE_USE_FSDP"] == "true"
        assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true" and env["FSDP_SYNC_MODULE_STATES"] == "true"
        assert env["FSDP_USE_ORIG_PARAMS"] == "false"
        assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT", "otherwise the trainer's save_model writes nothing"


@pytest.mark.parametrize("fsdp", [False, True])
def test_4bit_weights_take_the_compute_dtype_under_fsdp(fsdp, tiny_model, tutorial_data, tmp_path, monkeypatch):
    """Under FSDP every weight of the loaded model is a float of one dtype, which is what FSDP flattens and shards;
    otherwise the packed 4-bit weights stay uint8, bitsandbytes' default."""
    if fsdp:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with the FSDP config sets
    settings = finetune.parse_settings(finetune.Settings, tiny_run_args(tiny_model, tutorial_data, tmp_path))
    bnb_config = qlora.make_bnb_config(settings, torch.bfloat16)
    model = qlora.load_base_model(settings, bnb_config, {"": "cpu"})
    packed = {p.dtype for name, p in model.named_parameters() if p.__class__.__name__ == "Params4bit"}
    assert packed, "no 4-bit weights"
    if fsdp:
        assert bnb_config.bnb_4bit_quant_storage == torch.bfloat16
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    else:
        assert packed == {torch.uint8}
