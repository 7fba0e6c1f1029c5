"""Your own data set, for finetune.py's step 7: load it from any common source, find its shape from its columns,
render it the way the model will be prompted, hold out an eval set, and check it before a GPU is spent on it.

The rendering is the tokenizer's chat template, or, where the tokenizer has none, the Llama-2 chat format of the
tutorial's rows (set on the tokenizer, so it is saved with the adapter and the merged model is prompted the same way).
"""

import csv
import json
import math
import os
import re
import statistics
from dataclasses import dataclass

from datasets import Dataset, concatenate_datasets, load_dataset
from jinja2 import TemplateError
from trl.chat_template_utils import get_training_chat_template, has_generation_markers, supports_tool_calling

from common import UserError

# The format of a local file comes from its extension: (datasets builder, its arguments)
FILE_FORMATS = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".parquet": ("parquet", {}),
}
# The values of --loss_on: see answers_only_for
LOSS_ON = ["auto", "answers", "all"]

# Meta's Llama-2-chat template (the format of the tutorial's rows: `<s>[INST] <<SYS>>\n...\n<</SYS>>\n\nq [/INST] a </s>`),
# with `{% generation %}` marks around each answer so trl's assistant_only_loss knows which tokens carry loss;
# the marks change nothing in the rendered text. trl 1.16 ships training templates for other families, not this one.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.index0 == 0 and system_message %}"
    "{% set content = '<<SYS>>\\n' + system_message.strip() + '\\n<</SYS>>\\n\\n' + message['content'].strip() %}"
    "{% else %}{% set content = message['content'].strip() %}{% endif %}"
    "{{ bos_token + '[INST] ' + content + ' [/INST]' }}"
    "{% else %}{% generation %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endgeneration %}{% endif %}"
    "{% endfor %}"
)

# ShareGPT's speakers, in the roles chat templates know. trl's maybe_convert_to_chatml renames from/value to
# role/content but keeps ShareGPT's "human" and "gpt", which no chat template knows. A function_call turn is an
# assistant's tool call, an observation the tool's result (the tool-calling ShareGPT of LLaMA-Factory and glaive).
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "function_call": "assistant", "observation": "tool", "tool": "tool",
}  # fmt: skip

MAPPING_SETTINGS = "--text_column, or --prompt_column and --response_column"
OPTIONAL_COLUMNS = {"Alpaca instruction/input/output": "input", "messages": "tools", "ShareGPT conversations": "tools"}
PLACE = "place"  # the column that keeps each row's place in its file (its line) through the eval shuffle
LOSS_MARK = ("⟦", "⟧")
PLACEHOLDER = re.compile(r"\{\{\s*[A-Za-z_][\w.]*\s*\}\}")  # {{name}}, {{ author }}: a template never filled in


@dataclass(frozen=True)
class Shape:
    """How a data set's rows are laid out: `name` for the user, the `columns` it reads, and whether its rows mark where
    the answer starts (everything but ready-made text does)."""

    name: str
    columns: tuple
    marks_answers: bool = True


@dataclass
class Report:
    """What check_rows found: counts, token lengths, and the rows that keep at least one token carrying loss."""

    rows: int
    lengths: list
    rows_cut: int
    rows_without_loss: int
    empty: int
    duplicates: int
    keep: list
    example: str
    ids: list
    masks: list
    places: list
    first_empty: str | None
    warnings: list


@dataclass
class PreparedData:
    """What finetune.py hands the trainer: the rows pre-tokenized ("input_ids", and "assistant_masks" for answers-only
    loss on chat rows)."""

    train: Dataset
    eval: Dataset | None
    shape: Shape
    answers_only: bool
    report: Report


# Sources
def is_local(name):
    """A data set name that means a local file or folder, not a Hub id: one that exists here, or names a file by its
    extension (a missing one is then reported as a missing file, not looked up on the Hub)."""
    return os.path.exists(name) or os.path.splitext(name)[1].lower() in FILE_FORMATS


def load_source(name, config="", split="train"):
    """A local file or folder (format from the extension), or a Hub data set id with an optional config and split."""
    if is_local(name):
        if split != "train":
            raise UserError(
                f"--dataset_split '{split}' only applies to Hub data sets: a local file or folder is one split; "
                "give a second file as --eval_dataset for eval rows"
            )
        return load_local(name)
    try:
        return load_dataset(name, config or None, split=split)
    except (OSError, ValueError, ConnectionError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot load the data set '{name}' (config '{config or 'default'}', split '{split}'): {first_line}. "
            "Check --dataset_name (a Hub id, or a .jsonl/.json/.csv/.tsv/.parquet file or folder), --dataset_config, "
            "--dataset_split, your network or `hf auth login`"
        ) from None


def data_files(path):
    """The data files of a file or folder (sorted, recursively), all of one format: (files, extension)."""
    if os.path.isfile(path):
        extension = os.path.splitext(path)[1].lower()
        if extension not in FILE_FORMATS:
            raise UserError(f"'{path}' is not a .jsonl, .json, .csv, .tsv or .parquet file: convert it to one of these")
        return [path], extension
    if not os.path.isdir(path):
        raise UserError(f"data set file '{path}' not found: check --dataset_name")
    files = sorted(
        os.path.join(folder, name)
        for folder, _, names in os.walk(path)
        for name in names
        if os.path.splitext(name)[1].lower() in FILE_FORMATS
    )
    if not files:
        raise UserError(f"the folder '{path}' holds no .jsonl, .json, .csv, .tsv or .parquet file")
    formats = {FILE_FORMATS[os.path.splitext(f)[1].lower()] == FILE_FORMATS[os.path.splitext(files[0])[1].lower()]
               for f in files}  # fmt: skip
    if formats != {True}:
        kinds = sorted({os.path.splitext(f)[1].lower() for f in files})
        raise UserError(f"the folder '{path}' mixes {', '.join(kinds)} files: keep one format per folder")
    return files, os.path.splitext(files[0])[1].lower()


