"""Nothing lost: checkpoints and resume, folders written whole, each bad input one line, a token that never leaks."""

import errno
import json
import os
import shutil
import signal
import time
from collections import namedtuple
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers import FAKE_TOKEN, assert_refused, record_pushes, start_script, tiny_run_args, tutorial_rows
from fake_hub import closed_port_endpoint, running_hub
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import common
import finetune
import merge_and_push
import safeguards
from common import folder_written_whole


@pytest.fixture(scope="module")
def trained(tiny_model, tutorial_data, tmp_path_factory):
    """One run with the default checkpointing (every 10% of the run, the last 3 kept)."""
    workdir = tmp_path_factory.mktemp("trained")
    args = tiny_run_args(tiny_model, tutorial_data, workdir, "--lora_r", "8", "--report_to", "none")
    trainer = finetune.main(args)
    return trainer, workdir, args


# Training: checkpoints, resume, a changed run refused, Ctrl-C, the adapter written whole


def test_default_checkpoints_every_tenth_of_the_run_keeping_three(trained):
    trainer, workdir, _ = trained
    assert trainer.args.save_strategy == "steps" and trainer.args.save_steps == 0.1
    # 10% of 6 steps rounds up to a checkpoint every step; the 3 newest are kept
    checkpoints = sorted(p for p in os.listdir(workdir / "results") if p.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-4", "checkpoint-5", "checkpoint-6"]


def test_final_adapter_leaves_no_partial_folder(trained):
    _, workdir, _ = trained
    assert sorted(os.listdir(workdir)) == ["adapter", "results"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(workdir / "adapter"))


def test_run_settings_are_saved_without_secrets(trained, tutorial_data):
    _, workdir, _ = trained
    saved = json.loads((workdir / "results" / "run_settings.json").read_text())
    assert saved["lora_r"] == 8 and saved["dataset_name"] == tutorial_data and len(saved["dataset_sha256"]) == 64
    assert set(saved) == set(safeguards.RUN_KEYS) | {"dataset_sha256", "recipe_changes"}


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--lora_r", "4", "lora_r 8 then, 4 now"),
        ("--learning_rate", "0.001", "learning_rate 0.0002 then, 0.001 now"),
        ("--eval_fraction", "0.1", "eval_fraction 0.05 then, 0.1 now"),
        ("--lora_dropout", "0", "lora_dropout 0.1 then, 0.0 now"),
        ("--loss_on", "all", "loss_on auto then, all now"),
        ("--warmup_ratio", "0.1", "warmup_ratio 0.03 then, 0.1 now"),
        ("--optim", "adamw_torch", "optim paged_adamw_32bit then, adamw_torch now"),
    ],
)
def test_rerun_with_other_rows_or_updates_is_refused(trained, tmp_path, capsys, option, value, words):
    _, workdir, args = trained
    args = [*args, option, value, "--new_model", str(tmp_path / "adapter")]
    assert_refused(finetune, args, capsys, words, "--output_dir", str(workdir / "results"))


def test_resume_under_another_gpu_recipe_is_refused(trained):
    """With gpu_recipe=auto, another GPU or less free memory picks another recipe, so other batches: the rerun says
    which recipe the checkpoints were made with, and does not mix the two."""
    _, workdir, args = trained
    # What auto picks for this model on a GPU with less room than the first run's
    settings = finetune.parse_settings(finetune.Settings, [*args, "--gpu_recipe", "checkpoint_every_layer"])
    with pytest.raises(common.UserError, match="gpu_recipe tutorial then, checkpoint_every_layer now"):
        safeguards.checkpoint_to_resume(settings, {})
    # and each setting the recipe changed is recorded: the same recipe with other changes is another run too
    settings = finetune.parse_settings(finetune.Settings, [*args, "--gpu_recipe", "tutorial"])
    with pytest.raises(common.UserError, match="recipe_changes {} then, {'packing': True} now"):
        safeguards.checkpoint_to_resume(settings, {"packing": True})


def test_rerun_with_other_base_model_is_refused(trained, tiny_model, tmp_path, capsys):
    _, workdir, args = trained
    shutil.copytree(tiny_model, tmp_path / "another-model")  # a model that loads: the resume check reads its config
    args = [*args, "--model_name", str(tmp_path / "another-model"), "--new_model", str(tmp_path / "adapter")]
    assert_refused(finetune, args, capsys, "model_name", "another-model", "--output_dir")


