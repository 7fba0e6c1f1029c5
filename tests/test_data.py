"""Your own data set: every source, every shape, the rendering shared by training, the sample answer and the saved
tokenizer, answers-only loss, the data check and the eval split. Files are written here; the model is conftest's."""

import contextlib
import glob
import io
import json
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import tiny_run_args, tutorial_rows, write_jsonl
from test_pipeline import assert_one_line_error, run_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoTokenizer

import data
import finetune
from common import UserError, load_tokenizer

QA = [{"question": f"What is {a} plus 1?", "answer": f"{a} plus 1 is {a + 1}."} for a in range(10)]
CHAT = [
    {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"What is {a} plus 1?"},
        {"role": "assistant", "content": f"{a + 1}."},
        {"role": "user", "content": "And plus 2?"},
        {"role": "assistant", "content": f"{a + 2}."},
    ]}
    for a in range(10)
]  # fmt: skip
CHAT_ROW_0 = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 0 plus 1? [/INST] 1. </s><s>[INST] And plus 2? [/INST] 2. </s>"


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    tokenizer = load_tokenizer(tiny_model, False)
    data.use_chat_template(tokenizer)
    return tokenizer


def rendered(path, tokenizer, **mapping):
    """The first row of a file as the trainer's text: (shape name, text)."""
    rows = data.load_source(str(path))
    shape = data.detect_shape(rows.column_names, **mapping)
    row = data.rows_in_shape(rows, shape)[0]
    text = row["text"] if "text" in row else tokenizer.apply_chat_template(row["messages"], tokenize=False)
    return shape.name, text


# Sources
def test_jsonl_file(tutorial_data):
    assert data.load_source(tutorial_data)["text"][:2] == tutorial_rows()[:2]


def test_json_list_of_records_and_json_lines(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(QA))
    write_jsonl(tmp_path / "lines.json", QA)
    for name in ("list.json", "lines.json"):
        rows = data.load_source(str(tmp_path / name))
        assert len(rows) == 10 and rows[3] == QA[3]


def test_csv_and_tsv_files(tmp_path):
    pd.DataFrame(QA).to_csv(tmp_path / "qa.csv", index=False)
    pd.DataFrame(QA).to_csv(tmp_path / "qa.tsv", index=False, sep="\t")
    for name in ("qa.csv", "qa.tsv"):
        rows = data.load_source(str(tmp_path / name))
        assert rows.column_names == ["question", "answer"] and rows[9] == QA[9]


def test_parquet_file(tmp_path):
    pd.DataFrame(QA).to_parquet(tmp_path / "qa.parquet")
    assert data.load_source(str(tmp_path / "qa.parquet"))[0] == QA[0]


def test_folder_of_files(tmp_path):
    write_jsonl(tmp_path / "part1.jsonl", QA[:4])
    (tmp_path / "more").mkdir()
    write_jsonl(tmp_path / "more" / "part2.jsonl", QA[4:])
    assert sorted(data.load_source(str(tmp_path))["question"]) == sorted(row["question"] for row in QA)


def test_hub_id_that_cannot_be_loaded_is_one_line():
    with pytest.raises(UserError, match="someone/no-such-data-set.*--dataset_name"):
        data.load_source("someone/no-such-data-set", "cfg", "train")


# Bad inputs
def test_broken_jsonl_line_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n')
    with pytest.raises(UserError, match=r"rows\.jsonl': line 3"):
        data.load_source(str(path))


