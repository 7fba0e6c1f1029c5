"""README.md documents what the code does: every setting, and the test command CI runs."""

import dataclasses
import os

from conftest import ROOT

import finetune
import merge_and_push

README = open(os.path.join(ROOT, "README.md")).read()


def test_every_setting_is_in_the_readme_table():
    for settings in (finetune.Settings, merge_and_push.Settings):
        for field in dataclasses.fields(settings):
            assert f"| `{field.name}` |" in README, f"README's settings table misses {field.name}"


def test_ci_runs_the_test_command_readme_gives():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    command = ci.strip().splitlines()[-1]
    assert f"```bash\n{command}\n```" in README