def load_local(path):
    files, extension = data_files(path)
    builder, arguments = FILE_FORMATS[extension]
    for file in files:
        check_readable(file)
    if extension == ".json" and all(columns_of_lists(file) is not None for file in files):
        return concatenate_datasets([Dataset.from_dict(columns_of_lists(file)) for file in files])
    try:
        return load_dataset(builder, data_files=files, split="train", **arguments)
    except Exception as error:  # datasets wraps each parser's error in its own: find the line it broke on ourselves
        for file in files:
            where = parse_error(file)
            if where:
                raise UserError(f"cannot read '{file}': {where}. Fix or remove that line") from None
        if "corresponds to no data" in str(error):  # datasets' words for files that hold no rows
            raise UserError(f"the data set '{path}' has no rows") from None
        cause = error.__cause__ or error
        first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise UserError(f"cannot read the data in '{path}': {first_line}") from None


def check_readable(file):
    """Refuses a text file that is not UTF-8, and a CSV row with more or fewer fields than the header (pandas would
    quietly move the columns into its index, or fill them with nulls)."""
    if file.lower().endswith(".parquet"):
        return
    try:
        with open(file, encoding="utf-8") as f:
            f.read()
    except UnicodeDecodeError as error:
        line = open(file, "rb").read()[: error.start].count(b"\n") + 1
        raise UserError(f"cannot read '{file}': line {line} is not UTF-8 text ({error.reason}): save the file as UTF-8")
    if os.path.splitext(file)[1].lower() in (".csv", ".tsv"):
        where = parse_error(file)
        if where:
            raise UserError(f"cannot read '{file}': {where}. Quote fields that hold the separator, or fix that line")


def columns_of_lists(file):
    """A .json file holding one object of equal-length lists (`{"question": [...], "answer": [...]}`) as its columns,
    which datasets would read as one row of lists; None for any other content."""
    with open(file, encoding="utf-8") as f:
        text = f.read()
    if not text.lstrip().startswith("{"):
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None  # JSON lines, or broken: datasets and parse_error say which
    if not isinstance(record, dict) or not record or not all(isinstance(v, list) for v in record.values()):
        return None
    if len({len(values) for values in record.values()}) > 1:
        lengths = ", ".join(f"{name} {len(values)}" for name, values in record.items())
        raise UserError(f"cannot read '{file}': its object of lists has lists of different lengths ({lengths})")
    return record


def row_places(name, rows):
    """Where each row comes from, for messages: 'rows.jsonl line 7' (a .jsonl or .csv file), 'rows.json record 3',
    'row 3' (parquet, Hub data sets). Falls back to 'row N' where the file's records cannot be lined up."""
    fallback = [f"row {i + 1}" for i in range(len(rows))]
    if not is_local(name):
        return fallback
    places = []
    for file in data_files(name)[0]:
        places += [f"{os.path.basename(file)} {place}" for place in file_places(file)]
    return places if len(places) == len(rows) else fallback


