"""The README's "Using iommusim" section works as written: its scenario runs and its commands succeed."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
from tools_helpers import INSTALLED, TOOLED, cli

from iommusim.tools.scenario.model import parse_scenario
from iommusim.tools.scenario.runner import run_scenario, vendors_for

README = Path(__file__).resolve().parents[2] / "README.md"


def _section() -> str:
    text = README.read_text()
    start = text.index("## Using iommusim")
    return text[start : text.index("\n## ", start + 1)]


def test_the_annotated_scenario_runs_on_every_vendor() -> None:
    (toml,) = re.findall(r"```toml\n(.*?)```", _section(), re.S)
    sc = parse_scenario(toml, "README.md")
    for vendor in vendors_for(sc):
        res = run_scenario(sc, vendor)
        assert res.ok, (vendor, res.failure)


@pytest.mark.skipif(set(TOOLED) != set(INSTALLED) or not TOOLED, reason="needs tools support for every vendor")
def test_the_commands_succeed_in_order(tmp_path: Path) -> None:
    section = _section()
    (toml,) = re.findall(r"```toml\n(.*?)```", section, re.S)
    (tmp_path / "my.toml").write_text(toml)
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for line in block.splitlines():
            words = shlex.split(line.split("#")[0])
            if not words or words[0] != "iommusim" or words[1:2] in (["demo"], ["plot"]):
                continue  # the demo and the pictures have tests of their own
            vendor = next((words[i + 1] for i, w in enumerate(words) if w in ("-v", "--vendor")), None)
            if vendor is not None and vendor not in INSTALLED:
                continue
            commands.append(words[1:])
    assert len(commands) >= 10
    here = Path.cwd()
    os.chdir(tmp_path)
    try:
        for words in commands:
            result = cli(*words)
            assert result.exit_code == 0, (words, result.output)
    finally:
        os.chdir(here)
