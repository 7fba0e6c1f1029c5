"""What goes to the Hub: a merged model checked against its adapter, answers that stop, and the model cards."""

import contextlib
import io
import json
import os
import shutil

import pytest
import torch
from helpers import FAKE_TOKEN, record_pushes, tiny_run_args, tutorial_rows, write_jsonl
from huggingface_hub import ModelCard
from PIL import Image
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import card
import common
import finetune
import merge_and_push
import qlora
from common import UserError

BASE_LICENSE = "apache-2.0"
# Enough steps at a high learning rate for the tiny model to learn where the rows end (checked: the EOS the merged
# model stops on has a probability near 0.97 at that step, so greedy decoding does not hang on a coin toss)
TRAINING = ["--learning_rate", "2e-2", "--lora_r", "16", "--lora_dropout", "0", "--max_steps", "30",
            "--per_device_train_batch_size", "8", "--gradient_checkpointing", "False", "--logging_steps", "5",
            "--report_to", "none", "--sample_max_new_tokens", "20"]  # fmt: skip


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory):
    """The tiny model, with a license in its card, and an output layer able to make one token likely: at random
    init its logits stay within about +-1 whatever the hidden state (a LoRA run leaves that layer frozen), so no
    token, EOS included, could ever stand out as it does in a pretrained model."""
    folder = tmp_path_factory.mktemp("base") / "tiny-llama"
    shutil.copytree(tiny_model, folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight *= 50
    model.save_pretrained(folder)
    (folder / "README.md").write_text(f"---\nlicense: {BASE_LICENSE}\n---\n# A tiny Llama\n")
    return str(folder)


def train(base, data, workdir, *extra):
    return finetune.main(tiny_run_args(base, data, workdir, *TRAINING, *extra))


@pytest.fixture(scope="module")
def published(base, tutorial_data, tmp_path_factory):
    """A run on the tutorial's rows (each ends in EOS), merged with the default settings and not pushed."""
    workdir = tmp_path_factory.mktemp("publish")
    trainer = train(base, tutorial_data, workdir)
    merge_and_push.main(["--model_name", base, "--new_model", str(workdir / "adapter"), "--no_push"])
    return trainer, workdir


def test_eos_ending_each_training_row_carries_loss(published):
    """pad = eos: a collator that masks the pad id would mask every EOS too, and the model would never learn to stop.
    The batch is the one the trainer builds from its own tokenized rows."""
    trainer, _ = published
    rows = [trainer.train_dataset[i] for i in range(trainer.args.per_device_train_batch_size)]
    batch = trainer.data_collator(rows)
    eos = trainer.processing_class.eos_token_id
    assert eos == trainer.processing_class.pad_token_id
    for row, input_ids, labels in zip(rows, batch["input_ids"], batch["labels"]):
        end = len(row["input_ids"]) - 1
        assert input_ids[end] == eos and labels[end] == eos, "the EOS ending the row carries no loss"


def test_merged_folder_agrees_on_eos_and_pad(published):
    _, workdir = published
    merged = workdir / "adapter-merged"
    config = json.loads((merged / "config.json").read_text())
    generation = GenerationConfig.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "</s>"
    assert config["eos_token_id"] == generation.eos_token_id == tokenizer.eos_token_id
    assert config["pad_token_id"] == generation.pad_token_id == tokenizer.pad_token_id
    assert config["use_cache"] is True


@pytest.mark.parametrize("question", ["What is 3 plus 4?", "What is 9 plus 0?", "What is 5 plus 5?"])
def test_merged_model_stops_with_eos_on_a_training_prompt(published, question):
    """Loaded from disk with its own generation config: generation ends on EOS inside the budget."""
    _, workdir = published
    merged = workdir / "adapter-merged"
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = tokenizer(f"<s>[INST] {question} [/INST]", add_special_tokens=False, return_tensors="pt").input_ids
    budget = 20
    output = model.generate(ids, max_new_tokens=budget, do_sample=False)
    new_tokens = output[0, ids.shape[1] :]
    assert new_tokens[-1] == tokenizer.eos_token_id and len(new_tokens) < budget, tokenizer.decode(new_tokens)


def test_chat_template_renders_the_training_format(published):
    _, workdir = published
    tokenizer = AutoTokenizer.from_pretrained(workdir / "adapter-merged")
    row = tutorial_rows()[34]  # "<s>[INST] What is 3 plus 4? [/INST] 3 plus 4 is 7. </s>"
    question, answer = row.removeprefix("<s>[INST] ").removesuffix(" </s>").split(" [/INST] ")
    user = [{"role": "user", "content": question}]
    assert tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False) == f"<s>[INST] {question} [/INST]"
    conversation = user + [{"role": "assistant", "content": answer}]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == row