def file_places(file):
    extension = os.path.splitext(file)[1].lower()
    if extension == ".parquet":
        import pyarrow.parquet

        return [f"row {i + 1}" for i in range(pyarrow.parquet.read_metadata(file).num_rows)]
    with open(file, encoding="utf-8", newline="") as f:
        text = f.read()
    if extension in (".json", ".jsonl"):
        if extension == ".json" and columns_of_lists(file) is not None:
            return [f"record {i + 1}" for i in range(len(next(iter(columns_of_lists(file).values()))))]
        if text.lstrip().startswith("["):
            return [f"record {i + 1}" for i in range(len(json.loads(text)))]
        return [f"line {n}" for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    reader = csv.reader(text.splitlines(), delimiter=FILE_FORMATS[extension][1].get("delimiter", ","))
    next(reader, None)
    places, start = [], reader.line_num + 1
    for row in reader:
        if row:  # pandas skips blank lines
            places.append(f"line {start}")
        start = reader.line_num + 1
    return places


def parse_error(file):
    """Where a data file stops parsing, found with the standard library (datasets' errors rarely say): or None."""
    extension = os.path.splitext(file)[1].lower()
    if extension == ".parquet":
        import pyarrow.parquet

        try:
            pyarrow.parquet.read_metadata(file)
        except Exception as error:
            return f"not a parquet file ({error})"
        return None
    with open(file, encoding="utf-8", errors="replace", newline="") as f:
        text = f.read()
    if extension in (".json", ".jsonl") and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            return f"line {error.lineno}, column {error.colno}: {error.msg}"
        bad = next((i for i, record in enumerate(records) if not isinstance(record, dict)), None)
        return None if bad is None else f"record {bad + 1} of the list is not an object"
    if extension in (".json", ".jsonl"):
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    return f"line {number}, column {error.colno}: {error.msg}"
                if not isinstance(record, dict):
                    return f"line {number} is not a JSON object"
        return None
    reader = csv.reader(text.splitlines(), delimiter=FILE_FORMATS[extension][1].get("delimiter", ","))
    try:
        header = next(reader, None)
        for row in reader:
            if row and len(row) != len(header):
                return f"line {reader.line_num} has {len(row)} fields, the header has {len(header)}"
    except csv.Error as error:
        return f"line {reader.line_num}: {error}"
    return None


def column_values(rows, name):
    """A column as a Python list, read in one batch (iterating a datasets Column reads it row by row: slow)."""
    return rows.select_columns([name])[:][name]


# Shapes, detected from the columns
def detect_shape(columns, text_column="", prompt_column="", response_column=""):
    """The shape of rows with these columns: the mapping settings first, then the known layouts. Returns a Shape."""
    columns = list(columns)

    def need(*names):
        missing = [name for name in names if name not in columns]
        if missing:
            raise UserError(
                f"the data set has no column {', '.join(repr(m) for m in missing)} (its columns: {', '.join(columns)}): "
                f"check {MAPPING_SETTINGS}"
            )
        return tuple(names)

    if text_column:
        return Shape("text", need(text_column), marks_answers=False)
    if prompt_column or response_column:
        if not (prompt_column and response_column):
            raise UserError("--prompt_column and --response_column go together: give both")
        return Shape("prompt/response columns", need(prompt_column, response_column))
    for name, names in [
        ("messages", ("messages",)),
        ("ShareGPT conversations", ("conversations",)),
        ("prompt/completion", ("prompt", "completion")),
        ("Alpaca instruction/input/output", ("instruction", "output")),
        ("question/answer", ("question", "answer")),
    ]:
        if set(names) <= set(columns):
            optional = OPTIONAL_COLUMNS.get(name)
            return Shape(name, names + ((optional,) if optional in columns else ()))
    if "text" in columns:
        return Shape("text", ("text",), marks_answers=False)
    raise UserError(
        f"cannot tell how to read rows with the columns {', '.join(columns) or '(none)'}: known are text, messages, "
        f"conversations, prompt/completion, instruction/input/output, question/answer; map yours with {MAPPING_SETTINGS}"
    )


def to_messages(shape, values, place):
    """One row of a chat-like shape as a list of {role, content} messages (tool calls, tool results and loss_weight
    kept), or None for a row whose prompt or answer is missing or empty."""
    if shape.name in ("messages", "ShareGPT conversations"):
        turns = values[0]
        if not isinstance(turns, list):
            raise UserError(f"{place}: '{shape.columns[0]}' is not a list of turns")
        return [to_message(shape, turn, place) for turn in turns]
    if shape.name == "prompt/completion" and isinstance(values[0], list):  # trl's conversational prompt/completion
        return to_messages(Shape("messages", ("messages",)), [values[0] + values[1]], place)
    texts = [text_value(value, column, place) for value, column in zip(values, shape.columns)]
    if shape.name.startswith("Alpaca"):
        instruction, output, extra = texts[0], texts[1], texts[2] if len(texts) > 2 else ""
        texts = [f"{instruction}\n\n{extra}" if extra.strip() else instruction, output]
    prompt, answer = texts
    if not (prompt.strip() and answer.strip()):
        return None
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def text_value(value, column, place):
    """A cell that holds text: a string, or a number written as one. None, NaN and '' are empty; a struct or a list
    (a parquet or JSON column of another shape) is refused rather than trained on as its Python repr."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (dict, list)):
        raise UserError(
            f"{place}: the column '{column}' holds a {type(value).__name__}, not text: map a text column with "
            f"{MAPPING_SETTINGS}"
        )
    return str(value)


def to_message(shape, turn, place):
    """One turn as a chat-template message: ShareGPT's speakers become roles, content parts are joined to text, an
    OpenAI or ShareGPT tool call becomes `tool_calls`, a tool's result the role 'tool'."""
    role_key = "role" if shape.name == "messages" else "from"
    if not isinstance(turn, dict) or turn.get(role_key) is None:
        raise UserError(f"{place}: every turn in '{shape.columns[0]}' needs '{role_key}' and its content")
    speaker = turn[role_key]
    role = speaker if shape.name == "messages" else SHAREGPT_ROLES.get(speaker)
    if role == "function":  # OpenAI's older name for a tool's result
        role = "tool"
    if role not in ("system", "user", "assistant", "tool"):
        known = "system, user, assistant, tool" if shape.name == "messages" else ", ".join(SHAREGPT_ROLES)
        raise UserError(f"{place}: unknown speaker '{speaker}' (known: {known})")
    content = turn.get("content") if turn.get("content") is not None else turn.get("value")
    message = {"role": role, "content": content_text(content, place)}
    calls = turn.get("tool_calls") or ([turn["function_call"]] if turn.get("function_call") else [])
    if speaker == "function_call":  # ShareGPT's tool call: the call itself is the turn's value
        calls, message["content"] = [message["content"]], ""
    if calls:
        message["tool_calls"] = [tool_call(call, place) for call in calls]
    if turn.get("name") and role == "tool":
        message["name"] = turn["name"]
    if turn.get("loss_weight") is not None:
        if turn["loss_weight"] not in (0, 1):
            raise UserError(f"{place}: loss_weight {turn['loss_weight']!r}: it takes 0 (no loss on that turn) or 1")
        message["loss_weight"] = int(turn["loss_weight"])
    return message


def content_text(content, place):
    """A message's content as text: a list of parts (`[{"type": "text", "text": ...}]`, or `value` for `text`) is
    joined, a part a line; any other part (an image, audio) is refused, as training here reads text only."""
    if not isinstance(content, list):
        return text_value(content, "content", place)
    texts = []
    for part in content:
        part = {key: value for key, value in part.items() if value is not None} if isinstance(part, dict) else {}
        kind, text = part.get("type", "text"), part.get("text", part.get("value"))
        if kind != "text" or not isinstance(text, str):
            raise UserError(f"{place}: a message holds a part of type '{kind}': only text parts can be trained here")
        texts.append(text)
    return "\n".join(texts)


def tool_call(call, place):
    """A tool call in the form chat templates read: {"type": "function", "function": {"name", "arguments": dict}}."""
    if isinstance(call, str):
        try:
            call = json.loads(call)
        except json.JSONDecodeError:
            raise UserError(f"{place}: a function_call turn does not hold JSON: {call[:60]!r}") from None
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not function.get("name"):
        raise UserError(f"{place}: a tool call needs a function name: {str(call)[:60]!r}")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):  # OpenAI's form: the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise UserError(f"{place}: the arguments of tool call '{function['name']}' are not JSON") from None
    # The arguments kept as JSON text: datasets would read every row's as one struct (template_messages reads them)
    arguments = json.dumps(without_nulls(arguments))
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}


