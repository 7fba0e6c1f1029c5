"""README.md documents what the code does: every setting, and the test command CI runs."""

import dataclasses
import os

from helpers import ROOT

import finetune
import merge_and_push

README = open(os.path.join(ROOT, "README.md")).read()


def test_every_setting_is_in_the_readme_table():
    for settings in (finetune.Settings, merge_and_push.Settings):
        for field in dataclasses.fields(settings):
            assert f"| `{field.name}` |" in README, f"README's settings table misses {field.name}"


def bash_block_after(heading):
    """The command lines of README's first bash block after this heading (its comments left out)."""
    block = README.split(f"\n{heading}\n", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    return [line for line in block.splitlines() if not line.startswith("#")]


def test_ci_runs_exactly_the_lines_readme_gives_a_newcomer_without_a_gpu():
    """.ci/run is a fresh clone on a machine without a GPU: README's set-up line for that machine, then README's test
    lines, and nothing of its own."""
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    commands = [line for line in ci if line and not line.startswith(("#", "set ", "cd "))]
    setup = [line for line in bash_block_after("## Set up and run") if line.startswith("pip ")]
    assert len(setup) == 2 and "download.pytorch.org/whl/cpu" in setup[0]  # one line without a GPU, one with
    assert commands == [setup[0], *bash_block_after("## Tests")]


def test_the_set_up_lines_install_what_each_machine_needs():
    """The CPU line installs no Liger (it pulls triton in), the GPU line does, and the test line installs the test
    packages: every pin is in the file its line names."""
    requirements = {name: open(os.path.join(ROOT, name)).read().splitlines()
                    for name in ("requirements.txt", "requirements-gpu.txt", "requirements-test.txt")}  # fmt: skip
    assert not any(line.startswith("liger-kernel") for line in requirements["requirements.txt"])
    assert "-r requirements.txt" in requirements["requirements-gpu.txt"]
    assert any(line.startswith("liger-kernel==") for line in requirements["requirements-gpu.txt"])
    assert "-r requirements.txt" in requirements["requirements-test.txt"]
    assert {line.split("==")[0] for line in requirements["requirements-test.txt"]} >= {"pytest", "gguf"}
    setup = bash_block_after("## Set up and run")
    assert "pip install -r requirements-gpu.txt" in setup
    assert bash_block_after("## Tests")[0].startswith("pip install -r requirements-test.txt")
