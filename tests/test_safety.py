"""Nothing lost: checkpoints and resume, folders written whole, each bad input one line, a token that never leaks."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple

import pytest
from huggingface_hub import RepoUrl
import torch
from conftest import ROOT, tiny_run_args, tutorial_rows, write_jsonl
from peft import PeftModel
from transformers import AutoModelForCausalLM

import common
import finetune
import merge_and_push
from common import folder_written_whole, run_cli

FAKE_TOKEN = "hf_FakeTokenForTestsOnly0123456789abcdef"


def cli(module, args, capsys):
    """module.main(args) behind the CLI's own wrapper: (exit status, the stderr lines that start with 'error: ')."""
    with pytest.raises(SystemExit) as exit:
        run_cli(lambda: module.main(args))
    err = capsys.readouterr().err
    return exit.value.code, [line for line in err.splitlines() if line.startswith("error: ")]


def assert_refused(module, args, capsys, *words):
    status, errors = cli(module, args, capsys)
    assert status == 2
    assert len(errors) == 1, errors
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


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
    assert set(saved) == set(finetune.RUN_KEYS) | {"dataset_sha256"}


def test_rerun_with_other_lora_shape_is_refused(trained, tmp_path, capsys):
    _, workdir, args = trained
    args = [*args, "--lora_r", "4", "--new_model", str(tmp_path / "adapter")]
    assert_refused(finetune, args, capsys, "lora_r 8 then, 4 now", "--output_dir", str(workdir / "results"))


def test_resume_under_another_gpu_recipe_is_refused(trained):
    """With gpu_recipe=auto, another GPU or less free memory picks another recipe, so other batches: the rerun says
    which recipe the checkpoints were made with, and does not mix the two."""
    _, workdir, args = trained
    # What auto picks for this model on a GPU with less room than the first run's
    settings = finetune.parse_settings(finetune.Settings, [*args, "--gpu_recipe", "checkpoint_every_layer"])
    with pytest.raises(common.UserError, match="gpu_recipe tutorial then, checkpoint_every_layer now"):
        finetune.checkpoint_to_resume(settings, {})
    # and each setting the recipe changed is recorded: the same recipe with other changes is another run too
    settings = finetune.parse_settings(finetune.Settings, [*args, "--gpu_recipe", "tutorial"])
    with pytest.raises(common.UserError, match="recipe_changes {} then, {'packing': True} now"):
        finetune.checkpoint_to_resume(settings, {"packing": True})


def test_rerun_with_other_base_model_is_refused(trained, tmp_path, capsys):
    _, workdir, args = trained
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


def test_newest_checkpoint_cut_off_while_saving_is_skipped(trained, tmp_path):
    _, workdir, args = trained
    results = tmp_path / "results"
    shutil.copytree(workdir / "results", results)
    os.remove(results / "checkpoint-6" / "trainer_state.json")  # what a kill during the save of step 6 leaves
    settings = finetune.parse_settings(finetune.Settings, [*args, "--output_dir", str(results), "--gpu_recipe", "tutorial"])
    assert finetune.checkpoint_to_resume(settings, {}) == str(results / "checkpoint-5")


def slow_run_args(model, data, workdir):
    """Enough steps, and a checkpoint every 2, that a test can stop the run after its first checkpoint."""
    return tiny_run_args(model, data, workdir, "--max_steps", "16", "--save_steps", "2", "--report_to", "none")


def start_finetune(args):
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "finetune.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=ROOT,
    )


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
    process = start_finetune(args)
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
    process = start_finetune(slow_run_args(tiny_model, tutorial_data, tmp_path))
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


def test_missing_data_file_is_one_line(tiny_model, tmp_path, capsys):
    args = tiny_run_args(tiny_model, str(tmp_path / "nope.jsonl"), tmp_path)
    assert_refused(finetune, args, capsys, "nope.jsonl", "not found", "--dataset_name")


