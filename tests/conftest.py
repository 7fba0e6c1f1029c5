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


# SmolLM2-135M-Instruct (tests/smollm2.py), for tests/test_real_model.py and tests/test_gguf.py: the model converted
# and the real run made once per test session, whichever file asks first
@pytest.fixture(scope="session")
def smollm2_base(tmp_path_factory):
    """The GGUF file converted to a safetensors folder."""
    import smollm2

    return smollm2.convert_to_safetensors(str(tmp_path_factory.mktemp("smollm2-base")))


@pytest.fixture(scope="session")
def smollm2_run(smollm2_base, tmp_path_factory):
    """The tests' run (smollm2.TEST_RUN_ARGS), measured before, after and merged; test_gguf.py exports its merged
    folder."""
    import smollm2

    workdir = tmp_path_factory.mktemp("smollm2-run")
    return smollm2.run_experiment(smollm2_base, workdir, smollm2.TEST_LEARNING_RATE, extra_args=smollm2.TEST_RUN_ARGS)
