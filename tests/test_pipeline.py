"""The tutorial's pipeline end to end on the CPU: 4-bit NF4 + LoRA + SFTTrainer, then the merge and the push."""

import glob
import json
import os
import shutil

import bitsandbytes as bnb
import pytest
import torch
from helpers import FAKE_TOKEN, assert_one_line_error, record_pushes, run_script, tiny_run_args
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import finetune
import qlora
import merge_and_push
from common import UserError


@pytest.fixture(scope="module")
def trained(tiny_model, tutorial_data, tmp_path_factory):
    """One short training run, with command-line overrides of the file's constants."""
    workdir = tmp_path_factory.mktemp("run")
    args = tiny_run_args(tiny_model, tutorial_data, workdir, "--learning_rate", "1e-3", "--lora_r", "8")
    trainer = finetune.main(args)
    return trainer, workdir


def test_base_layers_are_bitsandbytes_4bit_nf4(trained):
    trainer, _ = trained
    layers = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "no bitsandbytes Linear4bit layer in the trained model"
    assert {layer.weight.quant_type for layer in layers} == {"nf4"}


def test_eval_forward_and_state_dict_leave_the_4bit_model_as_it_was(tiny_model):
    """On a CPU with AVX512-BF16 (the project's machine), bitsandbytes 0.50.2 repacks the 4-bit weights on an
    eval-mode forward and the next state_dict() unpacks them with their scales scrambled: without
    qlora.keep_4bit_weights_as_loaded the loss below changes (4.67200 to 4.67158 on this tiny model; 2.34 to 15.8
    mid-run on SmolLM2 in issue 13). On a CPU without AVX512-BF16 bitsandbytes never repacks: this passes either way."""
    settings = finetune.parse_settings(finetune.Settings, ["--model_name", tiny_model])
    model = qlora.load_base_model(settings, qlora.make_bnb_config(settings, torch.float32), {"": "cpu"})
    ids = torch.tensor([list(range(3, 60))])

    def training_mode_loss():
        model.train()
        with torch.no_grad():
            return model(ids, labels=ids).loss.item()

    before = training_mode_loss()
    model.eval()
    with torch.no_grad():
        model(ids)  # what the trainer's eval and the sample answer do
    model.state_dict()  # what every checkpoint and the adapter's save do
    assert training_mode_loss() == before


def test_command_line_overrides_reach_the_trainer(trained):
    trainer, _ = trained
    assert trainer.args.learning_rate == 1e-3
    assert trainer.args.max_steps == 6 and trainer.state.global_step == 6
    assert trainer.model.peft_config["default"].r == 8


def test_tutorial_settings_reach_the_trainer(trained):
    args = trained[0].args
    assert args.optim == "paged_adamw_32bit"
    assert args.lr_scheduler_type == "cosine"
    assert args.warmup_steps == 0.03
    assert args.max_grad_norm == 0.3 and args.weight_decay == 0.001
    assert args.train_sampling_strategy == "group_by_length"
    assert args.activation_checkpointing is True and args.packing is False
    assert args.save_strategy == "steps" and args.save_steps == 0.1  # changed from the tutorial: see README
    lora = trained[0].model.peft_config["default"]
    assert (lora.lora_alpha, lora.lora_dropout, lora.bias) == (16, 0.1, "none")


def test_adapter_is_saved_trained_and_loadable(trained, tiny_model):
    _, workdir = trained
    adapter = workdir / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b), "LoRA B weights are still zero: nothing was learned"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)
    assert model.peft_config["default"].r == 8
    assert AutoTokenizer.from_pretrained(adapter).pad_token == "</s>"


def test_loss_is_logged_to_tensorboard(trained):
    trainer, workdir = trained
    assert any("loss" in entry for entry in trainer.state.log_history)
    assert glob.glob(str(workdir / "results" / "runs" / "*" / "events.out.tfevents.*"))


@pytest.fixture(scope="module")
def merged(trained, tiny_model):
    _, workdir = trained
    # The tutorial's merge into the fp16 weights, which the test below compares with; test_publish.py checks the
    # default merge into the dequantized NF4 weights
    merge_and_push.main(
        ["--model_name", tiny_model, "--new_model", str(workdir / "adapter"), "--no_push", "--merge_base", "fp16"]
    )
    return workdir / "adapter-merged"


