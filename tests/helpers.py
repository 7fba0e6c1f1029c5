"""What the tests share: the tiny model and its rows, finetune.py's command line, one way to run a script and to
check the one line it is refused with, the fake token and the Hub's write calls recorded instead of made. Fixtures
are in conftest.py; this module has none."""

import json
import os
import socket
import subprocess
import sys
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, RepoUrl
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What HF_TOKEN holds in the push tests: it must never show up in the output or in a written file
FAKE_TOKEN = "hf_FakeTokenForTestsOnly0123456789abcdef"


# The tiny model and its rows


def tutorial_rows():
    """Rows in the tutorial's data format (mlabonne/guanaco-llama2-1k): `<s>[INST] question [/INST] answer </s>`."""
    return [
        f"<s>[INST] What is {a} plus {b}? [/INST] {a} plus {b} is {a + b}. </s>" for a in range(10) for b in range(10)
    ]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def build_tiny_model(folder):
    """A folder with a 2-layer Llama (random weights, safetensors) and a BPE tokenizer with <s>, </s> and <unk>."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(tutorial_rows(), trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    # Like Llama's tokenizer: a BOS in front of every encoded text
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def chat_tokenizer(entry, corpus):
    """A BPE tokenizer trained here on `corpus` for a chat template of tests/chat_templates.json, with the template's
    special tokens. Byte-level like Llama-3's, Qwen's and SmolLM2's; or like the SentencePiece ones (Llama-2, Mistral,
    Gemma, Phi-3), which keep a newline and punctuation apart from the words around them."""
    special = [token for token in [entry["bos"], entry["eos"], *entry["special"]] if token]
    tok = Tokenizer(models.BPE(unk_token=None if entry["byte_level"] else "<unk>"))
    if entry["byte_level"]:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(prepend_scheme="first"), pre_tokenizers.Split("\n", "isolated"),
             pre_tokenizers.Punctuation()]
        )  # fmt: skip
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
        special = ["<unk>", *special]
        alphabet = [chr(c) for c in range(32, 127)] + ["\n", "▁"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special, initial_alphabet=alphabet)
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens(entry.get("added", []))  # tokens of the vocabulary that are not special (Qwen's <tool_call>)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=entry["bos"], eos_token=entry["eos"],
        unk_token=None if entry["byte_level"] else "<unk>", additional_special_tokens=entry["special"],
    )  # fmt: skip
    tokenizer.chat_template = entry["template"]
    return tokenizer


# finetune.py's command line


def tiny_run_args(model, data, workdir, *extra):
    """finetune.py's command line for a quick CPU run on the tiny model."""
    return [
        "--model_name", model,
        "--dataset_name", data,
        "--output_dir", str(workdir / "results"),
        "--new_model", str(workdir / "adapter"),
        "--max_steps", "6",
        "--logging_steps", "1",
        "--sample_max_new_tokens", "8",
        *extra,
    ]  # fmt: skip


# A script run as a user runs it, and the one line it is refused with


def start_script(script, *args, env=None):
    """The script started in a process of its own, as a user starts it: from the repository folder, offline, no
    input, its output captured."""
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        cwd=ROOT,
    )


def run_script(script, *args, env=None):
    """start_script, waited for: (returncode, stdout, stderr) as subprocess.run gives them."""
    process = start_script(script, *args, env=env)
    stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def one_error_line(status, stderr, *words):
    """What every refusal looks like: exit status 2 and one line `error: ...` holding each of the words, no
    traceback. Returns the line."""
    assert status == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def assert_one_line_error(result, *words):
    """A script run with run_script was refused with one line holding the words. Returns the line."""
    return one_error_line(result.returncode, result.stderr, *words)


def assert_refused(module, args, capsys, *words):
    """module.main(args) run in this process behind the scripts' own wrapper (common.run_cli) is refused with one line
    holding the words. Returns the line."""
    from common import run_cli  # the project folder is on sys.path once conftest has run

    with pytest.raises(SystemExit) as exit:
        run_cli(lambda: module.main(args))
    return one_error_line(exit.value.code, capsys.readouterr().err, *words)


def free_port():
    """A port on 127.0.0.1 that nothing listens on (until something binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The Hub's write calls, recorded instead of made

Upload = namedtuple("Upload", "repo_id folder files ignore_patterns")


def record_pushes(monkeypatch, fail_first_upload=False):
    """HF_TOKEN set to FAKE_TOKEN and the Hub's three write calls (create_repo, upload_folder, create_commit) replaced
    by ones that record what would go up: everything up to the network runs. With fail_first_upload the first
    upload_folder fails as a connection reset does. Returns the record: .repos (each repo id created), .uploads (an
    Upload per upload_folder) and .commits ((repo id, {path in the repo: operation}) per create_commit)."""
    pushed = SimpleNamespace(repos=[], uploads=[], commits=[])

    def create_repo(self, repo_id, **kwargs):
        pushed.repos.append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        pushed.uploads.append(Upload(repo_id, str(folder_path), sorted(os.listdir(folder_path)), ignore_patterns))
        if fail_first_upload and len(pushed.uploads) == 1:
            raise ConnectionError("Connection reset by peer")

    def create_commit(self, repo_id, operations, **kwargs):
        pushed.commits.append((repo_id, {op.path_in_repo: op for op in operations}))

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    for call in (create_repo, upload_folder, create_commit):
        monkeypatch.setattr(HfApi, call.__name__, call)
    return pushed