def test_rerun_with_edited_data_file_is_refused(trained, tiny_model, tutorial_data, tmp_path, capsys):
    _, workdir, args = trained
    data = tmp_path / "rows.jsonl"
    shutil.copy(tutorial_data, data)
    args = [*args, "--new_model", str(tmp_path / "adapter")]
    args[args.index("--dataset_name") + 1] = str(data)
    assert_refused(finetune, args, capsys, "dataset_name")
    with open(data, "a") as f:
        f.write(json.dumps({"text": "<s>[INST] one more [/INST] row </s>"}) + "\n")
    assert_refused(finetune, args, capsys, "dataset_sha256")


def test_existing_adapter_is_not_replaced_unasked(trained, capsys):
    _, workdir, args = trained
    before = (workdir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert_refused(finetune, args, capsys, str(workdir / "adapter"), "--overwrite_adapter")
    assert (workdir / "adapter" / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.parametrize("cut", ["missing", "cut off"])
def test_newest_checkpoint_cut_off_while_saving_is_skipped(trained, tmp_path, cut):
    _, workdir, args = trained
    results = tmp_path / "results"
    shutil.copytree(workdir / "results", results)
    state = results / "checkpoint-6" / "trainer_state.json"  # what a kill during the save of step 6 leaves
    if cut == "missing":
        os.remove(state)
    else:
        state.write_text(state.read_text()[:100])
    settings = finetune.parse_settings(finetune.Settings, [*args, "--output_dir", str(results), "--gpu_recipe", "tutorial"])
    assert safeguards.checkpoint_to_resume(settings, {}) == str(results / "checkpoint-5")


def slow_run_args(model, data, workdir):
    """Enough steps, and a checkpoint every 2, that a test can stop the run after its first checkpoint."""
    return tiny_run_args(model, data, workdir, "--max_steps", "16", "--save_steps", "2", "--report_to", "none")


def wait_for_first_checkpoint(process, results, timeout=120):
    """Polls for the first complete checkpoint (the trainer writes trainer_state.json last)."""
    deadline = time.monotonic() + timeout
    while not (results / "checkpoint-2" / "trainer_state.json").is_file():
        assert process.poll() is None, f"finetune.py ended before its first checkpoint:\n{process.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    assert process.poll() is None, "finetune.py finished before it could be stopped: give it more steps"


def test_killed_run_resumes_from_its_checkpoint(tiny_model, tutorial_data, tmp_path, monkeypatch, capsys):
    args = slow_run_args(tiny_model, tutorial_data, tmp_path)
    process = start_script("finetune.py", *args)
    wait_for_first_checkpoint(process, tmp_path / "results")
    process.kill()  # SIGKILL: no handler runs, as when a rented GPU goes away
    process.communicate()
    assert not (tmp_path / "adapter").exists()

    steps_trained = []
    training_step = finetune.SFTTrainer.training_step
    monkeypatch.setattr(
        finetune.SFTTrainer,
        "training_step",
        lambda self, *a, **kw: steps_trained.append(self.state.global_step) or training_step(self, *a, **kw),
    )
    trainer = finetune.main(args)

    resumed_line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resuming from")]
    assert len(resumed_line) == 1
    resumed_at = int(resumed_line[0].split("(step ")[1].split(")")[0])
    assert resumed_at >= 2 and resumed_at % 2 == 0
    assert steps_trained[0] == resumed_at and len(steps_trained) == 16 - resumed_at  # not from step 0
    assert trainer.state.global_step == 16
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "adapter")
    assert model.peft_config["default"].r == 64


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_model, tutorial_data, tmp_path):
    process = start_script("finetune.py", *slow_run_args(tiny_model, tutorial_data, tmp_path))
    wait_for_first_checkpoint(process, tmp_path / "results")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped: checkpoint of step")]
    assert len(stopped) == 1 and "run the same command again to resume" in stopped[0].lower()
    step = int(stopped[0].split("step ")[1].split()[0])
    assert 2 <= step < 16
    assert (tmp_path / "results" / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (tmp_path / "adapter").exists()


def test_folder_written_whole_keeps_the_old_folder_when_the_write_fails(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.txt").write_text("earlier run")
    with pytest.raises(OSError):
        with folder_written_whole(str(target)) as folder:
            (tmp_path / "adapter.partial" / "half.bin").write_text("half")
            assert folder == str(tmp_path / "adapter.partial")
            raise OSError("disk full")
    assert os.listdir(target) == ["old.txt"]

    with folder_written_whole(str(target)) as folder:
        (tmp_path / "adapter.partial" / "new.txt").write_text("this run")
    assert os.listdir(target) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no .partial, no .old left behind


# Bad inputs to finetune.py: one line, the fix, exit status 2, before anything heavy is loaded


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--max_length", "0", ["--max_length must be above 0", "1024"]),
        ("--learning_rate", "0", ["--learning_rate must be above 0"]),
        ("--learning_rate", "-0.0002", ["--learning_rate must be above 0"]),
        ("--lora_r", "0", ["--lora_r must be above 0", "64"]),
        ("--per_device_train_batch_size", "0", ["--per_device_train_batch_size must be above 0"]),
        ("--max_steps", "0", ["--max_steps must be above 0, or -1"]),
        ("--lora_dropout", "1", ["--lora_dropout must be at least 0 and below 1"]),
        ("--save_steps", "2.5", ["--save_steps must be 0"]),
        ("--optim", "adamw_32bit", ["unknown --optim 'adamw_32bit'", "did you mean", "paged_adamw_32bit"]),
        ("--lr_scheduler_type", "cosin", ["unknown --lr_scheduler_type 'cosin'", "cosine"]),
        ("--report_to", "tensorbord", ["unknown --report_to 'tensorbord'", "did you mean tensorboard"]),
        ("--learning_rate", "inf", ["--learning_rate must be a finite number (got inf)", "0.0002"]),
        ("--learning_rate", "nan", ["--learning_rate must be a finite number (got nan)"]),
        ("--num_train_epochs", "nan", ["--num_train_epochs must be a finite number (got nan)"]),
        ("--save_steps", "nan", ["--save_steps must be a finite number (got nan)"]),
        ("--lora_rank", "8", ["unknown setting --lora_rank", "did you mean --lora_r"]),
    ],
)
def test_bad_number_or_name_is_one_line(tiny_model, tutorial_data, tmp_path, capsys, option, value, words):
    assert_refused(finetune, tiny_run_args(tiny_model, tutorial_data, tmp_path, option, value), capsys, *words)
    assert not (tmp_path / "results").exists()


