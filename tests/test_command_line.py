"""What a user reads from the scripts: --help lists each setting once with its real default, a run prints what the
user needs, not the libraries' start-up and retry chatter, and neither script imports the other."""

import ast
import dataclasses
import logging
import os
import re
import time

import huggingface_hub
import pytest

import common
import finetune
import merge_and_push
from helpers import ROOT, run_script

SCRIPTS = {"finetune.py": finetune.Settings, "merge_and_push.py": merge_and_push.Settings}


def help_entries(text):
    """--help's options, each as one string: the option names, then the help text."""
    options = text.split("\noptions:\n")[1]
    entries = re.split(r"\n(?=  -)", options.strip("\n"))
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_each_setting_once_with_its_real_default(script):
    result = run_script(script, "--help", env={"COLUMNS": "1000"})  # wide: a default is never wrapped at a '-'
    assert result.returncode == 0 and result.stderr == ""  # nothing from the libraries either
    entries = help_entries(result.stdout)
    fields = dataclasses.fields(SCRIPTS[script])
    assert sorted(entries) == sorted(["-h", *(f"--{f.name}" for f in fields)])  # no --a-b alias, no --no_x entry
    for field in fields:
        entry = entries[f"--{field.name}"]
        assert entry.count("(default:") == 1, entry
        if field.default is True:  # its --no_x turns it off, and the default is the setting's own
            assert f"--no_{field.name}" in entry and "(default: True" in entry, entry
        elif "(default:" not in field.metadata["help"]:  # one computed from another setting is said in words
            assert f"(default: {field.default})" in entry, entry
    if script == "finetune.py":
        assert "(default: True; --no_use_4bit turns it off)" in entries["--use_4bit"]


def test_a_bad_model_offline_prints_only_the_error_line():
    result = run_script("finetune.py", "--model_name", "nobody-here/no-such-model")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: cannot load the model 'nobody-here/no-such-model'")
    assert len(result.stderr.splitlines()) == 1, result.stderr  # no bitsandbytes warning before it


def test_an_unreachable_hub_is_retried_without_a_line_for_each_retry(monkeypatch):
    """huggingface_hub retries an unreachable Hub 5 times, logging 2 lines each time: only the error line is left."""
    unreachable = "http://127.0.0.1:9"  # the discard port: refused
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", unreachable)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        unreachable + "/{repo_id}/resolve/{revision}/{filename}")  # fmt: skip
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)  # the retries wait 1 + 2 + 4 + 8 + 8 s
    logged = logging.Handler()
    logged.emit = lambda record: pytest.fail(f"huggingface_hub logged: {record.getMessage()}")
    logging.getLogger("huggingface_hub").addHandler(logged)  # its stderr handler was bound before pytest's capture
    try:
        with pytest.raises(common.UserError, match="cannot load the model 'nobody-here/no-such-model'"):
            common.load_config("nobody-here/no-such-model", False)
    finally:
        logging.getLogger("huggingface_hub").removeHandler(logged)
    assert len(slept) == 5  # it did retry


def imported_modules(path):
    """The project modules a file imports, read from its source (nothing is run)."""
    tree = ast.parse(open(path).read())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return {name for name in names if os.path.isfile(os.path.join(ROOT, f"{name}.py"))}


def test_neither_script_imports_the_other():
    """What both scripts need comes from the modules beside them: importing finetune.py for a merge would run its
    start-up (the CUDA allocator setting, trl's trainer) and tie the merge to the training script's internals."""
    modules = {script: imported_modules(os.path.join(ROOT, script)) for script in SCRIPTS}
    assert "merge_and_push" not in modules["finetune.py"] and "finetune" not in modules["merge_and_push.py"]
    assert "qlora" in modules["finetune.py"] & modules["merge_and_push.py"]
    for module in {name for imported in modules.values() for name in imported}:  # nor do the modules they import
        assert not imported_modules(os.path.join(ROOT, f"{module}.py")) & {"finetune", "merge_and_push"}, module
