"""Your own data set: every source, every shape, the rendering shared by training, the sample answer and the saved
tokenizer, answers-only loss, the data check and the eval split. Files are written here; the model is conftest's."""

import contextlib
import glob
import io
import json
import re
from importlib.resources import files
from types import SimpleNamespace

import pandas as pd
import pytest
from helpers import (
    ROOT, assert_one_line_error, assert_refused, chat_tokenizer, run_script, tiny_run_args, tutorial_rows, write_jsonl,
)  # fmt: skip
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoTokenizer
from trl.chat_template_utils import has_generation_markers

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
# The chat templates of eight model families, as their tokenizer configs ship them (tests/chat_templates.json says
# where each comes from), and multi-turn rows with a system turn to render with each
with open(f"{ROOT}/tests/chat_templates.json") as f:
    TEMPLATES = json.load(f)
CAPITALS = [
    {"messages": [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": f"What is the capital of {country}?"},
        {"role": "assistant", "content": f"The capital of {country} is {city}."},
        {"role": "user", "content": "And its river?"},
        {"role": "assistant", "content": f"{city} lies on the {river}."},
    ]}
    for country, city, river in [("France", "Paris", "Seine"), ("Italy", "Rome", "Tiber"), ("Egypt", "Cairo", "Nile")]
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
    with pytest.raises(UserError, match="someone/no-such-data-set.*--dataset_name.*your network"):
        data.load_source("someone/no-such-data-set", "cfg", "train")


# Bad inputs
def test_missing_data_file_is_one_line(tiny_model, tmp_path, capsys):
    args = tiny_run_args(tiny_model, str(tmp_path / "nope.jsonl"), tmp_path)
    assert_refused(finetune, args, capsys, "nope.jsonl", "not found", "--dataset_name")


def test_data_file_of_another_format_is_one_line(tiny_model, tmp_path, capsys):
    """A file that exists is the user's data, whatever its extension: named as such, never looked up on the Hub."""
    notes = tmp_path / "notes.txt"
    notes.write_text("What is 1 plus 1? 2\n")
    args = tiny_run_args(tiny_model, str(notes), tmp_path)
    assert_refused(finetune, args, capsys, "notes.txt", "is not a .jsonl, .json, .csv, .tsv or .parquet file")


def test_broken_jsonl_line_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n')
    with pytest.raises(UserError, match=r"rows\.jsonl': line 3, .*Fix or remove that line"):
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
    assert_one_line_error(result, "rows.jsonl': line 2,")


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
        [{"role": "user", "content": " "}, {"role": "assistant", "content": ""}],  # empty: left out
    ]
    rows = data.Dataset.from_dict({"messages": chats})
    report = data.check_rows(rows, tokenizer, 40, True)
    assert (report.rows, report.rows_cut, report.rows_without_loss) == (5, 2, 1)
    assert (report.empty, report.duplicates) == (1, 1)
    assert report.keep == [0, 1, 3]
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


# Answers-only loss on the templates of real models
def template_tokenizer(name, rows=CAPITALS):
    """The template `name` on a tokenizer trained on the rows' words, with the template's special tokens."""
    corpus = [json.dumps(row) for row in rows]
    tokenizer = chat_tokenizer(TEMPLATES[name], corpus)
    data.use_chat_template(tokenizer)
    return tokenizer


def loss_texts(tokenizer, ids, mask):
    """Each run of tokens that carries loss, decoded."""
    return [tokenizer.decode(ids[start:end]) for start, end in data.loss_spans(mask)]


