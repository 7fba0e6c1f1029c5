"""Your own data set, for finetune.py's step 7: load it from any common source, find its shape from its columns,
render it the way the model will be prompted, hold out an eval set, and check it before a GPU is spent on it.

The rendering is the tokenizer's chat template, or, where the tokenizer has none, the Llama-2 chat format of the
tutorial's rows (set on the tokenizer, so it is saved with the adapter and the merged model is prompted the same way).
"""

import csv
import json
import math
import os
import statistics
from dataclasses import dataclass

from datasets import Dataset, load_dataset
from jinja2 import TemplateError
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from common import UserError

# The format of a local file comes from its extension: (datasets builder, its arguments)
FILE_FORMATS = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".parquet": ("parquet", {}),
}

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
# role/content but keeps ShareGPT's "human" and "gpt", which no chat template knows.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

MAPPING_SETTINGS = "--text_column, or --prompt_column and --response_column"
LOSS_MARK = ("⟦", "⟧")


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


@dataclass
class PreparedData:
    """What finetune.py hands the trainer: rows rendered for trl ("messages" or pre-tokenized "input_ids")."""

    train: Dataset
    eval: Dataset | None
    shape: Shape
    answers_only: bool
    report: Report


# Sources
def load_source(name, config="", split="train"):
    """A local file or folder (format from the extension), or a Hub data set id with an optional config and split."""
    if os.path.isdir(name) or os.path.splitext(name)[1].lower() in FILE_FORMATS:
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
        return [path], os.path.splitext(path)[1].lower()
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
            return Shape(name, names + (("input",) if name.startswith("Alpaca") and "input" in columns else ()))
    if "text" in columns:
        return Shape("text", ("text",), marks_answers=False)
    raise UserError(
        f"cannot tell how to read rows with the columns {', '.join(columns) or '(none)'}: known are text, messages, "
        f"conversations, prompt/completion, instruction/input/output, question/answer; map yours with {MAPPING_SETTINGS}"
    )


def to_messages(shape, values, row):
    """One row of a chat-like shape as a list of {role, content} messages."""
    if shape.name in ("messages", "ShareGPT conversations"):
        turns, messages = values[0], []
        if not isinstance(turns, list):
            raise UserError(f"row {row + 1}: '{shape.columns[0]}' is not a list of turns")
        role_key, content_key = ("role", "content") if shape.name == "messages" else ("from", "value")
        for turn in turns:
            if not isinstance(turn, dict) or turn.get(role_key) is None:
                raise UserError(f"row {row + 1}: every turn in '{shape.columns[0]}' needs '{role_key}' and '{content_key}'")
            role = turn[role_key] if shape.name == "messages" else SHAREGPT_ROLES.get(turn[role_key])
            if role not in ("system", "user", "assistant"):
                raise UserError(f"row {row + 1}: unknown speaker '{turn[role_key]}' (known: {', '.join(SHAREGPT_ROLES)})")
            messages.append({"role": role, "content": turn.get(content_key) or ""})
        return messages
    if shape.name == "prompt/completion" and isinstance(values[0], list):  # trl's conversational prompt/completion
        return to_messages(Shape("messages", ("messages",)), [values[0] + values[1]], row)
    if shape.name.startswith("Alpaca"):
        instruction, output, extra = values[0] or "", values[1] or "", (values[2] or "") if len(values) > 2 else ""
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    prompt, answer = values
    return [{"role": "user", "content": str(prompt or "")}, {"role": "assistant", "content": str(answer or "")}]


def rows_in_shape(rows, shape):
    """The rows as trl's chat rows ("messages"), or as ready-made text ("text"): one column, nothing else."""
    missing = [column for column in shape.columns if column not in rows.column_names]
    if missing:
        raise UserError(
            f"the rows have no column {', '.join(repr(m) for m in missing)} that their shape ({shape.name}) needs "
            f"(columns: {', '.join(rows.column_names)})"
        )
    columns = [column_values(rows, column) for column in shape.columns]
    if not shape.marks_answers:
        return Dataset.from_dict({"text": [str(value or "") for value in columns[0]]})
    return Dataset.from_dict({"messages": [to_messages(shape, values, i) for i, values in enumerate(zip(*columns))]})


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
    try:
        own = tokenizer.apply_chat_template(probe, tokenize=False)
    except TemplateError:
        return False
    return own == tokenizer.apply_chat_template(probe, tokenize=False, chat_template=LLAMA2_CHAT_TEMPLATE)


