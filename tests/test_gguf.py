"""merge_and_push.py --gguf: llama.cpp's converter on the merged folder, the files checked with llama.cpp against the
merged model, the Ollama Modelfile, the push, and the bad inputs refused before the merge.

The real-model tests use SmolLM2-135M-Instruct (tests/smollm2.py), fine-tuned and merged once per test session (the
run tests/test_real_model.py checks, conftest.py's smollm2_run), then exported to f16, q8_0 and q4_k_m once. They
need llama-cpp-python and Go (CI installs both): a missing one fails with what to install, never skips.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from gguf import GGUFReader
from huggingface_hub import ModelCard, RepoUrl
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import gguf_export
import merge_and_push
from common import UserError
from helpers import FAKE_TOKEN, ROOT, tiny_run_args

TYPES = ["f16", "q8_0", "q4_k_m"]
REPO = "someone/smol-mine"


def need_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.fail(f"llama-cpp-python is needed for these tests: {gguf_export.INSTALL_HINT}")
    return llama_cpp


# A real model, fine-tuned and merged once per session (conftest.py's smollm2_run, which test_real_model.py checks),
# its merged folder exported here once
@pytest.fixture(scope="session")
def smol_run(request):
    need_llama_cpp()  # before the real-model run, which takes minutes
    run = request.getfixturevalue("smollm2_run")
    argv = ["--model_name", run["base"], "--new_model", str(run["adapter"]), "--merged_dir", str(run["merged_dir"]),
            "--hub_repo", REPO, "--gguf", ",".join(TYPES)]  # fmt: skip
    weights = run["merged_dir"] / "model.safetensors"
    merged_at = weights.stat().st_mtime_ns
    merge_and_push.main([*argv, "--no_push"])
    assert weights.stat().st_mtime_ns == merged_at, "merge_and_push.py merged again instead of using the merged folder"
    return {"base": run["base"], "adapter": run["adapter"], "merged": run["merged_dir"],
            "gguf_dir": run["merged_dir"].parent / "merged-gguf", "argv": argv}  # fmt: skip


def gguf_path(run, gguf_type):
    return str(run["gguf_dir"] / f"smol-mine-{gguf_type}.gguf")


def merged_verification(run):
    with open(run["merged"] / merge_and_push.VERIFICATION) as f:
        return json.load(f)


@pytest.mark.slow
def test_gguf_files_carry_the_chat_template_and_the_eos_and_pad_ids(smol_run):
    """Read with the gguf package's reader, not with llama.cpp: what any GGUF reader finds in the files."""
    tokenizer = AutoTokenizer.from_pretrained(smol_run["merged"])
    config = AutoConfig.from_pretrained(smol_run["merged"])
    for gguf_type in TYPES:
        fields = GGUFReader(gguf_path(smol_run, gguf_type)).fields
        assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
        assert fields["tokenizer.ggml.eos_token_id"].contents() == config.eos_token_id == tokenizer.eos_token_id
        assert fields["tokenizer.ggml.padding_token_id"].contents() == config.pad_token_id


@pytest.mark.slow
def test_f16_file_continues_each_held_out_prompt_like_the_merged_model(smol_run):
    report = merged_verification(smol_run)["gguf"]
    f16 = report["files"]["f16"]
    assert report["passed"] and report["budget_tokens"] >= 32
    assert f16["prompt_tokens_same"] and f16["greedy_matching_tokens"] == [32] * report["prompts"], f16
    # Once more here, outside the code under test: one prompt, through the GGUF's own template, greedy in both
    need_llama_cpp()
    tokenizer = AutoTokenizer.from_pretrained(smol_run["merged"])
    llm = gguf_export.load_gguf(gguf_path(smol_run, "f16"), 256)  # without llama.cpp's AMX path: see load_gguf
    messages = [{"role": "user", "content": "What is the capital of Peru?"}]
    text = tokenizer.apply_chat_template(
        messages, chat_template=llm.metadata["tokenizer.chat_template"], add_generation_prompt=True, tokenize=False
    )
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    gguf_tokens = [t for _, t in zip(range(32), llm.generate(ids, top_k=1, temp=0.0))]
    model = AutoModelForCausalLM.from_pretrained(smol_run["merged"], dtype="float32")
    import torch

    mask = torch.ones(1, len(ids), dtype=torch.long)
    out = model.generate(torch.tensor([ids]), attention_mask=mask, max_new_tokens=32, do_sample=False,
                         eos_token_id=None, pad_token_id=tokenizer.pad_token_id)  # past the EOS: all 32 compared
    assert gguf_tokens == out[0, len(ids) :].tolist()