def without_nulls(value):
    """A JSON value without the null fields that datasets adds: it reads every row's objects as one struct, so each
    row's tool call or tool schema gets the fields of all the others, as nulls."""
    if isinstance(value, dict):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    return value


def row_tools(value, place):
    """A row's `tools` column (a list of tool schemas, or the JSON string of one) as a JSON string, or None."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"{place}: its 'tools' do not hold JSON") from None
    if not isinstance(value, list):
        raise UserError(f"{place}: its 'tools' are not a list of tool schemas")
    return json.dumps(without_nulls(value))


def rows_in_shape(rows, shape):
    """The rows as chat rows ("messages", and "tools" where the data set has them), or as ready-made text ("text"),
    each with its place in the file ("place") for messages."""
    missing = [column for column in shape.columns if column not in rows.column_names]
    if missing:
        raise UserError(
            f"the rows have no column {', '.join(repr(m) for m in missing)} that their shape ({shape.name}) needs "
            f"(columns: {', '.join(rows.column_names)})"
        )
    places = places_of(rows)
    columns = {column: column_values(rows, column) for column in shape.columns}
    if not shape.marks_answers:
        name = shape.columns[0]
        texts = [text_value(value, name, place) for value, place in zip(columns[name], places)]
        return Dataset.from_dict({"text": texts, PLACE: places})
    tools = columns.pop("tools", None)
    out = {"messages": [to_messages(shape, values, place) for values, place in zip(zip(*columns.values()), places)]}
    if tools is not None:
        out["tools"] = [row_tools(value, place) for value, place in zip(tools, places)]
    return Dataset.from_dict({**out, PLACE: places})


def places_of(rows):
    """The rows' places in their file: the column prepare_data adds, or else their order here."""
    return column_values(rows, PLACE) if PLACE in rows.column_names else [f"row {i + 1}" for i in range(len(rows))]


# The chat template: the same rendering for training, the sample answer and the saved tokenizer
def use_chat_template(tokenizer):
    """Gives a tokenizer without a chat template the Llama-2 one; saved with the tokenizer, it prompts the merged model
    the way it was trained. A tokenizer's own Llama-2 template without generation marks gets the marked one."""
    if not tokenizer.chat_template or (
        not has_generation_markers(tokenizer.chat_template) and renders_like_llama2(tokenizer)
    ):
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE


def renders_like_llama2(tokenizer):
    probe = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"},
    ]
    try:  # either can fail: the tokenizer's own on a system turn, the Llama-2 one without a BOS token (Qwen's)
        own = tokenizer.apply_chat_template(probe, tokenize=False)
        return own == tokenizer.apply_chat_template(probe, tokenize=False, chat_template=LLAMA2_CHAT_TEMPLATE)
    except TemplateError:
        return False


def prompt_text(tokenizer, question):
    """A user turn rendered the way training rows are, up to the opening of the answer: the prompt's text."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


def prompt_inputs(tokenizer, question, return_tensors="pt"):
    """prompt_text's tokens (the template's text holds its own special tokens), ready for generate(): input_ids and
    attention_mask."""
    return tokenizer(prompt_text(tokenizer, question), add_special_tokens=False, return_tensors=return_tensors)


def text_ids(tokenizer, texts):
    """Token ids of ready-made text rows, with exactly one BOS and one EOS. trl 1.16 tokenizes text rows with the
    tokenizer's special tokens on (trl.data_utils._tokenize), so a row that holds its own `<s>` gets a second: rows
    go to the trainer pre-tokenized, the way the chat template's text is tokenized (add_special_tokens=False)."""
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    texts = [with_eos(text, eos) for text in texts]
    ids = [None] * len(texts)
    for holds_bos in (True, False):
        picked = [i for i, text in enumerate(texts) if bool(bos and text.startswith(bos)) == holds_bos]
        if picked:
            encoded = tokenizer([texts[i] for i in picked], add_special_tokens=not holds_bos)["input_ids"]
            for i, row_ids in zip(picked, encoded):
                ids[i] = row_ids
    return ids