def test_logger_not_installed_is_one_line(tiny_model, tutorial_data, tmp_path, monkeypatch, capsys):
    """wandb, as on a machine without it (it is not in requirements.txt, but may be installed here)."""
    monkeypatch.setattr(finetune, "get_available_reporting_integrations", lambda: ["tensorboard"])
    args = tiny_run_args(tiny_model, tutorial_data, tmp_path, "--report_to", "wandb")
    assert_refused(finetune, args, capsys, "--report_to wandb", "not installed", "--report_to none")


def test_unknown_hub_data_set_offline_is_one_line(tiny_model, tmp_path, capsys):
    args = tiny_run_args(tiny_model, "nobody-here/no-such-data", tmp_path)
    assert_refused(finetune, args, capsys, "'nobody-here/no-such-data'", "--dataset_name", "network")


def test_empty_data_file_is_one_line(tiny_model, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    args = tiny_run_args(tiny_model, str(tmp_path / "empty.jsonl"), tmp_path)
    assert_refused(finetune, args, capsys, "empty.jsonl", "has no rows")


def test_malformed_json_line_names_its_line(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": row} for row in tutorial_rows()[:2]])
    with open(data, "a") as f:
        f.write('{"text": "<s>[INST] unfinished\n')
    assert_refused(finetune, tiny_run_args(tiny_model, data, tmp_path), capsys, "rows.jsonl", "line 3", "Fix or remove that line")


def test_wrong_columns_are_one_line(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "hi", "reply": "hello"}])
    assert_refused(finetune, tiny_run_args(tiny_model, data, tmp_path), capsys, "question, reply", "--text_column")


def test_bf16_forced_on_a_gpu_without_it_is_one_line(tiny_model, tutorial_data, tmp_path, monkeypatch, capsys):
    """A GPU of compute capability 7.5 (a T4), simulated: the check runs before anything touches CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (15 * 2**30, 16 * 2**30))  # its 16 GB, 15 free
    args = tiny_run_args(tiny_model, tutorial_data, tmp_path, "--precision", "bf16")
    assert_refused(finetune, args, capsys, "Tesla T4", "does not support bf16", "--precision fp16")


def test_real_cli_prints_one_line_without_traceback(tiny_model, tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\nnot json\n')
    args = tiny_run_args(tiny_model, str(tmp_path / "rows.jsonl"), tmp_path)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "finetune.py"), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "rows.jsonl': line 2," in errors[0]


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
    """A disk with 1 kB less free than the merged model's fp16 weights, simulated."""
    _, workdir, _ = trained
    needed = common.count_parameters(common.load_config(tiny_model, False)) * 2
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(merge_and_push.shutil, "disk_usage", lambda path: usage(10**12, 10**12, needed - 1000))
    args = merge_args(tiny_model, workdir, "--merged_dir", str(tmp_path / "merged"), "--no_push")
    line = assert_refused(merge_and_push, args, capsys, "not enough disk space", "--merged_dir")
    assert f"needs about {needed / 1e9:.3g} GB" in line and f"{(needed - 1000) / 1e9:.3g} GB free" in line
    assert not (tmp_path / "merged").exists()


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


def fake_hub(monkeypatch, uploads, fail_first=False):
    """Only the two network calls are replaced; they record what would go up, and the first upload can fail."""

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        uploads.append((repo_id, str(folder_path), sorted(os.listdir(folder_path)), ignore_patterns))
        if fail_first and len(uploads) == 1:
            raise ConnectionError("Connection reset by peer")

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(merge_and_push.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(merge_and_push.HfApi, "upload_folder", upload_folder)


def test_failed_upload_is_rerun_without_merging_again(trained, tiny_model, tmp_path, monkeypatch, capsys):
    _, workdir, _ = trained
    uploads, merges = [], []
    fake_hub(monkeypatch, uploads, fail_first=True)
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
    uploads = []
    fake_hub(monkeypatch, uploads)  # HF_TOKEN holds the fake token from here on, for both scripts
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