@pytest.mark.slow
def test_llama_cpp_chat_stops_on_the_models_stop_token(smol_run):
    """llama-cpp-python's chat completion, with the template it reads from the file: the answer ends before the
    budget, on the end-of-turn token."""
    need_llama_cpp()
    llm = gguf_export.load_gguf(gguf_path(smol_run, "q8_0"), 256)
    out = llm.create_chat_completion([{"role": "user", "content": "What is the capital of Kenya?"}], max_tokens=64,
                                     temperature=0.0)  # fmt: skip
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop" and out["usage"]["completion_tokens"] < 64, out
    assert choice["message"]["content"].strip(), choice


@pytest.mark.slow
def test_quantized_files_are_measured_against_the_merged_model(smol_run):
    files = merged_verification(smol_run)["gguf"]["files"]
    kl = {t: files[t]["mean_kl"] for t in TYPES}
    assert kl["f16"] < kl["q8_0"] < kl["q4_k_m"], kl  # fewer bits, further from the merged model
    assert kl["f16"] < 1e-3 and kl["q4_k_m"] < 1.0, kl
    sizes = {t: os.path.getsize(gguf_path(smol_run, t)) for t in TYPES}
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_k_m"], sizes
    assert all(files[t]["bytes"] == sizes[t] for t in TYPES)


def go_render(template, system, messages):
    if shutil.which("go") is None:
        pytest.fail("Go is needed to render the Modelfile's TEMPLATE as Ollama does: apt-get install golang-go")
    payload = {"template": template, "system": system,
               "messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}  # fmt: skip
    out = subprocess.run(["go", "run", os.path.join(ROOT, "tests", "render_go_template.go")], input=json.dumps(payload),
                         capture_output=True, text=True, env={**os.environ, "GOFLAGS": "-mod=mod"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def modelfile_parts(text):
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M).group(1)
    return template, system


@pytest.mark.slow
def test_modelfile_template_renders_a_conversation_like_the_chat_template(smol_run):
    """Go's text/template (what Ollama runs) on the Modelfile's TEMPLATE and SYSTEM, against the chat template."""
    text = (smol_run["gguf_dir"] / gguf_export.MODELFILE).read_text()
    assert text.startswith("# Ollama") and "FROM ./smol-mine-f16.gguf" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    template, system = modelfile_parts(text)
    tokenizer = AutoTokenizer.from_pretrained(smol_run["merged"])
    conversation = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "Answer: 5."},
                    {"role": "user", "content": "And the\nopposite of 'hot'?"}]  # fmt: skip
    expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert go_render(template, system, conversation) == expected
    own_system = [{"role": "system", "content": "Be brief."}, *conversation]
    expected = tokenizer.apply_chat_template(own_system, add_generation_prompt=True, tokenize=False)
    assert go_render(template, "Be brief.", conversation) == expected