def chat_rows(rows):
    return data.rows_in_shape(data.Dataset.from_list(rows), data.detect_shape(list(rows[0])))


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_loss_is_on_each_answer_and_its_end_token_for_real_templates(name):
    tokenizer = template_tokenizer(name)
    report = data.check_rows(chat_rows(CAPITALS), tokenizer, 1024, True)
    for row, ids, mask in zip(CAPITALS, report.ids, report.masks):
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert [text.strip() for text in loss_texts(tokenizer, ids, mask)] == [
            TEMPLATES[name]["answer"].format(answer=answer) for answer in answers
        ]
        # The ids are the template's own rendering, the system turn in it (before the first question where the
        # template has no system role: Gemma's, Mistral's)
        messages = row["messages"]
        if not data.has_system_role(tokenizer):
            first = f"{messages[0]['content']}\n\n{messages[1]['content']}"
            messages = [{"role": "user", "content": first}, *messages[2:]]
        assert ids == tokenizer.apply_chat_template(messages, return_dict=False)
        assert "Answer in one sentence." in tokenizer.decode(ids)


def test_smollm2_template_is_the_one_its_gguf_file_carries():
    gguf = pytest.importorskip("gguf")
    import smollm2

    field = gguf.GGUFReader(f"{smollm2.gguf_folder()}/{smollm2.GGUF_FILE}").fields["tokenizer.chat_template"]
    assert field.contents() == TEMPLATES["chatml-smollm2"]["template"]


def test_a_template_that_renders_a_turn_otherwise_once_the_chat_goes_on_is_refused():
    tokenizer = template_tokenizer("chatml-smollm2")
    # Like Qwen3's: only the last answer gets an (empty) reasoning block
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "message['content'] + '<|im_end|>'",
        "(('<think></think>' if loop.last and message['role'] == 'assistant' else '') + message['content'])"
        " + '<|im_end|>'",
    )
    with pytest.raises(UserError, match=r"^row 1: the chat template renders the conversation up to turn 3 .*'<think>.*"
                                        r"--loss_on all$"):  # fmt: skip
        data.check_rows(chat_rows(CAPITALS), tokenizer, 1024, True)


def test_one_turn_rows_carry_loss_on_the_answer_and_its_end_token():
    tokenizer = template_tokenizer("qwen2.5-instruct", QA)
    report = data.check_rows(chat_rows(QA), tokenizer, 1024, True)
    assert loss_texts(tokenizer, report.ids[3], report.masks[3]) == ["3 plus 1 is 4.<|im_end|>"]


def test_loss_weight_0_keeps_a_turn_out_of_the_loss():
    rows = [{"messages": [{**m, "loss_weight": 0} if m["content"].startswith("The capital") else m
                          for m in row["messages"]]} for row in CAPITALS]  # fmt: skip
    # Found turn by turn (ChatML), and from generation marks (the Llama-2 template here)
    for name, second_answer in [("chatml-smollm2", "Paris lies on the Seine.<|im_end|>"),
                                ("llama-2-chat", "Paris lies on the Seine. </s>")]:  # fmt: skip
        tokenizer = template_tokenizer(name)
        assert has_generation_markers(tokenizer.chat_template) == (name == "llama-2-chat")
        report = data.check_rows(chat_rows(rows), tokenizer, 1024, True)
        assert [text.strip() for text in loss_texts(tokenizer, report.ids[0], report.masks[0])] == [second_answer]


def test_content_as_a_list_of_text_parts_is_joined(tmp_path):
    parts = [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                     {"type": "text", "value": "of Peru?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Lima."}]},
    ]}]  # fmt: skip
    rows = chat_rows(parts)
    assert rows["messages"][0][0]["content"] == "What is the capital\nof Peru?"
    tokenizer = template_tokenizer("chatml-smollm2", parts)
    assert loss_texts(tokenizer, *(lambda r: (r.ids[0], r.masks[0]))(data.check_rows(rows, tokenizer, 1024, True))) == [
        "Lima.<|im_end|>"
    ]