def test_unknown_model_folder_is_one_line(tutorial_data, tmp_path, capsys):
    args = tiny_run_args(str(tmp_path / "no-model"), tutorial_data, tmp_path)
    assert_refused(finetune, args, capsys, "cannot load the model", "no-model", "--model_name")


def test_unknown_hub_model_offline_is_one_line(tutorial_data, tmp_path, capsys):
    args = tiny_run_args("nobody-here/no-such-model", tutorial_data, tmp_path)
    assert_refused(finetune, args, capsys, "'nobody-here/no-such-model'", "--model_name", "network")


def test_logger_not_installed_is_one_line(tiny_model, tutorial_data, tmp_path, monkeypatch, capsys):
    """wandb, as on a machine without it (it is not in requirements.txt, but may be installed here)."""
    monkeypatch.setattr(safeguards, "get_available_reporting_integrations", lambda: ["tensorboard"])
    args = tiny_run_args(tiny_model, tutorial_data, tmp_path, "--report_to", "wandb")
    assert_refused(finetune, args, capsys, "--report_to wandb", "not installed", "--report_to none")


def test_empty_data_file_is_one_line(tiny_model, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    args = tiny_run_args(tiny_model, str(tmp_path / "empty.jsonl"), tmp_path)
    assert_refused(finetune, args, capsys, "empty.jsonl", "has no rows")


def test_bf16_forced_on_a_gpu_without_it_is_one_line(tiny_model, tutorial_data, tmp_path, monkeypatch, capsys):
    """A GPU of compute capability 7.5 (a T4), simulated: the check runs before anything touches CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (15 * 2**30, 16 * 2**30))  # its 16 GB, 15 free
    args = tiny_run_args(tiny_model, tutorial_data, tmp_path, "--precision", "bf16")
    assert_refused(finetune, args, capsys, "Tesla T4", "does not support bf16", "--precision fp16")


# merge_and_push.py: the adapter checked, the merged folder written whole and reused, the upload rerun


def merge_args(tiny_model, workdir, *extra):
    return ["--model_name", tiny_model, "--new_model", str(workdir / "adapter"), *extra]


def test_missing_adapter_folder_is_one_line(tiny_model, tmp_path, capsys):
    line = assert_refused(merge_and_push, merge_args(tiny_model, tmp_path, "--no_push"), capsys, "not found")
    assert "finetune.py" in line and str(tmp_path / "adapter") in line


def test_incomplete_adapter_folder_is_one_line(trained, tiny_model, tmp_path, capsys):
    _, workdir, _ = trained
    shutil.copytree(workdir / "adapter", tmp_path / "adapter")
    os.remove(tmp_path / "adapter" / "adapter_model.safetensors")
    args = merge_args(tiny_model, tmp_path, "--no_push")
    assert_refused(merge_and_push, args, capsys, "incomplete", "adapter_model.safetensors")
    assert not (tmp_path / "adapter-merged").exists()


def test_adapter_of_another_base_model_is_refused_naming_both(trained, tiny_model, tmp_path, capsys):
    _, workdir, _ = trained
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    args = merge_args(str(other), workdir, "--merged_dir", str(tmp_path / "merged"), "--no_push")
    assert_refused(merge_and_push, args, capsys, f"trained on '{tiny_model}'", f"not on '{other}'", "--model_name")
    assert not (tmp_path / "merged").exists()


def test_invalid_repo_name_is_one_line(trained, tiny_model, capsys):
    _, workdir, _ = trained
    args = merge_args(tiny_model, workdir, "--hub_repo", "me//bad name")
    assert_refused(merge_and_push, args, capsys, "--hub_repo 'me//bad name' is not a valid repo id")


def test_not_enough_disk_space_stops_before_the_merge(trained, tiny_model, tmp_path, monkeypatch, capsys):
    """A disk with 1 kB more free than the merged model's fp16 weights, simulated: not enough for the tokenizer, the
    card and the plot beside them."""
    _, workdir, _ = trained
    weights = common.count_parameters(common.load_config(tiny_model, False)) * 2
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(safeguards.shutil, "disk_usage", lambda path: usage(10**12, 10**12, weights + 1000))
    args = merge_args(tiny_model, workdir, "--merged_dir", str(tmp_path / "merged"), "--no_push")
    line = assert_refused(merge_and_push, args, capsys, "not enough disk space", "--merged_dir")
    adapter_folder = sum(f.stat().st_size for f in (workdir / "adapter").iterdir() if f.is_file())
    needed = int((weights + adapter_folder) * 1.05) + 16 * 2**20
    assert f"needs about {needed / 1e9:.3g} GB" in line and f"{(weights + 1000) / 1e9:.3g} GB free" in line
    assert not (tmp_path / "merged").exists()


def test_disk_filling_up_while_the_merged_folder_is_written_is_one_line(trained, tiny_model, tmp_path, monkeypatch,
                                                                         capsys):
    """The disk full half-way through the weights (simulated): one line, the earlier merged folder as it was, and no
    half-written copy left taking the space."""
    _, workdir, _ = trained
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "notes.txt").write_text("an earlier folder")

    def save_half(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", save_half)  # the merged tiny model's class
    args = merge_args(tiny_model, workdir, "--merged_dir", str(merged), "--no_push", "--overwrite_merged")
    assert_refused(merge_and_push, args, capsys, "No space left on device", "free some space", "--merged_dir", "kept")
    assert os.listdir(merged) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["merged"]


def test_folder_of_another_run_is_not_overwritten_unasked(trained, tiny_model, tmp_path, capsys):
    _, workdir, _ = trained
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "notes.txt").write_text("mine")
    args = merge_args(tiny_model, workdir, "--merged_dir", str(merged), "--no_push")
    assert_refused(merge_and_push, args, capsys, str(merged), "--overwrite_merged", "--merged_dir")
    assert os.listdir(merged) == ["notes.txt"]

    merge_and_push.main([*args, "--overwrite_merged"])
    files = os.listdir(merged)
    assert "notes.txt" not in files and {"model.safetensors", merge_and_push.MERGE_SOURCE_FILE} <= set(files)
    assert sorted(os.listdir(tmp_path)) == ["merged"]


def test_failed_upload_is_rerun_without_merging_again(trained, tiny_model, tmp_path, monkeypatch, capsys):
    _, workdir, _ = trained
    uploads, merges = record_pushes(monkeypatch, fail_first_upload=True).uploads, []
    merge_adapter = merge_and_push.merge_adapter
    monkeypatch.setattr(merge_and_push, "merge_adapter", lambda *a: merges.append(1) or merge_adapter(*a))
    args = merge_args(tiny_model, workdir, "--merged_dir", str(tmp_path / "merged"), "--hub_repo", "me/tiny")

    assert_refused(merge_and_push, args, capsys, "upload", "me/tiny", "Connection reset", "rerun the same command")
    assert len(merges) == 1 and (tmp_path / "merged" / "model.safetensors").is_file()

    merge_and_push.main(args)
    assert "complete merge of this adapter: using it, not merging again" in capsys.readouterr().out
    assert len(merges) == 1 and len(uploads) == 2
    repo_id, folder, files, ignored = uploads[1]
    assert (repo_id, folder) == ("me/tiny", str(tmp_path / "merged"))
    assert "model.safetensors" in files and ignored == [merge_and_push.MERGE_SOURCE_FILE]


def test_merge_of_an_adapter_changed_since_is_not_pushed(trained, tiny_model, tmp_path, capsys):
    _, workdir, _ = trained
    shutil.copytree(workdir / "adapter", tmp_path / "adapter")
    args = merge_args(tiny_model, tmp_path, "--no_push")
    merge_and_push.main(args)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["lora_alpha"] = 32  # as if finetune.py had been rerun with other settings
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    assert_refused(merge_and_push, args, capsys, "a merge of another adapter", "--overwrite_merged")


# The token: never printed, never written


def test_token_never_reaches_output_or_any_written_file(tiny_model, tutorial_data, tmp_path, monkeypatch, capfd):
    import datasets

    started = time.time()
    uploads = record_pushes(monkeypatch).uploads  # HF_TOKEN holds the fake token from here on, for both scripts
    finetune.main(tiny_run_args(tiny_model, tutorial_data, tmp_path, "--max_steps", "4", "--save_steps", "2"))
    merge_and_push.main(merge_args(tiny_model, tmp_path, "--hub_repo", "someone/tiny-qlora"))
    assert uploads, "the push did not run"

    written = [os.path.join(folder, name) for folder, _, names in os.walk(tmp_path) for name in names]
    cache = datasets.config.HF_DATASETS_CACHE  # the tokenized rows the trainer cached
    for folder, _, names in os.walk(cache):
        written += [p for p in (os.path.join(folder, n) for n in names) if os.path.getmtime(p) >= started]
    names = {os.path.basename(p) for p in written}
    assert {"run_settings.json", "trainer_state.json", "training_args.bin", "adapter_model.safetensors"} <= names
    assert any(name.startswith("events.out.tfevents") for name in names)
    for path in written:
        with open(path, "rb") as f:
            assert FAKE_TOKEN.encode() not in f.read(), f"the token is in {path}"
    out = capfd.readouterr()
    assert FAKE_TOKEN not in out.out + out.err


# More bad inputs: folders that are files or cannot be written, model folders that are not whole safetensors, LoRA
# layers the model does not have, rows with nothing to learn: one line, exit 2, before any weight loads, nothing lost


def model_copy(tiny_model, tmp_path):
    return shutil.copytree(tiny_model, tmp_path / "model")


def cut_weights(tiny_model, tmp_path, monkeypatch):
    weights = model_copy(tiny_model, tmp_path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    return ["--model_name", str(weights.parent)], [str(weights), "not a whole safetensors file", "again"]


def pickle_weights_only(tiny_model, tmp_path, monkeypatch):
    model = model_copy(tiny_model, tmp_path)
    torch.save(AutoModelForCausalLM.from_pretrained(model).state_dict(), model / "pytorch_model.bin")
    os.remove(model / "model.safetensors")
    return ["--model_name", str(model)], ["no .safetensors weights", "pytorch_model.bin", "save_pretrained"]


def code_of_its_own(tiny_model, tmp_path, monkeypatch):
    """A model type transformers does not know, whose config's auto_map names the folder's own code."""
    model = model_copy(tiny_model, tmp_path)
    plant_remote_code(model, tmp_path / "remote-code-ran")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "evil_llama"}))
    return ["--model_name", str(model)], ["needs Python code of its own", "auto_map", "--trust_remote_code"]


def existing_file(option):
    def make(tiny_model, tmp_path, monkeypatch):
        path = tmp_path / "mine.txt"
        path.write_text("the user's own file")
        return [f"--{option}", str(path)], [f"--{option} '{path}' is a file", f"another --{option}"]

    return make


def read_only_disk(tiny_model, tmp_path, monkeypatch):
    """A read-only mount, simulated (root writes in a chmod 555 folder, so a real test would need a mount)."""

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(common.tempfile, "TemporaryFile", refuse)
    return ["--output_dir", str(tmp_path / "ro" / "results")], ["--output_dir", "Read-only file system", "a disk"]


def option(*args_and_words):
    *args, words = args_and_words
    return lambda tiny_model, tmp_path, monkeypatch: (list(args), words)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(existing_file("output_dir"), id="output_dir is a file"),
        pytest.param(existing_file("new_model"), id="new_model is a file"),
        pytest.param(read_only_disk, id="output_dir read-only"),
        pytest.param(lambda m, t, mp: (["--model_name", os.path.join(m, "config.json")], ["is a file",
                     f"name the folder that holds the model ('{m}')"]), id="model_name is config.json"),  # fmt: skip
        pytest.param(cut_weights, id="model.safetensors cut off"),
        pytest.param(pickle_weights_only, id="only pytorch_model.bin"),
        pytest.param(code_of_its_own, id="model code of its own without --trust_remote_code"),
        pytest.param(option("--lora_target_modules", "qkv", ["has no layer called qkv", "q_proj", "all-linear"]),
                     id="lora_target_modules names no layer"),  # fmt: skip
        pytest.param(option("--lora_target_modules", "q_proj,vproj", ["has no layer called vproj:", "v_proj"]),
                     id="lora_target_modules names one layer that does not exist"),  # fmt: skip
        pytest.param(option("--max_length", "1", ["no row has a token that carries loss", "--max_length (1)"]),
                     id="max_length 1: nothing to learn after the shift"),  # fmt: skip
    ],
)
def test_bad_folder_model_or_layer_is_one_line_before_weights_load(tiny_model, tutorial_data, tmp_path, monkeypatch,
                                                                    capsys, make):
    extra, words = make(tiny_model, tmp_path, monkeypatch)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.setattr(finetune, "load_base_model", lambda *a: pytest.fail("the model's weights were loaded"))
    assert_refused(finetune, tiny_run_args(tiny_model, tutorial_data, tmp_path, *extra), capsys, *words)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing lost, nothing made


def test_rows_need_a_token_with_loss_after_the_shift(tiny_model):
    """The first token of a row never carries loss (labels are shifted by one): a text row needs two tokens within
    max_length."""
    tokenizer = common.load_tokenizer(tiny_model, False)
    rows = finetune.data.Dataset.from_dict({"text": tutorial_rows()[:3]})
    assert finetune.data.tokenize_rows(rows, tokenizer, False, 1)[1] == []
    assert finetune.data.tokenize_rows(rows, tokenizer, False, 2)[1] == [0, 1, 2]


def plant_remote_code(folder, marker):
    """An auto_map in the folder's config.json (and tokenizer_config.json) naming a module that, imported, writes
    `marker`: the code a model folder from the Hub could bring."""
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilModel(LlamaForCausalLM):\n    pass\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    for name, auto_map in (
        ("config.json", {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}),
        ("tokenizer_config.json", {"AutoTokenizer": [None, "evil.EvilTokenizer"]}),
    ):
        if (folder / name).is_file():
            config = json.loads((folder / name).read_text())
            (folder / name).write_text(json.dumps({**config, "auto_map": auto_map}))


def test_adapter_folder_cannot_turn_on_remote_code_or_pick_the_model(trained, tiny_model, tmp_path, monkeypatch):
    """An adapter folder is input: its training_info.json says trust_remote_code and names a model folder with an
    auto_map; the merge loads --model_name with the command line's trust_remote_code (off), and no planted code runs."""
    _, workdir, _ = trained
    marker = tmp_path / "remote-code-ran"
    evil_model = shutil.copytree(tiny_model, tmp_path / "evil-model")
    plant_remote_code(evil_model, marker)
    adapter = shutil.copytree(workdir / "adapter", tmp_path / "adapter")
    plant_remote_code(adapter, marker)
    info = json.loads((adapter / common.TRAINING_INFO).read_text())
    info["settings"].update(trust_remote_code=True, model_name=str(evil_model))
    (adapter / common.TRAINING_INFO).write_text(json.dumps(info))

    loaded = []
    original = merge_and_push.AutoModelForCausalLM.from_pretrained.__func__

    def recording(cls, name, *args, **kwargs):
        loaded.append((str(name), kwargs.get("trust_remote_code")))
        return original(cls, name, *args, **kwargs)

    monkeypatch.setattr(merge_and_push.AutoModelForCausalLM, "from_pretrained", classmethod(recording))
    merge_and_push.main(merge_args(tiny_model, tmp_path, "--merged_dir", str(tmp_path / "merged"), "--no_push"))
    assert not marker.exists(), "code from the adapter's or the model's folder ran"
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert loaded and all(trust is False for _, trust in loaded)
    assert {name for name, _ in loaded} == {tiny_model, str(tmp_path / "merged")}  # never the folder it names


def test_model_folder_with_an_auto_map_runs_no_code_without_trust_remote_code(tiny_model, tutorial_data, tmp_path):
    marker = tmp_path / "remote-code-ran"
    model = model_copy(tiny_model, tmp_path)
    plant_remote_code(model, marker)
    finetune.main(tiny_run_args(str(model), tutorial_data, tmp_path, "--check_data"))
    assert not marker.exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--merged_dir", "FILE"], ["--merged_dir", "is a file", "another --merged_dir"]),
        (["--merged_dir", "NOWHERE/merged"], ["does not exist", "create it", "another --merged_dir"]),
        (["--verify_rows", "0"], ["--verify_rows must be at least 1 (got 0)", "8"]),
        (["--verify_max_kl", "nan"], ["--verify_max_kl must be a finite number"]),
        (["--merge_dir", "x"], ["unknown setting --merge_dir", "did you mean --merged_dir"]),
    ],
)
def test_bad_merge_setting_is_one_line(trained, tiny_model, tmp_path, capsys, extra, words):
    _, workdir, _ = trained
    mine = tmp_path / "FILE"
    mine.write_text("the user's own file")
    extra = [arg.replace("FILE", str(mine)).replace("NOWHERE", str(tmp_path / "nowhere")) for arg in extra]
    assert_refused(merge_and_push, merge_args(tiny_model, workdir, "--no_push", *extra), capsys, *words)
    assert mine.read_text() == "the user's own file" and sorted(os.listdir(tmp_path)) == ["FILE"]