def test_right_adapter_passes_verification(published):
    _, workdir = published
    report = json.loads((workdir / "adapter-merged" / merge_and_push.VERIFICATION).read_text())
    assert report["passed"] is True and report["beats_base"] is True
    assert report["rows"] == 5  # the held-out rows: 5% of the 100, fewer than verify_rows=8
    assert report["heldout"] == {"rows_from": "held-out", "rows": 5, "tokens": 75, "loss_on": "all"}
    assert report["mean_kl"] < 1e-5 and report["max_abs_logit_diff"] < 1e-2
    assert report["loss_merged"] == pytest.approx(report["loss_unmerged"], abs=1e-3)
    assert report["loss_merged"] < report["loss_base"]


def test_auto_publishes_the_merge_of_the_lower_heldout_loss_and_says_why(published):
    """Both merges measured in memory; the one saved is the lower, and its folder, loaded back, scores the same."""
    _, workdir = published
    report = json.loads((workdir / "adapter-merged" / merge_and_push.VERIFICATION).read_text())
    merged = {base: report["merges"][base]["loss_merged"] for base in merge_and_push.MERGE_BASES}
    chosen, other = sorted(merged, key=merged.get)
    assert report["merge_base"] == chosen and merged[chosen] < merged[other]
    assert report["loss_merged"] == pytest.approx(merged[chosen], rel=1e-5)
    assert f"{merged[chosen]:.4f}" in report["merge_choice"] and f"{merged[other]:.4f}" in report["merge_choice"]
    source = json.loads((workdir / "adapter-merged" / merge_and_push.MERGE_SOURCE_FILE).read_text())
    assert source["merge_base"] == chosen
    assert report["loss_base"] == report["merges"]["fp16"]["loss_base"]  # the original weights, adapter off


def test_a_merged_folder_of_the_other_merge_is_not_reused_for_a_forced_one(published, base):
    _, workdir = published
    merged_into = json.loads((workdir / "adapter-merged" / merge_and_push.MERGE_SOURCE_FILE).read_text())["merge_base"]
    other = next(name for name in merge_and_push.MERGE_BASES if name != merged_into)
    with pytest.raises(UserError, match=f"not the {other} merge: pass --overwrite_merged"):
        merge_and_push.main(["--model_name", base, "--new_model", str(workdir / "adapter"), "--no_push",
                             "--merge_base", other])  # fmt: skip


def test_finetune_measures_the_heldout_loss_before_and_after_as_the_trainers_eval_does(published):
    """The same rows, rendering and loss mask: the trainer's own eval loss of its eval rows (one batch of 5), with
    the adapter off (the base, before training) and on (after)."""
    trainer, workdir = published
    heldout = json.loads((workdir / "adapter" / common.TRAINING_INFO).read_text())["heldout_loss"]

    def trainer_eval_loss():  # evaluation_loop, not evaluate(): nothing is added to the log history
        return trainer.evaluation_loop(trainer.get_eval_dataloader(), "eval").metrics["eval_loss"]

    assert heldout["rows"] == 5 and heldout["loss_on"] == "all"
    assert heldout["after_training"] == pytest.approx(trainer_eval_loss(), rel=1e-5)
    with trainer.model.disable_adapter():
        assert heldout["before_training"] == pytest.approx(trainer_eval_loss(), rel=1e-5)
    report = json.loads((workdir / "adapter-merged" / merge_and_push.VERIFICATION).read_text())
    assert report["finetune"] == heldout
    assert report["loss_4bit_adapter"] == pytest.approx(heldout["after_training"], rel=1e-3)


