"""Shared helpers of the tools tests: the CLI as a user runs it, example scenarios, small machines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner, Result

from iommusim.cli.app import app
from iommusim.platform import available_vendors
from iommusim.tools.scenario.library import packaged_scenarios
from iommusim.tools.scenario.model import Scenario, load_scenario, parse_scenario
from iommusim.tools.scenario.runner import RunResult, run_scenario, vendors_for
from iommusim.tools.vendors import TOOL_ADAPTERS

INSTALLED = available_vendors()
#: vendors the tools can inspect (a vendor merged before its tools adapter is skipped by those tests)
TOOLED = [v for v in INSTALLED if v in TOOL_ADAPTERS]


def cli(*args: str | Path) -> Result:
    """Run ``iommusim ARGS`` in-process, wide enough that messages are not wrapped."""
    runner = CliRunner()
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1"}, catch_exceptions=False)


def cli_json(*args: str | Path, tmp: Path) -> tuple[Result, Any]:
    out = tmp / "out.json"
    result = cli(*args, "--json", out)
    return result, json.loads(out.read_text()) if out.exists() else None


def example(name: str) -> Scenario:
    return load_scenario(packaged_scenarios()[name])


def example_runs() -> list[tuple[str, str]]:
    """(example, vendor) for every example on every installed vendor it applies to."""
    out = []
    for name, path in packaged_scenarios().items():
        sc = load_scenario(path)
        wanted = sc.vendors or tuple(INSTALLED)
        out += [(name, v) for v in wanted if v in TOOLED]
    return out


def run(name_or_text: str, vendor: str, **kw: Any) -> RunResult:
    """Run an example (by name) or scenario text on one vendor."""
    sc = example(name_or_text) if name_or_text in packaged_scenarios() else parse_scenario(name_or_text)
    assert vendor in vendors_for(sc, vendor)
    return run_scenario(sc, vendor, **kw)


#: A small machine with one guest and its NIC, for scenarios written inside tests.
SMALL = """
[machine]
memory = "128M"
[hardware_domain]
memory = "16M"
[[domains]]
id = 1
memory = "8M"
[[devices]]
sbdf = "0000:03:00.0"
assign = 1
"""