def test_a_part_that_is_not_text_is_refused_naming_the_line(tiny_model, tmp_path):
    rows = [CHAT[0], {"messages": [{"role": "user", "content": [{"type": "image", "url": "cat.png"}]},
                                   {"role": "assistant", "content": "A cat."}]}]  # fmt: skip
    path = write_jsonl(tmp_path / "parts.jsonl", rows)
    with pytest.raises(UserError, match=r"^parts.jsonl line 2: a message holds a part of type 'image'"):
        finetune.main(tiny_run_args(tiny_model, path, tmp_path, "--check_data", "--eval_fraction", "0"))


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}  # fmt: skip
OPENAI_TOOL_CHAT = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "Sunny, 21 C"},
        {"role": "assistant", "content": "It is sunny in Paris."},
    ],
    "tools": [WEATHER_TOOL],
}  # fmt: skip
SHAREGPT_TOOL_CHAT = {
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": "Sunny, 21 C"},
        {"from": "gpt", "value": "It is sunny in Paris."},
    ],
    "tools": json.dumps([WEATHER_TOOL]),
}  # fmt: skip
QWEN_TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'


@pytest.mark.parametrize("row", [OPENAI_TOOL_CHAT, SHAREGPT_TOOL_CHAT], ids=["openai", "sharegpt"])
def test_tool_calls_render_through_the_templates_tools_and_carry_loss_the_results_not(tmp_path, row):
    rows = data.load_source(write_jsonl(tmp_path / "tools.jsonl", [row]))
    rows = data.rows_in_shape(rows, data.detect_shape(rows.column_names))
    tokenizer = template_tokenizer("qwen2.5-instruct", [row])
    report = data.check_rows(rows, tokenizer, 1024, True)
    text = tokenizer.decode(report.ids[0])
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text  # the tools column, rendered
    assert "<tool_response>\nSunny, 21 C\n</tool_response>" in text
    assert loss_texts(tokenizer, report.ids[0], report.masks[0]) == [QWEN_TOOL_CALL, "It is sunny in Paris.<|im_end|>"]


def test_tool_calls_with_a_template_without_tools_are_refused_naming_the_line(tmp_path):
    path = write_jsonl(tmp_path / "tools.jsonl", [CAPITALS[0], OPENAI_TOOL_CHAT])
    rows = data.rows_in_shape(data.with_places(data.load_source(path), path), data.detect_shape(["messages", "tools"]))
    with pytest.raises(UserError, match=r"^tools.jsonl line 2: the row holds tool calls and tool results, which the "
                                        r"model's chat template does not render"):  # fmt: skip
        data.check_rows(rows, template_tokenizer("llama-3-instruct"), 1024, True)


