"""A tiny Llama with random weights and a tokenizer trained here, so the tests need no network and no download."""

import json
import os
import sys

# Before huggingface_hub is imported: it reads HF_HUB_OFFLINE once, at import
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


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


@pytest.fixture(scope="session")
def tutorial_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", [{"text": row} for row in tutorial_rows()])


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