def test_adapter_whose_config_rank_differs_from_its_weights_is_one_line(trained, tiny_model, tmp_path, capsys):
    _, workdir, _ = trained
    adapter = shutil.copytree(workdir / "adapter", tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))  # the weights are rank 8
    args = merge_args(tiny_model, tmp_path, "--no_push")
    assert_refused(merge_and_push, args, capsys, "adapter_config.json says rank 4", "holds rank 8")
    assert not (tmp_path / "adapter-merged").exists()


@pytest.mark.parametrize("script", ["finetune.py", "merge_and_push.py"])
def test_ctrl_c_while_the_libraries_load_is_one_line(script):
    process = start_script(script, "--help")
    deadline = time.monotonic() + 60
    while "libtorch" not in open(f"/proc/{process.pid}/maps").read():  # torch loading: the handler is set by then,
        assert time.monotonic() < deadline and process.poll() is None  # and transformers and trl take seconds more
        time.sleep(0.02)
    assert process.poll() is None, "the imports ended before the test could hit them"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr and not stdout
    assert stderr.strip() == "interrupted (Ctrl-C) while loading the libraries: nothing was started"


# Training that breaks stops; a stopped or finished run resumes exactly


def test_loss_that_becomes_nan_stops_the_run_and_saves_no_adapter(tiny_model, tutorial_data, tmp_path, capsys):
    """A learning rate of 1e30 is finite (refused only when not), and turns the weights to inf and the loss to NaN
    within a few steps."""
    args = tiny_run_args(tiny_model, tutorial_data, tmp_path, "--learning_rate", "1e30", "--logging_steps", "5",
                         "--max_steps", "12", "--save_steps", "2", "--save_total_limit", "20",
                         "--report_to", "none")  # fmt: skip
    line = assert_refused(finetune, args, capsys, "training broke at step", "Nothing was saved", "--learning_rate")
    step = int(line.split("training broke at step ")[1].split(":")[0])
    assert step < 12 and ("loss is nan" in line or "grad_norm is" in line)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "adapter.partial").exists()
    saved = [int(name.split("-")[1]) for name in os.listdir(tmp_path / "results") if name.startswith("checkpoint-")]
    for checkpoint in saved:  # every checkpoint kept was logged finite before it was saved
        state = json.loads((tmp_path / "results" / f"checkpoint-{checkpoint}" / "trainer_state.json").read_text())
        assert checkpoint < step and all(
            torch.isfinite(torch.tensor(entry["loss"])) for entry in state["log_history"] if "loss" in entry
        )