@pytest.mark.slow
def test_rerun_after_a_failed_upload_does_not_convert_again(smol_run, monkeypatch, capsys):
    files = {t: os.stat(gguf_path(smol_run, t)).st_mtime_ns for t in TYPES}
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, **kwargs):
        if repo_id.endswith("-GGUF") and "failed" not in calls:
            calls["failed"] = True
            raise OSError("503 Service Unavailable")
        calls[repo_id] = (folder_path, allow_patterns)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(gguf_export.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(gguf_export.HfApi, "upload_folder", upload_folder)
    with pytest.raises(UserError, match="rerun the same command"):
        merge_and_push.main(smol_run["argv"])
    monkeypatch.setattr(gguf_export, "convert_one", no_conversion)
    monkeypatch.setattr(gguf_export, "verify_gguf", no_conversion)
    merge_and_push.main(smol_run["argv"])
    assert files == {t: os.stat(gguf_path(smol_run, t)).st_mtime_ns for t in TYPES}
    assert "not converting again" in capsys.readouterr().out

    folder, allowed = calls[f"{REPO}-GGUF"]
    assert set(allowed) == {*(f"smol-mine-{t}.gguf" for t in TYPES), "Modelfile", "README.md", "verification.json"}
    assert set(allowed) <= set(os.listdir(folder))
    card = ModelCard((smol_run["gguf_dir"] / "README.md").read_text())
    assert card.data.base_model == smol_run["base"]
    for gguf_type in TYPES:
        size = os.path.getsize(gguf_path(smol_run, gguf_type)) / 1e6
        assert f"| {gguf_type} | {size:.1f} MB |" in card.text
    assert "ollama create" in card.text and "mean KL" in card.text

    # Into the model's own repo: the same files but the numbers (the merged folder's verification.json holds them),
    # the card the merged model's with the GGUF section after it
    merge_and_push.main([*smol_run["argv"], "--gguf_same_repo"])
    folder, allowed = calls[REPO]
    assert folder == str(smol_run["gguf_dir"]) and "verification.json" not in allowed and "Modelfile" in allowed
    same_repo_card = (smol_run["gguf_dir"] / "README.md").read_text()
    assert same_repo_card.startswith((smol_run["merged"] / "README.md").read_text().rstrip())
    assert "## GGUF files" in same_repo_card


# Bad inputs, refused before any merge work (the tiny model: no real model is needed to be refused)
@pytest.fixture(scope="module")
def tiny_adapter(tiny_model, tutorial_data, tmp_path_factory):
    import finetune

    workdir = tmp_path_factory.mktemp("gguf-tiny")
    finetune.main(tiny_run_args(tiny_model, tutorial_data, workdir, "--report_to", "none"))
    return str(workdir / "adapter")


def test_unknown_gguf_type_stops_with_one_line_before_the_merge(tiny_model, tiny_adapter, tmp_path):
    merged = tmp_path / "merged"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "merge_and_push.py"), "--model_name", tiny_model,
                          "--new_model", tiny_adapter, "--merged_dir", str(merged), "--no_push", "--gguf", "q8_0,q3_x"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert out.returncode == 2, out.stderr
    # (bitsandbytes may print a line of its own on import, before)
    assert "Traceback" not in out.stderr and out.stderr.strip().splitlines()[-1] == (
        "error: --gguf: unknown GGUF type 'q3_x': known are f16, q8_0, q4_k_m (comma-separated, e.g. --gguf q8_0,q4_k_m)"
    )
    assert not merged.exists()


def test_missing_llama_cpp_python_stops_before_the_merge(tiny_model, tiny_adapter, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import llama_cpp` sees when it is not installed
    merged = tmp_path / "merged"
    with pytest.raises(UserError, match=re.escape("pip install llama-cpp-python==0.3.36")):
        merge_and_push.main(["--model_name", tiny_model, "--new_model", tiny_adapter, "--merged_dir", str(merged),
                             "--no_push", "--gguf", "q8_0"])  # fmt: skip
    assert not merged.exists()


def test_architecture_the_converter_does_not_support_stops_before_the_merge(tiny_model, tiny_adapter, tmp_path,
                                                                            monkeypatch):  # fmt: skip
    need_llama_cpp()
    real = gguf_export.load_config

    def unsupported(name, trust_remote_code):
        config = real(name, trust_remote_code)
        config.architectures = ["NoSuchModelForCausalLM"]
        return config

    monkeypatch.setattr(gguf_export, "load_config", unsupported)
    merged = tmp_path / "merged"
    with pytest.raises(UserError, match="does not support the architecture NoSuchModelForCausalLM"):
        merge_and_push.main(["--model_name", tiny_model, "--new_model", tiny_adapter, "--merged_dir", str(merged),
                             "--no_push", "--gguf", "f16"])  # fmt: skip
    assert not merged.exists()


def test_llama2_modelfile_template_renders_like_the_chat_template(tiny_model):
    """The Llama-2 format the project gives a tokenizer without a chat template (the tutorial's): the system prompt
    inside the first user turn, BOS before every user turn, EOS after every answer."""
    import data

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data.use_chat_template(tokenizer)
    template, default_system = gguf_export.ollama_template(tokenizer)
    assert template is not None and default_system == ""
    conversation = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5."},
                    {"role": "user", "content": "And 4 plus 4?"}]  # fmt: skip
    expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert go_render(template, "", conversation) == expected
    with_system = [{"role": "system", "content": "Be brief."}, *conversation]
    expected = tokenizer.apply_chat_template(with_system, add_generation_prompt=True, tokenize=False)
    assert go_render(template, "Be brief.", conversation) == expected


def test_model_naming_code_of_its_own_is_not_given_to_the_converter(tiny_model):
    """llama.cpp's converter loads some tokenizers with trust_remote_code=True: with it off here, a model whose
    config names code of its own (auto_map) stops before the converter runs."""
    config = AutoConfig.from_pretrained(tiny_model)
    config.auto_map = {"AutoConfig": "configuration_mine.MyConfig"}
    with pytest.raises(UserError, match="auto_map"):
        gguf_export.check_converter_takes(config, AutoTokenizer.from_pretrained(tiny_model), trust_remote_code=False)
