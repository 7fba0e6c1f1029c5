"""The fixtures: a tiny Llama with random weights and a tokenizer trained here, and the tutorial's rows, so the tests
need no network and no download. What the tests share besides fixtures is in helpers.py."""

import os
import sys

# Before huggingface_hub is imported: it reads HF_HUB_OFFLINE once, at import
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
from helpers import ROOT, build_tiny_model, tutorial_rows, write_jsonl  # noqa: E402

sys.path.insert(0, ROOT)  # the project's modules: finetune, merge_and_push, common, ...


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tutorial_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", [{"text": row} for row in tutorial_rows()])