def losses_by_step(log_history):
    return {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}


@pytest.mark.parametrize("dropout", ["0.1", "0"])
def test_resumed_run_equals_the_uninterrupted_one(tiny_model, tutorial_data, tmp_path, dropout):
    """Stopped after its checkpoint of step 4 (the later ones deleted, as a kill leaves them) and resumed: the same
    losses at every step, and the same adapter, bf16 like the uninterrupted run's."""
    def run(name):
        return finetune.main(tiny_run_args(tiny_model, tutorial_data, tmp_path / name, "--max_steps", "8",
                                           "--save_steps", "2", "--save_total_limit", "10", "--lora_r", "4",
                                           "--lora_dropout", dropout, "--report_to", "none",
                                           "--sample_max_new_tokens", "0"))  # fmt: skip

    straight = run("straight")
    shutil.copytree(tmp_path / "straight" / "results", tmp_path / "resumed" / "results")
    for step in (6, 8):
        shutil.rmtree(tmp_path / "resumed" / "results" / f"checkpoint-{step}")
    resumed = run("resumed")
    assert losses_by_step(resumed.state.log_history) == losses_by_step(straight.state.log_history)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert {w.dtype for w in a.values()} == {w.dtype for w in b.values()} == {torch.bfloat16}
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_finished_run_is_not_trained_again(trained, tmp_path, monkeypatch, capsys):
    """Its adapter lost (a kill after the last checkpoint, or deleted): the rerun saves it from the last checkpoint,
    trains no step, and training_info.json records the run's own last step."""
    _, workdir, args = trained
    shutil.copytree(workdir / "results", tmp_path / "results")
    args = [*args, "--output_dir", str(tmp_path / "results"), "--new_model", str(tmp_path / "adapter")]
    monkeypatch.setattr(finetune.SFTTrainer, "training_step", lambda *a, **kw: pytest.fail("trained a step again"))
    finetune.main(args)
    out = capsys.readouterr().out
    assert "checkpoint-6 is the last step of this run: saving its adapter, not training again" in out
    info = json.loads((tmp_path / "adapter" / common.TRAINING_INFO).read_text())
    assert info["global_step"] == 6 and max(losses_by_step(info["log_history"])) == 6
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    checkpoint = load_file(tmp_path / "results" / "checkpoint-6" / "adapter_model.safetensors")
    assert saved.keys() == checkpoint.keys() and all(torch.equal(saved[k], checkpoint[k]) for k in saved)