def test_nf4_merge_stays_closer_to_the_trained_adapter_than_fp16(published, base, capsys):
    """The tiny model's measurement of the two merges (README quotes what this prints); --merge_base fp16 forces the
    fp16 merge, which is then the only one made."""
    _, workdir = published
    merge_and_push.main(["--model_name", base, "--new_model", str(workdir / "adapter"), "--no_push",
                         "--merge_base", "fp16", "--merged_dir", str(workdir / "merged-fp16")])  # fmt: skip
    reports = {
        name: json.loads((workdir / folder / merge_and_push.VERIFICATION).read_text())
        for name, folder in (("nf4", "adapter-merged"), ("fp16", "merged-fp16"))
    }
    with capsys.disabled():
        for name, r in reports.items():
            print(f"\nmerge_base={name}: loss merged {r['loss_merged']:.4f}, adapter on 4-bit base "
                  f"{r['loss_4bit_adapter']:.4f}, KL merged vs 4-bit adapter {r['mean_kl_to_4bit_adapter']:.3g}, "
                  f"KL merged vs base+adapter {r['mean_kl']:.3g}")  # fmt: skip
    assert reports["fp16"]["passed"], "the fp16 merge equals fp16 base + adapter too"
    assert reports["fp16"]["merge_base"] == "fp16" and "loss_merged" not in reports["fp16"]["merges"].get("nf4", {})
    nf4_gap = abs(reports["nf4"]["loss_merged"] - reports["nf4"]["loss_4bit_adapter"])
    fp16_gap = abs(reports["fp16"]["loss_merged"] - reports["fp16"]["loss_4bit_adapter"])
    assert reports["nf4"]["mean_kl_to_4bit_adapter"] < reports["fp16"]["mean_kl_to_4bit_adapter"]
    assert nf4_gap < fp16_gap


OTHER_ROWS = [f"<s>[INST] What is {a} plus {b}? [/INST] {b} plus {a} is {a * b}. </s>" for a in range(10) for b in range(10)]  # fmt: skip