def test_tool_calls_of_other_rows_add_no_null_arguments(tmp_path):
    """datasets reads every row's arguments as one struct: each row would get the others' argument names, as nulls."""
    other = json.loads(json.dumps(OPENAI_TOOL_CHAT))
    other["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"town": "Rome", "days": 2}
    first = json.loads(json.dumps(OPENAI_TOOL_CHAT))
    first["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    rows = data.rows_in_shape(data.load_source(write_jsonl(tmp_path / "tools.jsonl", [first, other])),
                              data.detect_shape(["messages", "tools"]))  # fmt: skip
    tokenizer = template_tokenizer("qwen2.5-instruct", [first, other])
    report = data.check_rows(rows, tokenizer, 1024, True)
    assert loss_texts(tokenizer, report.ids[0], report.masks[0])[0] == QWEN_TOOL_CALL


# Files read right, or refused with one line
def test_csv_row_with_fewer_fields_than_the_header_is_named(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nhi,hello\nhow\n")
    with pytest.raises(UserError, match=r"qa\.csv': line 3 has 1 fields, the header has 2"):
        data.load_source(str(path))


def test_csv_rows_that_all_have_one_field_more_are_refused(tmp_path):
    """pandas reads them without an error, the first field of each row moved into its index."""
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nhi,hello,x\nhow,are,you\n")
    with pytest.raises(UserError, match=r"qa\.csv': line 2 has 3 fields, the header has 2.*Quote fields"):
        data.load_source(str(path))


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes('{"text": "a"}\n{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match=r"rows\.jsonl': line 2 is not UTF-8 text.*save the file as UTF-8"):
        data.load_source(str(path))


def test_a_json_object_of_lists_is_read_as_columns(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps({"question": [r["question"] for r in QA], "answer": [r["answer"] for r in QA]}))
    rows = data.load_source(str(path))
    assert len(rows) == 10 and rows[3] == QA[3]
    assert data.row_places(str(path), rows)[3] == "qa.json record 4"


def test_parquet_columns_of_structs_or_lists_are_refused_not_trained_as_their_repr(tmp_path):
    pd.DataFrame({"question": ["What is 1 plus 1?", "Why?"], "answer": [{"text": "2."}, {"text": "So."}]}).to_parquet(
        tmp_path / "qa.parquet"
    )
    rows = data.load_source(str(tmp_path / "qa.parquet"))
    with pytest.raises(UserError, match=r"^row 1: the column 'answer' holds a dict, not text"):
        data.rows_in_shape(rows, data.detect_shape(rows.column_names))


def test_rows_with_a_null_or_empty_question_or_answer_are_left_out_and_counted(tiny_model, tmp_path, capsys):
    rows = QA[:6] + [{"question": "What is 9 plus 1?", "answer": None}, {"question": "", "answer": "2."},
                     {"question": None, "answer": "3."}]  # fmt: skip
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    result = finetune.main(tiny_run_args(tiny_model, path, tmp_path, "--check_data", "--eval_fraction", "0"))
    out = capsys.readouterr().out
    assert "empty rows: 3 (no text, no prompt or no answer: left out; e.g. qa.jsonl line 7)" in out
    assert len(result.train) == 6 and len(result.report.keep) == 6


def test_text_rows_that_are_null_or_empty_are_left_out(tokenizer):
    rows = data.rows_in_shape(data.Dataset.from_list([{"text": tutorial_rows()[0]}, {"text": None}, {"text": " "}]),
                              data.Shape("text", ("text",), False))  # fmt: skip
    report = data.check_rows(rows, tokenizer, 64, False)
    assert (report.empty, report.keep) == (2, [0])


def test_a_bad_row_is_named_by_its_line_in_the_file_not_its_place_after_the_shuffle(tiny_model, tmp_path):
    rows = [CHAT[i % 10] for i in range(19)]
    rows.insert(13, {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]})
    path = tmp_path / "chat.jsonl"
    path.write_text("\n" + "".join(json.dumps(row) + "\n" for row in rows))  # a blank first line: line 15 holds it
    with pytest.raises(UserError, match=r"^chat.jsonl line 15: unknown speaker 'robot'"):
        finetune.main(tiny_run_args(tiny_model, str(path), tmp_path, "--check_data", "--eval_fraction", "0.5"))


def test_the_check_warns_about_unfilled_placeholders_and_eval_rows_copied_from_training(tiny_model, tmp_path, capsys):
    rows = [{"question": f"What is {a} plus 1?", "answer": f"{a} plus 1 is {a + 1}."} for a in range(8)]
    rows += [{"question": "Who are you?", "answer": "I am {{name}}, made by {{ author }}."}] * 2
    rows += [rows[0]] * 4  # copies: some land in eval
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    finetune.main(tiny_run_args(tiny_model, path, tmp_path, "--check_data", "--eval_fraction", "0.5"))
    out = capsys.readouterr().out
    placeholders = re.search(r"warning: (\d) rows have answers holding unfilled template placeholders, which would be "
                             r"trained as they are \(e\.g\. qa\.jsonl line (9|10): \{\{name\}\}\)", out)  # fmt: skip
    copies = re.search(r"warning: (\d) eval rows are exact copies of training rows \(e\.g\. qa\.jsonl line \d+\)", out)
    assert placeholders and copies, out


def test_check_data_marks_the_loss_in_the_models_own_template(tiny_model, tmp_path, capsys):
    """A model folder whose tokenizer carries SmolLM2's ChatML template: the answers, each with its <|im_end|>."""
    folder = tmp_path / "chatml-model"
    template_tokenizer("chatml-smollm2").save_pretrained(folder)
    (folder / "config.json").write_text(open(f"{tiny_model}/config.json").read())
    finetune.main(tiny_run_args(str(folder), write_jsonl(tmp_path / "chat.jsonl", CAPITALS), tmp_path, "--check_data",
                                "--eval_fraction", "0"))  # fmt: skip
    out = capsys.readouterr().out
    assert "loss on answers only" in out
    assert ("<|im_start|>assistant\n    ⟦The capital of France is Paris.<|im_end|>⟧\n    <|im_start|>user\n    And its "
            "river?<|im_end|>\n    <|im_start|>assistant\n    ⟦Paris lies on the Seine.<|im_end|>⟧") in out  # fmt: skip


def test_loss_on_all_gives_chat_rows_tokenized_with_loss_everywhere():
    tokenizer = template_tokenizer("chatml-smollm2")
    rows = chat_rows(CAPITALS)
    report = data.check_rows(rows, tokenizer, 1024, False)
    assert report.ids[0] == tokenizer.apply_chat_template(CAPITALS[0]["messages"], return_dict=False)
    assert all(all(mask) for mask in report.masks)
    assert data.for_trainer(rows, report, False).column_names == ["input_ids"]
    assert data.for_trainer(rows, data.check_rows(rows, tokenizer, 1024, True), True).column_names == [
        "input_ids", "assistant_masks"
    ]


def test_qwen3s_template_which_is_not_prefix_preserving_gets_trls_marked_copy():
    """Qwen3's template writes an empty reasoning block into the last answer only: the answers cannot be found turn by
    turn, and trl 1.16 ships a marked training copy of it (its chat_templates/qwen3.jinja is the Hub's template)."""
    entry = {**TEMPLATES["qwen2.5-instruct"], "added": ["<tool_call>", "</tool_call>", "<think>", "</think>"]}
    entry["template"] = (files("trl") / "chat_templates" / "qwen3.jinja").read_text()
    tokenizer = chat_tokenizer(entry, [json.dumps(row) for row in CAPITALS])
    rows = chat_rows(CAPITALS)
    with pytest.raises(data.NotPrefixPreserving, match="<think>"):
        data.turn_by_turn_masks(tokenizer, data.template_chats(rows, tokenizer, [0]))
    report = data.check_rows(rows, tokenizer, 1024, True)
    answers = [m["content"] for m in CAPITALS[0]["messages"] if m["role"] == "assistant"]
    assert [text.strip() for text in loss_texts(tokenizer, report.ids[0], report.masks[0])] == [
        f"<think>\n\n</think>\n\n{answer}<|im_end|>" for answer in answers
    ]


def test_heldout_rows_are_the_trainers_eval_rows_with_its_answers_only_labels(chat_run):
    """merge_and_push.py rebuilds, from the settings in training_info.json, the eval rows the trainer scored, with the
    labels it built (answers only); finetune.py's before and after losses are the trainer's eval loss of them."""
    import common
    import merge_and_push

    trainer, workdir = chat_run
    settings = merge_and_push.parse_settings(merge_and_push.Settings, ["--new_model", str(workdir / "adapter")])
    info = common.read_training_info(settings.new_model)
    train_settings = merge_and_push.train_settings_for(settings, info)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "adapter")
    rows, heldout = merge_and_push.scoring_rows(settings, train_settings, tokenizer)
    trainers = [(row["input_ids"], row["labels"]) for row in trainer.eval_dataset]
    assert sorted(rows) == sorted(trainers) and len(rows) == 2 and -100 in rows[0][1]
    assert heldout["rows_from"] == "held-out" and heldout["loss_on"] == "answers"
    assert info.heldout_loss["tokens"] == heldout["tokens"]

    def trainer_eval_loss():
        return trainer.evaluation_loop(trainer.get_eval_dataloader(), "eval").metrics["eval_loss"]

    assert info.heldout_loss["after_training"] == pytest.approx(trainer_eval_loss(), rel=1e-5)
    with trainer.model.disable_adapter():
        assert info.heldout_loss["before_training"] == pytest.approx(trainer_eval_loss(), rel=1e-5)
    assert "held-out loss (2 rows" in (workdir / "stdout.txt").read_text()