def test_training_info_is_written_before_the_adapter_takes_its_place(tiny_model, tutorial_data, tmp_path, monkeypatch):
    """A crash while training_info.json is written leaves no adapter folder that merge_and_push.py would refuse and
    finetune.py would not replace."""
    def killed(*args):
        raise OSError("killed")

    monkeypatch.setattr(finetune, "write_record", killed)
    with pytest.raises(OSError, match="killed"):
        finetune.main(tiny_run_args(tiny_model, tutorial_data, tmp_path, "--max_steps", "2", "--report_to", "none"))
    assert not (tmp_path / "adapter").exists()


# The Hub: every failure one line, the merged folder kept, the rerun pushes it without merging again. Against a fake
# Hub on 127.0.0.1, reached the way a user points huggingface_hub at another endpoint: HF_ENDPOINT.


@pytest.fixture(scope="module")
def merged_once(trained, tiny_model, tmp_path_factory):
    _, workdir, _ = trained
    merged = tmp_path_factory.mktemp("merged-once") / "merged"
    merge_and_push.main(merge_args(tiny_model, workdir, "--merged_dir", str(merged), "--no_push"))
    return merged


def point_hub_at(monkeypatch, endpoint):
    """huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import (conftest sets offline): both are set as
    variables and as what it read."""
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)