@pytest.fixture(scope="module", params=["other data", "other rank"])
def wrong_adapter(request, base, tutorial_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("wrong")
    if request.param == "other data":
        data = write_jsonl(workdir / "other.jsonl", [{"text": row} for row in OTHER_ROWS])
        train(base, data, workdir, "--max_steps", "10")
    else:
        train(base, tutorial_data, workdir, "--max_steps", "10", "--lora_r", "4")
    return workdir / "adapter"


def verify(base, merged_dir, adapter, *extra):
    settings = merge_and_push.parse_settings(
        merge_and_push.Settings, ["--model_name", base, "--new_model", str(adapter), "--merged_dir", str(merged_dir), *extra]
    )  # fmt: skip
    info = common.read_training_info(settings.new_model)
    train_settings = merge_and_push.train_settings_for(settings, info)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    rows, heldout = merge_and_push.scoring_rows(settings, train_settings, tokenizer)
    merge = {"base": json.loads((merged_dir / merge_and_push.MERGE_SOURCE_FILE).read_text())["merge_base"],
             "why": "the folder's", "heldout": heldout,
             "measured": merge_and_push.measure_merges(settings, train_settings, rows, [])}  # fmt: skip
    return settings, merge_and_push.verify_merged(settings, info, train_settings, tokenizer, rows, merge)


def test_merged_folder_of_another_adapter_is_caught(published, wrong_adapter, base, tmp_path, capsys, request):
    """The merged folder on disk is checked against the adapter the user means to publish, not against itself
    (README quotes the mean KL this prints for each wrong adapter)."""
    _, workdir = published
    merged = shutil.copytree(workdir / "adapter-merged", tmp_path / "merged")
    settings, report = verify(base, merged, wrong_adapter)
    with capsys.disabled():
        print(f"\nmerged folder vs base + the adapter of {request.node.callspec.params['wrong_adapter']}: "
              f"mean KL {report.mean_kl:.3g} (verify_max_kl {settings.verify_max_kl})")
    assert report.passed is False and report.mean_kl > 10 * settings.verify_max_kl
    assert json.loads((merged / merge_and_push.VERIFICATION).read_text())["passed"] is False
    with pytest.raises(UserError, match="does not behave like base"):
        merge_and_push.check_verification(report, settings)

    settings.push_unverified = True
    merge_and_push.check_verification(report, settings)
    assert "WARNING" in capsys.readouterr().err


def test_training_info_holds_what_the_card_needs(published):
    trainer, workdir = published
    info = json.loads((workdir / "adapter" / common.TRAINING_INFO).read_text())
    assert info["settings"]["learning_rate"] == 2e-2 and info["settings"]["lora_r"] == 16
    assert set(info["versions"]) == set(common.LIBRARIES)
    assert info["gpu"] == "none (CPU)" and info["train_runtime_s"] > 0 and info["global_step"] == 30
    assert info["tokens_seen"] > 30 * 8 * 10  # 30 steps of 8 rows of more than 10 tokens
    assert info["final_train_loss"] == [e["loss"] for e in trainer.state.log_history if "loss" in e][-1]
    assert info["log_history"] == json.loads(json.dumps(trainer.state.log_history))
    assert info["sample"]["prompt"] == "What is a large language model?"


def test_model_card_parses_and_holds_the_fields(published, base):
    _, workdir = published
    merged = workdir / "adapter-merged"
    model_card = ModelCard.load(merged / "README.md")
    data = model_card.data
    assert data.base_model == base and data.license == BASE_LICENSE
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert set(card.TAGS) <= set(data.tags)
    assert data.datasets is None  # a local file is not a Hub data set
    text = model_card.text
    info = json.loads((workdir / "adapter" / common.TRAINING_INFO).read_text())
    report = json.loads((merged / merge_and_push.VERIFICATION).read_text())
    for name, value in info["settings"].items():
        assert f"| `{name}` | {f'`{value}`' if value not in ('', None) else '(empty)'} |" in text
    for name, value in info["versions"].items():
        assert f"| `{name}` | `{value}` |" in text
    assert f"{info['train_runtime_s']:.4g} s (30 steps) on GPU: none (CPU)" in text
    assert f"Tokens seen: {info['tokens_seen']}" in text
    assert f"Final train loss (last logged step): {info['final_train_loss']:.4g}" in text
    assert f"| {report['mean_kl']:.4g} (limit 0.01) |" in text
    assert f"| {report['max_abs_logit_diff']:.4g} |" in text
    for what, loss in report["heldout_losses"]:
        assert f"| {what} | {loss:.4g} |" in text
    assert f"![training loss]({card.LOSS_PLOT})" in text
    assert repr(f"<s>[INST] {info['settings']['sample_prompt']} [/INST]") in text
    with Image.open(merged / card.LOSS_PLOT) as image:
        assert image.format == "PNG" and image.size[0] > 100
        image.verify()


def test_sample_answers_shown_are_the_models_own(published, base, tmp_path, capsys):
    """The card's answer is the merged folder's; the adapter's answer printed beside it is the 4-bit base + adapter's,
    made on the checked path, never the one training_info.json holds (on the CPU bug's path it was noise)."""
    _, workdir = published
    adapter = shutil.copytree(workdir / "adapter", tmp_path / "adapter")
    info = json.loads((adapter / common.TRAINING_INFO).read_text())
    info["sample"]["answer"] = "Sufi called Sufi Sufiress"
    (adapter / common.TRAINING_INFO).write_text(json.dumps(info))
    merged = tmp_path / "merged"
    merge_and_push.main(["--model_name", base, "--new_model", str(adapter), "--merged_dir", str(merged), "--no_push",
                         "--merge_base", "nf4"])  # fmt: skip
    out = capsys.readouterr().out
    card_text = (merged / "README.md").read_text()
    assert "Sufi" not in out and "Sufi" not in card_text

    prompt, budget = info["settings"]["sample_prompt"], info["settings"]["sample_max_new_tokens"]
    tokenizer = AutoTokenizer.from_pretrained(merged)
    merged_answer = qlora.sample_answer(AutoModelForCausalLM.from_pretrained(merged), tokenizer, prompt, budget)
    assert f"the merged model              >>> {merged_answer}\n" in out and repr(merged_answer) in card_text
    settings = merge_and_push.parse_settings(merge_and_push.Settings, ["--model_name", base, "--new_model", str(adapter)])
    train_settings = merge_and_push.train_settings_for(settings, common.read_training_info(str(adapter)))
    trained = PeftModel.from_pretrained(merge_and_push.load_4bit_base(train_settings), adapter)
    adapter_answer = qlora.sample_answer(trained, tokenizer, prompt, budget)
    assert f"the adapter on the 4-bit base >>> {adapter_answer}\n" in out


def test_card_names_a_hub_dataset():
    settings = {"model_name": "NousResearch/Llama-2-7b-chat-hf", "dataset_name": "mlabonne/guanaco-llama2-1k"}
    data = card.card_data(settings, "transformers")  # offline: the base model's Hub card cannot be read
    assert data.datasets == ["mlabonne/guanaco-llama2-1k"] and data.license is None


def python_blocks(text):
    return [block.split("\n", 1)[1] for block in text.split("```python")[1:] for block in [block.split("```")[0]]]


def test_usage_snippets_of_the_card_run_and_agree(published):
    """The card's two snippets, pointed at the local folder: the raw prompt and the chat template give one answer."""
    _, workdir = published
    merged = workdir / "adapter-merged"
    model_card = ModelCard.load(merged / "README.md")
    snippets = python_blocks(model_card.text)
    assert len(snippets) == 2
    outputs = []
    for snippet in snippets:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(snippet.replace('"adapter"', repr(str(merged))), {})
        outputs.append(out.getvalue())
    assert outputs[0] == outputs[1] and outputs[0].strip()


def test_adapter_without_training_info_is_refused(published, base, tmp_path):
    _, workdir = published
    adapter = shutil.copytree(workdir / "adapter", tmp_path / "adapter")
    os.remove(adapter / common.TRAINING_INFO)
    with pytest.raises(UserError, match="training_info.json"):
        merge_and_push.main(["--model_name", base, "--new_model", str(adapter), "--no_push"])


def test_push_sends_the_card_and_the_adapter_to_their_repos(published, base, tmp_path, monkeypatch, capsys):
    """Only the network calls are replaced; they record what would go up."""
    _, workdir = published
    pushed = record_pushes(monkeypatch)
    merge_and_push.main(["--model_name", base, "--new_model", str(workdir / "adapter"), "--hub_repo", "someone/tiny",
                         "--merged_dir", str(tmp_path / "merged"), "--push_adapter"])  # fmt: skip

    ((repo_id, _, files, _),) = pushed.uploads
    assert repo_id == "someone/tiny"
    assert {"README.md", card.LOSS_PLOT, merge_and_push.VERIFICATION, "model.safetensors"} <= set(files)
    ((repo_id, operations),) = pushed.commits
    assert repo_id == "someone/tiny-adapter"
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", card.LOSS_PLOT} <= set(operations)
    assert "training_args.bin" not in operations  # a pickle; training_info.json holds the settings
    adapter_card = ModelCard(operations["README.md"].path_or_fileobj.decode())
    assert adapter_card.data.base_model == base and adapter_card.data.library_name == "peft"
    assert "someone/tiny" in adapter_card.text and "AutoPeftModelForCausalLM" in adapter_card.text
    out = capsys.readouterr()
    assert FAKE_TOKEN not in out.out + out.err
    assert "the adapter on the 4-bit base >>>" in out.out and "the merged model              >>>" in out.out
