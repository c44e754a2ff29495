"""Every example scenario, run as a user runs it, on every installed vendor it applies to."""

from __future__ import annotations

from pathlib import Path

import pytest
from tools_helpers import INSTALLED, TOOLED, cli_json, example, example_runs

from iommusim.tools.scenario.library import packaged_scenarios
from iommusim.tools.vendors import KNOWN_VENDORS

RUNS = example_runs()


@pytest.mark.parametrize(("name", "vendor"), RUNS, ids=[f"{n}-{v}" for n, v in RUNS])
def test_example_runs_as_it_says(name: str, vendor: str, tmp_path: Path) -> None:
    sc = example(name)
    result, trace = cli_json("run", name, "--vendor", vendor, tmp=tmp_path)
    assert "Traceback" not in result.output
    assert trace["scenario"] == sc.name and len(trace["runs"]) == 1
    run = trace["runs"][0]
    assert run["vendor"] == vendor
    if sc.expected_failure is None:
        assert result.exit_code == 0, result.output
        assert run["ok"] and run["failure"] is None
        assert {s["outcome"] for s in run["steps"]} <= {"ok", "skipped"}
        assert len(run["steps"]) == len(sc.steps)
    else:
        # these examples exist to fail, with the message they name
        assert result.exit_code == 1, result.output
        assert not run["ok"]
        assert sc.expected_failure in run["failure"]
        assert sc.expected_failure in " ".join(result.output.split())
        assert run["steps"][-1]["outcome"] == "failed"


def test_the_examples_cover_what_the_issue_asks_for() -> None:
    names = set(packaged_scenarios())
    wanted = {"basic", "stale-window", "fault", "hwdom-strict", "hwdom-relaxed", "superpage-split", "alloc-failure"}
    assert wanted <= names
    assert any(n.startswith("quirk-") for n in names)
    failing = [n for n in names if n.startswith("expected-failure-")]
    assert len(failing) >= 3
    for n in names:
        sc = example(n)
        assert (sc.expected_failure is not None) == n.startswith("expected-failure-"), n
        assert sc.description, n
        assert set(sc.vendors or ()) <= set(KNOWN_VENDORS)


def test_every_vendor_with_tools_runs_the_vendor_neutral_examples() -> None:
    for vendor in TOOLED:
        names = {n for n, v in RUNS if v == vendor}
        assert {"basic", "stale-window", "fault", "superpage-split", "alloc-failure", "lifecycle"} <= names


def test_an_example_on_every_vendor_in_one_run(tmp_path: Path) -> None:
    result, trace = cli_json("run", "basic", tmp=tmp_path)
    assert result.exit_code == 0, result.output
    assert [r["vendor"] for r in trace["runs"]] == INSTALLED
    for r in trace["runs"]:
        fault = next(s for s in r["steps"] if s["do"] == "dma-read" and "fault" in s["result"])
        assert fault["console"], "the fault step records the line the hypervisor logged"