def with_eos(text, eos):
    """The text ending in one EOS, as trl's add_eos makes it (it appends one unless the text ends with it)."""
    if not eos or text.rstrip().endswith(eos):
        return text.rstrip()
    return text + eos


# The tokens that carry loss
class NotPrefixPreserving(Exception):
    """A template renders a turn differently once the conversation goes on: its answer's tokens cannot be found."""


def token_masks(rows, tokenizer, answers_only):
    """Token ids of the rows as the trainer will see them, and their loss masks (1: the token carries loss; the model
    learns token t from the tokens before it). Empty rows get no tokens. Returns (ids, masks)."""
    blank = blank_rows(rows, tokenizer)
    ids, masks = [[] for _ in blank], [[] for _ in blank]
    filled = [i for i, empty in enumerate(blank) if not empty]
    if "text" in rows.column_names:
        texts = column_values(rows, "text")
        for i, row_ids in zip(filled, text_ids(tokenizer, [texts[i] for i in filled])):
            ids[i], masks[i] = row_ids, [1] * len(row_ids)
        return ids, masks
    chats = template_chats(rows, tokenizer, filled)
    for i, row_ids, mask in zip(filled, *chat_masks(tokenizer, chats, answers_only)):
        ids[i], masks[i] = row_ids, mask
    return ids, masks


def rows_with_loss(masks, limit):
    """The rows that keep a token carrying loss within `limit` tokens (trl cuts rows at max_length and drops those
    left without one). The loss shifts the labels by one (each token predicts the next), so the first token never
    carries loss: a row needs one at positions 1 to limit - 1."""
    return [i for i, mask in enumerate(masks) if any(mask[1:limit])]


def tokenize_rows(rows, tokenizer, answers_only, limit):
    """Token ids of the rows as the trainer will see them, and the rows that keep a token carrying loss within
    `limit` tokens: (ids, kept row indices)."""
    ids, masks = token_masks(rows, tokenizer, answers_only)
    return ids, rows_with_loss(masks, limit)


def blank_rows(rows, tokenizer):
    """Which rows hold nothing to learn: no text, or a prompt or an answer missing (to_messages gave None)."""
    if "text" in rows.column_names:
        special = [tokenizer.bos_token or "", tokenizer.eos_token or ""]
        return [not strip_all(text, special) for text in column_values(rows, "text")]
    return [chat is None or not any(m["content"].strip() or m.get("tool_calls") for m in chat)
            for chat in column_values(rows, "messages")]  # fmt: skip


def template_chats(rows, tokenizer, picked):
    """The picked chat rows as (place, messages, tools) the way the chat template reads them: tool-call arguments
    and tools as objects again, and for a template without a system role (Gemma's, Mistral's), the system turns
    that open a conversation put before its first user turn, as those models' makers advise."""
    conversations, places = column_values(rows, "messages"), places_of(rows)
    tools = column_values(rows, "tools") if "tools" in rows.column_names else [None] * len(rows)
    fold = any(chat and chat[0]["role"] == "system" for chat in conversations) and not has_system_role(tokenizer)
    chats = [(places[i], template_messages(conversations[i], fold), json.loads(tools[i]) if tools[i] else None)
             for i in picked]  # fmt: skip
    check_tools(tokenizer, chats)
    return chats


def template_messages(conversation, fold_system):
    messages = []
    for message in conversation:
        message = {key: value for key, value in message.items() if value is not None}  # datasets' nulls for keys
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {**call, "function": {**call["function"], "arguments": json.loads(call["function"]["arguments"])}}
                for call in message["tool_calls"]
            ]
        messages.append(message)
    opening = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    if fold_system and 0 < opening < len(messages) and messages[opening]["role"] == "user":
        first = "\n\n".join([m["content"] for m in messages[: opening + 1]])
        messages = [{**messages[opening], "content": first}, *messages[opening + 1 :]]
    return messages


def has_system_role(tokenizer):
    """Whether the chat template renders a system turn (Gemma's and Mistral's raise an error on one)."""
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                                      tokenize=False)  # fmt: skip
        return True
    except TemplateError:
        return False


def check_tools(tokenizer, chats):
    """Refuses tool-calling rows that the template cannot render: it must show tool calls, tool results and the
    tools list (trl's supports_tool_calling checks the first two; many templates silently drop them)."""
    with_calls = next((p for p, messages, _ in chats if any(m["role"] == "tool" or m.get("tool_calls")
                                                            for m in messages)), None)  # fmt: skip
    if with_calls and not supports_tool_calling(tokenizer):
        raise UserError(
            f"{with_calls}: the row holds tool calls and tool results, which the model's chat template does not "
            "render: leave such rows out, or fine-tune a model whose template supports tools"
        )
    with_tools = next((p for p, _, tools in chats if tools), None)
    if with_tools and not renders_tools(tokenizer):
        raise UserError(
            f"{with_tools}: the row comes with a list of tools, which the model's chat template does not render: "
            "leave the tools column out, or fine-tune a model whose template supports tools"
        )


def renders_tools(tokenizer):
    name = "probe_tool_7f3a"
    tool = {"type": "function", "function": {"name": name, "description": "", "parameters": {"type": "object"}}}
    try:
        return name in tokenizer.apply_chat_template([{"role": "user", "content": "q"}], tools=[tool], tokenize=False)
    except TemplateError:
        return False