def test_broken_json_list_is_named(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n{"text": "a"},\n{"text": "b"\n{"text": "c"}\n]\n')
    with pytest.raises(UserError, match=r"rows\.json': line 4"):
        data.load_source(str(path))


def test_csv_row_with_extra_field_is_named(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nhi,hello\nhow,are,you\n")
    with pytest.raises(UserError, match=r"qa\.csv': line 3 has 3 fields"):
        data.load_source(str(path))


def test_broken_file_stops_the_command_line_with_one_line(tiny_model, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n')
    result = run_script("finetune.py", *tiny_run_args(tiny_model, str(path), tmp_path, "--check_data"))
    assert_one_line_error(result, "rows.jsonl", "line 2")


def test_folder_of_mixed_formats_is_refused(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", QA)
    pd.DataFrame(QA).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(UserError, match="mixes .csv, .jsonl"):
        data.load_source(str(tmp_path))


def test_unrecognised_columns_list_them_and_the_mapping_settings():
    with pytest.raises(UserError, match="columns q, reply.*--text_column.*--prompt_column and --response_column"):
        data.detect_shape(["q", "reply"])


def test_mapped_column_that_is_missing_is_named():
    with pytest.raises(UserError, match="no column 'body'.*its columns: q, reply"):
        data.detect_shape(["q", "reply"], text_column="body")


def test_no_rows(tokenizer, tmp_path):
    (tmp_path / "empty.csv").write_text("question,answer\n")
    with pytest.raises(UserError, match="empty.csv' has no rows"):
        data.load_source(str(tmp_path / "empty.csv"))
    with pytest.raises(UserError, match="has no rows"):
        data.check_rows(data.Dataset.from_dict({"messages": []}), tokenizer, 64, True)


def test_every_row_empty(tokenizer):
    rows = data.rows_in_shape(data.Dataset.from_list([{"text": " <s> </s>"}, {"text": ""}]), data.Shape("text", ("text",), False))
    with pytest.raises(UserError, match="every row is empty"):
        data.check_rows(rows, tokenizer, 64, False)


def test_no_row_with_a_token_that_carries_loss(tokenizer):
    rows = data.Dataset.from_list([{"messages": [{"role": "user", "content": "What is 1 plus 1?"}]}] * 3)
    with pytest.raises(UserError, match="no row has a token that carries loss"):
        data.check_rows(rows, tokenizer, 64, True)


def test_answers_only_loss_on_text_rows_is_refused():
    with pytest.raises(UserError, match="--loss_on answers needs rows that mark"):
        data.answers_only_for(data.detect_shape(["text"]), "answers")


# Shapes
def test_text_rows_are_used_as_they_are(tutorial_data, tokenizer):
    assert rendered(tutorial_data, tokenizer) == ("text", tutorial_rows()[0])


def test_messages_with_system_and_several_turns_in_the_llama2_format(tmp_path, tokenizer):
    assert rendered(write_jsonl(tmp_path / "chat.jsonl", CHAT), tokenizer) == ("messages", CHAT_ROW_0)


def test_sharegpt_conversations(tmp_path, tokenizer):
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    rows = [{"conversations": [{"from": speakers[m["role"]], "value": m["content"]} for m in row["messages"]]}
            for row in CHAT]  # fmt: skip
    assert rendered(write_jsonl(tmp_path / "sharegpt.jsonl", rows), tokenizer) == ("ShareGPT conversations", CHAT_ROW_0)


def test_prompt_completion_alpaca_question_answer_are_one_user_and_one_assistant_turn(tmp_path, tokenizer):
    expected = "<s>[INST] What is 0 plus 1? [/INST] 0 plus 1 is 1. </s>"
    shapes = {
        "prompt/completion": [{"prompt": r["question"], "completion": r["answer"]} for r in QA],
        "Alpaca instruction/input/output": [{"instruction": r["question"], "input": "", "output": r["answer"]} for r in QA],
        "question/answer": QA,
        "prompt/response columns": [{"q": r["question"], "a": r["answer"]} for r in QA],
    }
    for name, rows in shapes.items():
        mapping = {"prompt_column": "q", "response_column": "a"} if name.startswith("prompt/response") else {}
        assert rendered(write_jsonl(tmp_path / "rows.jsonl", rows), tokenizer, **mapping) == (name, expected)


def test_alpaca_input_follows_the_instruction(tmp_path, tokenizer):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5."}]
    _, text = rendered(write_jsonl(tmp_path / "alpaca.jsonl", rows), tokenizer)
    assert text == "<s>[INST] Add the numbers.\n\n2 and 3 [/INST] 5. </s>"


def test_text_column_setting_maps_another_column(tmp_path, tokenizer):
    rows = [{"body": row, "id": i} for i, row in enumerate(tutorial_rows())]
    assert rendered(write_jsonl(tmp_path / "rows.jsonl", rows), tokenizer, text_column="body") == ("text", tutorial_rows()[0])


# The check
def test_check_counts_cut_rows_lost_answers_empty_rows_and_duplicates(tokenizer):
    long_question = "What is " + " plus ".join(str(i) for i in range(40)) + "?"
    chats = [
        [{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2."}],
        [{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2."}],  # duplicate
        [{"role": "user", "content": long_question}, {"role": "assistant", "content": "780."}],  # answer cut off
        [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4. " * 30}],  # cut
        [{"role": "user", "content": " "}, {"role": "assistant", "content": ""}],  # empty
    ]
    rows = data.Dataset.from_dict({"messages": chats})
    report = data.check_rows(rows, tokenizer, 40, True)
    assert (report.rows, report.rows_cut, report.rows_without_loss) == (5, 2, 1)
    assert (report.empty, report.duplicates) == (1, 1)
    assert report.keep == [0, 1, 3, 4]
    assert report.example.endswith("[/INST]⟦2. </s>⟧")


def test_check_data_prints_the_report_without_loading_weights(tiny_model, tmp_path, capsys):
    """A model folder with its config and tokenizer but no weights at all: the check needs none."""
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_text(open(f"{tiny_model}/{name}").read())
    data_file = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    result = finetune.main(tiny_run_args(str(folder), data_file, tmp_path, "--check_data", "--eval_fraction", "0.2"))
    out = capsys.readouterr().out
    assert "data: 8 rows, shape: messages (columns messages), loss on answers only" in out
    assert "[/INST]⟦" in out and "tokens per row: min " in out and "95th percentile" in out
    assert "max_length 1024: 0 rows would be cut, 0 rows have no token that carries loss" in out
    assert "empty rows: 0, exact duplicates: 0" in out and "eval: 2 rows" in out
    assert len(result.train) == 8 and not glob.glob(str(tmp_path / "adapter*"))


def test_a_training_run_stops_on_data_without_loss_before_loading_the_model(tiny_model, tmp_path):
    rows = [{"prompt": "What is 1 plus 1?", "completion": "2."}] * 5
    data_file = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(UserError, match="no row has a token that carries loss"):
        finetune.main(tiny_run_args(tiny_model, data_file, tmp_path, "--max_length", "4"))
    assert not (tmp_path / "results").exists()


# The eval split
def settings_for(path, **overrides):
    values = {"dataset_name": str(path), "dataset_config": "", "dataset_split": "train", "eval_dataset": "",
              "eval_fraction": 0.2, "eval_seed": 42}  # fmt: skip
    return SimpleNamespace(**{**values, **overrides})


def test_eval_split_is_deterministic_from_the_settings(tutorial_data):
    train, held_out = data.load_splits(settings_for(tutorial_data))
    again = data.load_splits(settings_for(tutorial_data))[1]
    other_seed = data.load_splits(settings_for(tutorial_data, eval_seed=7))[1]
    assert (len(train), len(held_out)) == (80, 20)
    assert held_out["text"] == again["text"] and held_out["text"] != other_seed["text"]
    assert not set(held_out["text"]) & set(train["text"])
    assert data.load_splits(settings_for(tutorial_data, eval_fraction=0))[1] is None


def test_eval_rows_from_a_second_file(tutorial_data, tmp_path):
    second = write_jsonl(tmp_path / "eval.jsonl", [{"text": row} for row in tutorial_rows()[:3]])
    train, held_out = data.load_splits(settings_for(tutorial_data, eval_dataset=second))
    assert (len(train), held_out["text"]) == (100, tutorial_rows()[:3])


def test_eval_split_names_and_data_sets_are_told_apart():
    assert data.is_split_name("test", "mlabonne/guanaco-llama2-1k")
    assert not data.is_split_name("me/other-set", "mlabonne/guanaco-llama2-1k")
    assert not data.is_split_name("eval.jsonl", "mlabonne/guanaco-llama2-1k")
    assert not data.is_split_name("test", "rows.jsonl")


# Training on the rendered rows: the same tokens everywhere, loss where it belongs, eval loss logged
@pytest.fixture(scope="module")
def chat_run(tiny_model, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("chat-run")
    data_file = write_jsonl(workdir / "chat.jsonl", CHAT)
    args = tiny_run_args(tiny_model, data_file, workdir, "--max_steps", "3", "--eval_fraction", "0.2", "--eval_steps", "2")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer = finetune.main(args)
    (workdir / "stdout.txt").write_text(out.getvalue())
    return trainer, workdir


@pytest.fixture(scope="module")
def text_run(tiny_model, tutorial_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("text-run")
    return finetune.main(tiny_run_args(tiny_model, tutorial_data, workdir, "--max_steps", "1", "--eval_fraction", "0")), workdir


def training_row(trainer, input_ids):
    """The trainer's tokenized row with these token ids (rows are shuffled and some held out: found by content)."""
    rows = [row for row in trainer.train_dataset if row["input_ids"] == input_ids]
    assert rows, f"no training row has the ids {input_ids}"
    return rows[0]


def test_chat_row_tokens_match_the_llama2_text_the_prompt_and_the_saved_template(chat_run):
    trainer, workdir = chat_run
    saved = AutoTokenizer.from_pretrained(workdir / "adapter")
    row = CHAT[0]["messages"]
    expected = saved(CHAT_ROW_0, add_special_tokens=False)["input_ids"]
    training_row(trainer, expected)
    assert saved.apply_chat_template(row, return_dict=False) == expected
    prompt = data.prompt_inputs(saved, "What is 0 plus 1?", return_tensors=None)["input_ids"]
    assert prompt == saved("<s>[INST] What is 0 plus 1? [/INST]", add_special_tokens=False)["input_ids"]


def test_chat_rows_carry_loss_on_answers_and_their_eos_only(chat_run):
    trainer, _ = chat_run
    tokenizer = trainer.processing_class

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for a, row in enumerate(CHAT):
        prompt_1, answer_1 = f"<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is {a} plus 1? [/INST]", f" {a + 1}. </s>"
        prompt_2, answer_2 = "<s>[INST] And plus 2? [/INST]", f" {a + 2}. </s>"
        expected_ids = ids(prompt_1 + answer_1 + prompt_2 + answer_2)
        training = [r for r in trainer.train_dataset if r["input_ids"] == expected_ids]
        if not training:
            continue  # held out for eval
        labels = training[0]["labels"]
        assert labels == [-100] * len(ids(prompt_1)) + ids(answer_1) + [-100] * len(ids(prompt_2)) + ids(answer_2)
        eos = [i for i, token in enumerate(expected_ids) if token == tokenizer.eos_token_id]
        assert len(eos) == 2 and all(labels[i] == tokenizer.eos_token_id for i in eos)
    assert len(trainer.train_dataset) == 8


def test_tutorial_row_has_one_bos_one_eos_the_prompt_tokens_and_loss_everywhere(text_run):
    trainer, workdir = text_run
    saved = AutoTokenizer.from_pretrained(workdir / "adapter")
    row = tutorial_rows()[0]
    expected = saved(row, add_special_tokens=False)["input_ids"]
    assert -100 not in training_row(trainer, expected)["labels"]
    assert expected.count(saved.bos_token_id) == 1 and expected.count(saved.eos_token_id) == 1
    question, answer = row.removeprefix("<s>[INST] ").removesuffix(" </s>").split(" [/INST] ")
    conversation = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    assert saved.apply_chat_template(conversation, return_dict=False) == expected
    prompt = data.prompt_inputs(saved, question, return_tensors=None)["input_ids"]
    assert expected[: len(prompt)] == prompt and saved.decode(prompt) == saved.decode(expected).split(" " + answer)[0]


def test_eval_loss_is_logged_at_the_interval_and_the_end_and_printed(chat_run):
    (trainer, workdir), out = chat_run, chat_run[1] / "stdout.txt"
    assert [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry] == [2, 3]
    events = EventAccumulator(glob.glob(str(workdir / "results" / "runs" / "*"))[0])
    events.Reload()
    assert [event.step for event in events.Scalars("eval/loss")] == [2, 3]
    final = trainer.state.log_history[-2]["eval_loss"]
    assert f"eval loss at step 3: {final:.4f}" in out.read_text()


def test_heldout_rows_are_the_trainers_eval_rows_with_its_answers_only_labels(chat_run):
    """merge_and_push.py rebuilds, from the settings in training_info.json, the eval rows the trainer scored, with the
    labels it built (answers only); finetune.py's before and after losses are the trainer's eval loss of them."""
    import merge_and_push

    trainer, workdir = chat_run
    info, train_settings = merge_and_push.read_training_info(str(workdir / "adapter"))
    settings = merge_and_push.parse_settings(merge_and_push.Settings, ["--new_model", str(workdir / "adapter")])
    tokenizer = AutoTokenizer.from_pretrained(workdir / "adapter")
    rows, heldout = merge_and_push.scoring_rows(settings, train_settings, tokenizer)
    trainers = [(row["input_ids"], row["labels"]) for row in trainer.eval_dataset]
    assert sorted(rows) == sorted(trainers) and len(rows) == 2 and -100 in rows[0][1]
    assert heldout["rows_from"] == "held-out" and heldout["loss_on"] == "answers"
    assert info["heldout_loss"]["tokens"] == heldout["tokens"]

    def trainer_eval_loss():
        return trainer.evaluation_loop(trainer.get_eval_dataloader(), "eval").metrics["eval_loss"]

    assert info["heldout_loss"]["after_training"] == pytest.approx(trainer_eval_loss(), rel=1e-5)
    with trainer.model.disable_adapter():
        assert info["heldout_loss"]["before_training"] == pytest.approx(trainer_eval_loss(), rel=1e-5)
    assert "held-out loss (2 rows" in (workdir / "stdout.txt").read_text()