@pytest.mark.parametrize(
    "failure, words",
    [
        ("create_repo", ["500", "the fake Hub is down"]),
        ("refused", ["Connection refused"]),
        ("drop_commit", ["disconnected"]),
    ],
)
def test_hub_failure_is_one_line_and_the_rerun_pushes_without_merging(trained, tiny_model, merged_once, tmp_path,
                                                                      monkeypatch, capsys, failure, words):
    _, workdir, _ = trained
    merged = shutil.copytree(merged_once, tmp_path / "merged")
    monkeypatch.setattr(merge_and_push, "merge_adapter", lambda *a: pytest.fail("merged again"))
    args = merge_args(tiny_model, workdir, "--merged_dir", str(merged), "--hub_repo", "me/tiny")
    with running_hub(None if failure == "refused" else failure) as hub:
        point_hub_at(monkeypatch, closed_port_endpoint() if failure == "refused" else hub.endpoint)
        line = assert_refused(merge_and_push, args, capsys, "upload", "me/tiny", "rerun the same command", *words)
    assert FAKE_TOKEN not in line and not hub.commits and (merged / "model.safetensors").is_file()

    with running_hub() as hub:
        point_hub_at(monkeypatch, hub.endpoint)
        merge_and_push.main(args)
    assert "complete merge of this adapter: using it, not merging again" in capsys.readouterr().out
    (repo_id, files), = hub.commits
    assert hub.repos == [repo_id] == ["me/tiny"] and not hub.unknown
    assert files["model.safetensors"] == (merged / "model.safetensors").read_bytes()
    assert merge_and_push.MERGE_SOURCE_FILE not in files and "README.md" in files