def training_template(tokenizer, answers_only):
    """The template trl renders chat rows with: the tokenizer's, or with answers-only loss and a template without
    generation marks, trl's patched copy of it (the one SFTTrainer picks itself)."""
    if not answers_only or has_generation_markers(tokenizer.chat_template):
        return tokenizer.chat_template
    try:
        return get_training_chat_template(tokenizer)
    except ValueError:
        raise UserError(
            "the model's chat template does not mark where answers start ({% generation %}) and trl has no marked "
            "version of it: train on whole conversations with --loss_on all"
        ) from None


def prompt_inputs(tokenizer, question, return_tensors="pt"):
    """A user turn rendered the way training rows are, ready for generate(): input_ids and attention_mask."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=True, return_tensors=return_tensors
    )


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


def loss_masks(tokenizer, conversations, answers_only):
    """Token ids and loss masks (1: the token carries loss) of chat rows, from the template's generation marks, as
    trl computes them (apply_chat_template's assistant mask)."""
    out = tokenizer.apply_chat_template(
        conversations,
        chat_template=training_template(tokenizer, answers_only),
        return_dict=True,
        return_assistant_tokens_mask=answers_only,
    )
    ids = out["input_ids"]
    return ids, out["assistant_masks"] if answers_only else [[1] * len(row_ids) for row_ids in ids]


def render_chats(tokenizer, conversations, answers_only):
    """The chat rows rendered with the template trl will use; a row the template refuses is named."""
    try:
        return tokenizer.apply_chat_template(
            conversations, chat_template=training_template(tokenizer, answers_only), tokenize=False
        )
    except TemplateError:
        for i, conversation in enumerate(conversations):
            try:
                tokenizer.apply_chat_template(conversation, tokenize=False)
            except TemplateError as error:
                raise UserError(f"row {i + 1} cannot be rendered with the chat template: {error}") from None
        raise


def tokenize_rows(rows, tokenizer, answers_only, limit):
    """Token ids of the rows as the trainer will see them, and the rows that keep a token carrying loss within
    `limit` tokens (trl cuts rows at max_length and drops those left without one): (ids, kept row indices)."""
    if "text" in rows.column_names:
        ids = text_ids(tokenizer, column_values(rows, "text"))
        return ids, [i for i, row_ids in enumerate(ids) if row_ids]
    conversations = column_values(rows, "messages")
    # The template's text tokenized without special tokens: what apply_chat_template(tokenize=True) gives, but
    # without its per-token Python loop for the loss mask, which takes most of the check's time on 100,000 rows.
    ids = tokenizer(render_chats(tokenizer, conversations, answers_only), add_special_tokens=False)["input_ids"]
    if not answers_only:
        return ids, [i for i, row_ids in enumerate(ids) if row_ids]
    # An assistant turn always carries loss (its generation marks hold at least the EOS); only for a row that is cut
    # must the mask say whether any of it is left
    answered = [i for i, chat in enumerate(conversations) if any(m["role"] == "assistant" for m in chat)]
    cut = [i for i in answered if len(ids[i]) > limit]
    cut_masks = dict(zip(cut, loss_masks(tokenizer, [conversations[i] for i in cut], True)[1])) if cut else {}
    return ids, [i for i in answered if i not in cut_masks or any(cut_masks[i][:limit])]


def loss_rows(rows, tokenizer, answers_only, max_length):
    """Rows as the trainer computes their loss: (token ids, labels) pairs, a label -100 where the token carries no
    loss, cut at max_length, rows left with no loss-carrying token dropped (trl 1.16's _prepare_dataset does the
    same). Takes chat rows ("messages"), ready-made text ("text") or rows already tokenized ("input_ids")."""
    if "messages" in rows.column_names:
        ids, masks = loss_masks(tokenizer, column_values(rows, "messages"), answers_only)
    else:
        ids = column_values(rows, "input_ids") if "input_ids" in rows.column_names else text_ids(
            tokenizer, column_values(rows, "text")
        )
        masks = [[1] * len(row_ids) for row_ids in ids]
    pairs = [
        (row_ids[:max_length], [t if keep else -100 for t, keep in zip(row_ids, mask)][:max_length])
        for row_ids, mask in zip(ids, masks)
    ]
    return [(row_ids, labels) for row_ids, labels in pairs if any(label != -100 for label in labels)]


def example_row(rows, tokenizer, answers_only, row):
    """One row as text, with the part that carries loss marked."""
    if "text" in rows.column_names:
        row_ids = text_ids(tokenizer, [rows[row]["text"]])[0]
        return mark_loss(tokenizer, row_ids, [1] * len(row_ids))
    ids, masks = loss_masks(tokenizer, [rows[row]["messages"]], answers_only)
    return mark_loss(tokenizer, ids[0], masks[0])


# The check
def check_rows(rows, tokenizer, max_length, answers_only):
    """Renders and tokenizes the rows and counts what would go wrong in training. Raises UserError when nothing
    could be learnt from them. Returns a Report."""
    if len(rows) == 0:
        raise UserError("the data set has no rows")
    if "text" in rows.column_names:
        special = [tokenizer.bos_token or "", tokenizer.eos_token or ""]
        blank = [not strip_all(text, special) for text in column_values(rows, "text")]
    else:
        blank = [not any(str(m["content"]).strip() for m in chat) for chat in column_values(rows, "messages")]
    if all(blank):
        raise UserError("every row is empty once rendered: check that the columns hold the text (--check_data)")
    limit = max_length or 10**12
    ids, keep = tokenize_rows(rows, tokenizer, answers_only, limit)
    if not keep:
        raise UserError(
            "no row has a token that carries loss"
            + (": no assistant turn within max_length; add answers, raise --max_length, or --loss_on all" if answers_only
               else f": raise --max_length ({max_length})")  # fmt: skip
        )
    lengths = [len(row_ids) for row_ids in ids]
    return Report(
        rows=len(rows),
        lengths=lengths,
        rows_cut=sum(length > limit for length in lengths),
        rows_without_loss=len(rows) - len(keep),
        empty=sum(blank),
        duplicates=len(ids) - len(set(map(tuple, ids))),
        keep=keep,
        example=example_row(rows, tokenizer, answers_only, keep[0]),
        ids=ids,
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
        f"empty rows: {report.empty:,}, exact duplicates: {report.duplicates:,}",
    ]
    return "\n".join(lines)


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
    local = os.path.exists(dataset_name) or os.path.splitext(dataset_name)[1].lower() in FILE_FORMATS
    return not (local or "/" in eval_dataset or os.path.exists(eval_dataset) or "." in eval_dataset)


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
    rows = load_source(settings.dataset_name, settings.dataset_config, settings.dataset_split)
    shape = detect_shape(rows.column_names, settings.text_column, settings.prompt_column, settings.response_column)
    train_rows, eval_rows = eval_split(settings, rows)
    answers_only = answers_only_for(shape, settings.loss_on)
    use_chat_template(tokenizer)
    train = rows_in_shape(train_rows, shape)
    report = check_rows(train, tokenizer, settings.max_length, answers_only)
    print(format_report(report, shape, answers_only, settings.max_length))
    eval_set = None
    if eval_rows is not None:
        eval_set = rows_in_shape(eval_rows, shape)
        eval_report = check_rows(eval_set, tokenizer, settings.max_length, answers_only)
        eval_set = for_trainer(eval_set, tokenizer, eval_report)
        print(f"eval: {len(eval_set):,} rows")
    return PreparedData(for_trainer(train, tokenizer, report), eval_set, shape, answers_only, report)


def for_trainer(rows, tokenizer, report):
    """The rows that carry loss, as SFTTrainer takes them: chat rows as "messages", text rows pre-tokenized."""
    if "text" in rows.column_names:
        return Dataset.from_dict({"input_ids": [report.ids[i] for i in report.keep]})
    return rows.select(report.keep) if len(report.keep) < len(rows) else rows