def chat_masks(tokenizer, chats, answers_only):
    """Token ids and loss masks of chat rows. Answers only: from the template's `{% generation %}` marks where it has
    them (trl's way); else found turn by turn, which works for any template that renders a conversation as the
    prefix of its continuation (almost all do); else from trl's marked copy of the template, where trl has one."""
    if not answers_only:
        ids = encode(tokenizer, render(tokenizer, chats, tokenize=False))
        return ids, [[1] * len(row_ids) for row_ids in ids]
    if has_generation_markers(tokenizer.chat_template):
        return marked_masks(tokenizer, chats, tokenizer.chat_template)
    try:
        return turn_by_turn_masks(tokenizer, chats)
    except NotPrefixPreserving as difference:
        try:
            template = get_training_chat_template(tokenizer)
        except ValueError:
            raise UserError(
                f"{difference}: answers cannot be told apart from prompts with this template; train on whole "
                "conversations with --loss_on all"
            ) from None
        return marked_masks(tokenizer, chats, template)


def turn_by_turn_masks(tokenizer, chats):
    """Each assistant turn's tokens: those that rendering the conversation up to that turn adds to rendering it up to
    the turn before with the generation prompt, through the turn's end token (`</s>`, `<|im_end|>`, `<|eot_id|>`,
    `<end_of_turn>`...: the first special token after the answer), so that the model learns to stop; what a template
    puts after it (a newline) carries no loss, as the model never writes it. The same tokens must be in the whole
    conversation's rendering, which is what the trainer sees; a template that renders them otherwise is refused."""
    turns = [(row, k) for row, (_, messages, _) in enumerate(chats) for k, m in enumerate(messages)
             if m["role"] == "assistant"]  # fmt: skip
    for row, k in turns:
        if k == 0:
            raise UserError(f"{chats[row][0]}: the conversation opens with an assistant turn: give the turn it answers")
    up_to = [(chats[row][0], chats[row][1][:k], chats[row][2]) for row, k in turns]
    prompts = encode(tokenizer, render(tokenizer, up_to, tokenize=False, add_generation_prompt=True))
    through = [(chats[row][0], chats[row][1][: k + 1], chats[row][2]) for row, k in turns]
    replies = encode(tokenizer, render(tokenizer, through, tokenize=False))
    # A conversation that ends on an answer is its last reply: rendered once (a third of the time on such rows)
    full = {row: reply for (row, k), reply in zip(turns, replies) if k == len(chats[row][1]) - 1}
    others = [row for row in range(len(chats)) if row not in full]
    full.update(zip(others, encode(tokenizer, render(tokenizer, [chats[row] for row in others], tokenize=False))))
    full = [full[row] for row in range(len(chats))]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    masks = [[0] * len(row_ids) for row_ids in full]
    for (row, k), prompt, reply in zip(turns, prompts, replies):
        start = len(prompt)
        end = next((i + 1 for i in range(start, len(reply)) if reply[i] in special), len(reply))
        for alone, whole, what in ((prompt, reply[:start], "its prompt"), (reply[:end], full[row][:end], "the answer")):
            if alone != whole:
                raise NotPrefixPreserving(
                    f"{chats[row][0]}: the chat template renders the conversation up to turn {k + 1} ({what}) "
                    f"differently once it goes on: {difference(tokenizer, alone, whole)}"
                )
        if chats[row][1][k].get("loss_weight", 1):
            masks[row][start:end] = [1] * (end - start)
    return full, masks


def difference(tokenizer, alone, whole):
    at = next((i for i, (a, b) in enumerate(zip(alone, whole)) if a != b), min(len(alone), len(whole)))
    return f"{tokenizer.decode(alone[at : at + 6])!r} alone, {tokenizer.decode(whole[at : at + 6])!r} in the whole"


def marked_masks(tokenizer, chats, template):
    """Ids and masks from the template's generation marks (transformers' assistant mask, as trl computes it); a turn
    with loss_weight 0 is then left out: the marked spans are the assistant turns, in order."""
    outputs = render(tokenizer, chats, chat_template=template, return_dict=True, return_assistant_tokens_mask=True)
    ids, masks = [out["input_ids"] for out in outputs], [list(out["assistant_masks"]) for out in outputs]
    for (place, messages, _), mask in zip(chats, masks):
        weights = [m.get("loss_weight", 1) for m in messages if m["role"] == "assistant"]
        if all(weights):
            continue
        spans = loss_spans(mask)
        if len(spans) != len(weights):
            raise UserError(f"{place}: loss_weight needs one marked span per assistant turn in the chat template")
        for (start, end), weight in zip(spans, weights):
            mask[start:end] = [weight] * (end - start)
    return ids, masks


def render(tokenizer, chats, **options):
    """apply_chat_template on each (place, messages, tools): the rows without tools in one call, each row with tools
    in its own; a row that the template refuses is named."""
    results = [None] * len(chats)
    plain = [i for i, (_, _, tools) in enumerate(chats) if not tools]
    try:
        if plain:
            out = tokenizer.apply_chat_template([chats[i][1] for i in plain], **options)
            if options.get("return_dict"):  # a dict of lists for the batch: one dict a row
                out = [{key: values[j] for key, values in out.items()} for j in range(len(plain))]
            for i, result in zip(plain, out):
                results[i] = result
        for i, (_, messages, tools) in enumerate(chats):
            if tools:
                results[i] = tokenizer.apply_chat_template(messages, tools=tools, **options)
    except (TemplateError, ValueError):
        for place, messages, tools in chats:
            try:
                tokenizer.apply_chat_template(messages, tools=tools, **options)
            except (TemplateError, ValueError) as error:
                raise UserError(f"{place} cannot be rendered with the chat template: {error}") from None
        raise
    return results