def test_merged_model_equals_base_plus_adapter(merged, trained, tiny_model):
    _, workdir = trained
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float16)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float16)
    # PeftModel wraps the model it is given in place: the base alone needs a copy of its own
    unmerged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float16), workdir / "adapter"
    )
    ids = AutoTokenizer.from_pretrained(merged)("<s>[INST] What is 3 plus 4? [/INST]", add_special_tokens=False)
    ids = torch.tensor([ids.input_ids])
    with torch.no_grad():
        merged_logits, adapter_logits = model(ids).logits.float(), unmerged(ids).logits.float()
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-2, rtol=1e-2)
    assert not torch.allclose(adapter_logits, base(ids).logits.float()), "the adapter changes nothing"
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids.shape[1]


def test_merged_folder_is_safetensors_with_tokenizer(merged):
    files = os.listdir(merged)
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert not [f for f in files if f.endswith(".bin")]


def test_push_uploads_the_merged_folder_without_printing_the_token(merged, trained, tiny_model, monkeypatch, capsys):
    """Everything up to the Hub runs; only the network calls are replaced, and they record what would go up."""
    _, workdir = trained
    pushed = record_pushes(monkeypatch)
    merge_and_push.main(
        ["--model_name", tiny_model, "--new_model", str(workdir / "adapter"), "--hub_repo", "someone/tiny-qlora"]
    )
    assert pushed.repos == ["someone/tiny-qlora"]
    ((repo_id, folder, files, _),) = pushed.uploads
    assert repo_id == "someone/tiny-qlora" and folder == str(merged)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    out = capsys.readouterr()
    assert FAKE_TOKEN not in out.out + out.err


def test_merged_model_worse_than_the_base_is_not_pushed_unasked(trained, tiny_model, tmp_path, monkeypatch, capsys):
    """An adapter that hurts (its LoRA B weights flipped and scaled by 5, as a run gone wrong might leave them): the
    merge equals base + adapter, so only the held-out loss against the base model's can stop it."""
    _, workdir = trained
    adapter = shutil.copytree(workdir / "adapter", tmp_path / "adapter")
    weights = load_file(adapter / "adapter_model.safetensors")
    save_file({k: -5 * w if "lora_B" in k else w for k, w in weights.items()}, adapter / "adapter_model.safetensors")
    uploads = record_pushes(monkeypatch).uploads
    args = ["--model_name", tiny_model, "--new_model", str(adapter), "--merged_dir", str(tmp_path / "merged"),
            "--hub_repo", "someone/tiny"]  # fmt: skip

    with pytest.raises(UserError) as refused:
        merge_and_push.main(args)
    report = json.loads((tmp_path / "merged" / merge_and_push.VERIFICATION).read_text())
    assert report["passed"] and not report["beats_base"] and report["loss_merged"] > report["loss_base"]
    line = str(refused.value)
    assert "\n" not in line and "Nothing was pushed" in line and "--push_unverified" in line
    assert f"{report['loss_merged']:.4f}, above the base model's {report['loss_base']:.4f}" in line
    assert not uploads

    merge_and_push.main([*args, "--push_unverified"])  # the merged folder is reused, and pushed with a warning
    assert len(uploads) == 1 and "WARNING" in capsys.readouterr().err
    assert "FAILED" in (tmp_path / "merged" / "README.md").read_text()


def test_large_model_without_gpu_stops_before_loading(tutorial_data, tmp_path):
    """A 1.3B-parameter config (no weights at all): refused on the CPU from its config alone."""
    config = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 24,
              "num_attention_heads": 16, "vocab_size": 32000}  # fmt: skip
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "config.json").write_text(json.dumps(config))
    result = run_script("finetune.py", *tiny_run_args(str(tmp_path / "big"), tutorial_data, tmp_path))
    assert_one_line_error(result, "CUDA GPU")


def test_push_without_token_stops_before_the_merge(trained, tiny_model, tmp_path):
    _, workdir = trained
    env = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf-home")}
    result = run_script("merge_and_push.py", "--model_name", tiny_model, "--new_model", str(workdir / "adapter"),
                        "--merged_dir", str(tmp_path / "merged"), env=env)  # fmt: skip
    assert_one_line_error(result, "token", "--no_push")
    assert not (tmp_path / "merged").exists()


def test_no_sample_answer_is_asked_for_in_training_nor_in_the_merge(tiny_model, tutorial_data, tmp_path, capsys):
    """--sample_max_new_tokens 0 skips the answer after training, and the merge's verification skips it too."""
    finetune.main(tiny_run_args(tiny_model, tutorial_data, tmp_path, "--sample_max_new_tokens", "0"))
    merge_and_push.main(["--model_name", tiny_model, "--new_model", str(tmp_path / "adapter"), "--no_push"])
    assert ">>>" not in capsys.readouterr().out
    report = json.loads((tmp_path / "adapter-merged" / merge_and_push.VERIFICATION).read_text())
    assert report["passed"] and report["sample"]["merged_answer"] is None