def loss_spans(mask):
    """The (start, end) of each run of tokens that carry loss."""
    starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    return [(start, next((i for i in range(start, len(mask)) if not mask[i]), len(mask))) for start in starts]


def encode(tokenizer, texts):
    """The template's text tokenized as apply_chat_template(tokenize=True) does: no special tokens added."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def loss_rows(rows, tokenizer, answers_only, max_length):
    """Rows as the trainer computes their loss: (token ids, labels) pairs, a label -100 where the token carries no
    loss, cut at max_length, rows left with no loss-carrying token after the first dropped (trl 1.16's
    _prepare_dataset does the same). Takes rows as rows_in_shape gives them, or as for_trainer does (input_ids, with
    assistant_masks for chat rows with loss on the answers)."""
    if "input_ids" in rows.column_names:
        ids = column_values(rows, "input_ids")
        if "assistant_masks" in rows.column_names:
            masks = column_values(rows, "assistant_masks")
        else:
            masks = [[1] * len(row_ids) for row_ids in ids]
    else:
        ids, masks = token_masks(rows, tokenizer, answers_only)
    pairs = [
        (row_ids[:max_length], [t if keep else -100 for t, keep in zip(row_ids, mask)][:max_length])
        for row_ids, mask in zip(ids, masks)
    ]
    return [(row_ids, labels) for row_ids, labels in pairs if any(label != -100 for label in labels[1:])]


# The check
def check_rows(rows, tokenizer, max_length, answers_only):
    """Renders and tokenizes the rows and counts what would go wrong in training. Raises UserError when nothing
    could be learnt from them. Returns a Report."""
    if len(rows) == 0:
        raise UserError("the data set has no rows")
    blank = blank_rows(rows, tokenizer)
    if all(blank):
        raise UserError("every row is empty once rendered: check that the columns hold the text (--check_data)")
    limit = max_length or 10**12
    ids, masks = token_masks(rows, tokenizer, answers_only)
    keep = rows_with_loss(masks, limit)
    if not keep:
        raise UserError(
            "no row has a token that carries loss"
            + (": no assistant turn within max_length; add answers, raise --max_length, or --loss_on all" if answers_only
               else f": raise --max_length ({max_length})")  # fmt: skip
        )
    places = places_of(rows)
    filled = [i for i, empty in enumerate(blank) if not empty]
    lengths = [len(ids[i]) for i in filled]
    return Report(
        rows=len(rows),
        lengths=lengths,
        rows_cut=sum(length > limit for length in lengths),
        rows_without_loss=len(filled) - len(keep),
        empty=sum(blank),
        duplicates=len(filled) - len({tuple(ids[i]) for i in filled}),
        keep=keep,
        example=mark_loss(tokenizer, ids[keep[0]], masks[keep[0]]),
        ids=ids,
        masks=masks,
        places=places,
        first_empty=next((place for place, empty in zip(places, blank) if empty), None),
        warnings=[warning for warning in [placeholder_warning(rows, places)] if warning],
    )


def placeholder_warning(rows, places):
    """Answers (for text rows, the text) holding unfilled template placeholders, which would be trained verbatim."""
    if "text" in rows.column_names:
        answers = [[text] for text in column_values(rows, "text")]
    else:
        answers = [[m["content"] for m in chat if m["role"] == "assistant"] if chat else []
                   for chat in column_values(rows, "messages")]  # fmt: skip
    found = []
    for place, texts in zip(places, answers):
        match = next((match for match in map(PLACEHOLDER.search, texts) if match), None)
        if match:
            found.append((place, match.group()))
    if not found:
        return None
    return (
        f"warning: {len(found):,} rows have answers holding unfilled template placeholders, which would be trained "
        f"as they are (e.g. {found[0][0]}: {found[0][1]}): fill them in or leave those rows out"
    )


def strip_all(text, tokens):
    for token in tokens:
        text = text.replace(token, "") if token else text
    return text.strip()


def mark_loss(tokenizer, ids, mask):
    """The row as text, with the tokens that carry loss between ⟦ and ⟧."""
    pieces, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[start]:
            text = tokenizer.decode(ids[start:end])
            pieces.append(f"{LOSS_MARK[0]}{text}{LOSS_MARK[1]}" if mask[start] else text)
            start = end
    return "".join(pieces)


def percentile(sorted_values, fraction):
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[max(0, math.ceil(fraction * len(sorted_values)) - 1)]


def format_report(report, shape, answers_only, max_length):
    lengths = sorted(report.lengths)
    loss = "answers only" if answers_only else "the whole text"
    lines = [
        f"data: {report.rows:,} rows, shape: {shape.name} (columns {', '.join(shape.columns)}), loss on {loss}",
        f"example, the part that carries loss between {LOSS_MARK[0]} {LOSS_MARK[1]}:",
        "    " + report.example.replace("\n", "\n    "),
        f"tokens per row: min {lengths[0]}, median {statistics.median(lengths):g}, "
        f"95th percentile {percentile(lengths, 0.95)}, max {lengths[-1]}",
        f"max_length {max_length}: {report.rows_cut:,} rows would be cut, {report.rows_without_loss:,} rows have no "
        "token that carries loss (left out)",
        f"empty rows: {report.empty:,}"
        + (f" (no text, no prompt or no answer: left out; e.g. {report.first_empty})" if report.empty else "")
        + f", exact duplicates: {report.duplicates:,}",
    ]
    return "\n".join(lines + report.warnings)


# The eval split, the same for every script that reads the same settings
def split_rows(rows, eval_fraction, seed):
    """(train rows, eval rows): eval_fraction of the rows (at least one) held out, shuffled with the seed; eval is
    None for a fraction of 0."""
    if not 0 <= eval_fraction < 1:
        raise UserError(f"--eval_fraction {eval_fraction} must be at least 0 and below 1")
    if eval_fraction == 0:
        return rows, None
    held_out = max(1, round(eval_fraction * len(rows)))  # at least one row, so small sets get an eval loss too
    if held_out >= len(rows):
        raise UserError(
            f"--eval_fraction {eval_fraction} of {len(rows)} rows leaves no row to train on: "
            "lower it, set it to 0, or give --eval_dataset"
        )
    parts = rows.train_test_split(test_size=held_out, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def load_splits(settings):
    """The raw (train, eval) rows the settings name: dataset_name, dataset_config, dataset_split, and eval_dataset
    (a split of the same Hub data set, or a second file, folder or Hub id) or else eval_fraction with eval_seed.
    Deterministic: the same settings give the same rows. eval is None when no eval set is asked for."""
    return eval_split(settings, load_source(settings.dataset_name, settings.dataset_config, settings.dataset_split))


def eval_split(settings, rows):
    """load_splits for rows already loaded from settings.dataset_name."""
    if not settings.eval_dataset:
        return split_rows(rows, settings.eval_fraction, settings.eval_seed)
    if is_split_name(settings.eval_dataset, settings.dataset_name):
        return rows, load_source(settings.dataset_name, settings.dataset_config, settings.eval_dataset)
    return rows, load_source(settings.eval_dataset)


def is_split_name(eval_dataset, dataset_name):
    """'test' is a split of the Hub data set; a path, a file name or a Hub id ('user/name') is a data set of its own."""
    return not (is_local(dataset_name) or is_local(eval_dataset) or "/" in eval_dataset or "." in eval_dataset)


def answers_only_for(shape, loss_on):
    if loss_on == "auto":
        return shape.marks_answers
    if loss_on == "answers" and not shape.marks_answers:
        raise UserError(
            "--loss_on answers needs rows that mark where the answer starts (messages, prompt/completion, ...): "
            "ready-made text rows train on the whole text; use --loss_on auto or all"
        )
    return loss_on == "answers"


def prepare_data(settings, tokenizer):
    """Step 7 in one call: load, detect the shape, render, hold out the eval rows, check, print the report.
    Rows with no token that carries loss are left out, as trl would after cutting them. Returns PreparedData."""
    rows = with_places(load_source(settings.dataset_name, settings.dataset_config, settings.dataset_split),
                       settings.dataset_name)  # fmt: skip
    columns = [column for column in rows.column_names if column != PLACE]
    shape = detect_shape(columns, settings.text_column, settings.prompt_column, settings.response_column)
    train_rows, eval_rows = eval_split(settings, rows)
    answers_only = answers_only_for(shape, settings.loss_on)
    use_chat_template(tokenizer)
    train = rows_in_shape(train_rows, shape)
    report = check_rows(train, tokenizer, settings.max_length, answers_only)
    print(format_report(report, shape, answers_only, settings.max_length))
    eval_set = None
    if eval_rows is not None:
        if PLACE not in eval_rows.column_names:
            eval_rows = with_places(eval_rows, settings.eval_dataset)
        eval_set = rows_in_shape(eval_rows, shape)
        eval_report = check_rows(eval_set, tokenizer, settings.max_length, answers_only)
        eval_set = for_trainer(eval_set, eval_report, answers_only)
        left_out = f" ({eval_report.empty:,} empty rows left out)" if eval_report.empty else ""
        print(f"eval: {len(eval_set):,} rows{left_out}")
        copies = eval_copies(report, eval_report)
        if copies:
            print(
                f"warning: {len(copies):,} eval rows are exact copies of training rows (e.g. {copies[0]}): their eval "
                "loss measures memory, not learning; remove the copies from the data"
            )
    return PreparedData(for_trainer(train, report, answers_only), eval_set, shape, answers_only, report)


def with_places(rows, name):
    return rows.add_column(PLACE, row_places(name, rows))


def eval_copies(train_report, eval_report):
    """The places of the eval rows that the trainer also sees as training rows, token for token."""
    trained = {tuple(train_report.ids[i]) for i in train_report.keep}
    return [eval_report.places[i] for i in eval_report.keep if tuple(eval_report.ids[i]) in trained]


def for_trainer(rows, report, answers_only):
    """The rows that carry loss, pre-tokenized as SFTTrainer takes them: "input_ids", and for chat rows with loss on
    the answers their "assistant_masks", from which trl builds the labels (-100 where the mask is 0; the model
    shifts them, so a masked token is one it is not trained to predict). trl then cuts the rows at max_length."""
    columns = {"input_ids": [report.ids[i] for i in report.keep]}
    if "messages" in rows.column_names and answers_only:
        columns["assistant_masks"] = [report.masks[i] for i in report.keep]
    return Dataset.from_dict(columns)
