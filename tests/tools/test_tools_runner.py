"""The scenario runner step by step: each kind of step, expectations that hold and ones that do not."""

from __future__ import annotations

from pathlib import Path

import pytest
from tools_helpers import SMALL, TOOLED, cli, cli_json, run

pytestmark = pytest.mark.skipif(not TOOLED, reason="no vendor with tools support is installed")
VENDOR = TOOLED[0]


def _steps(*steps: str) -> str:
    return SMALL + "".join(f"\n[[steps]]\n{s.strip()}\n" for s in steps)


def _failure(text: str, vendor: str = VENDOR) -> str:
    res = run(text, vendor)
    assert res.failure is not None, "the run was expected to fail"
    return res.failure


@pytest.mark.parametrize("vendor", TOOLED)
def test_map_unmap_flush_and_dma_through_every_path(vendor: str) -> None:
    res = run(
        _steps(
            'do = "map"\ndomain = 1\ngfn = 0x1000\nmfn = "d1:0x20"\ncount = 3',
            'do = "dma-write"\ndevice = "0000:03:00.0"\ngfn = 0x1002\ndata = "third"\nexpect_in = "d1:0x22"',
            'do = "expect-mapping"\ndomain = 1\ngfn = 0x1001\nexpect_mfn = "d1:0x21"\nexpect_perms = "rw"',
            'do = "unmap"\ndomain = 1\ngfn = 0x1000\ncount = 3\nflush = false',
            'do = "check"\nexpect = "stale"',
            'do = "flush"\ndomain = 1\ngfn = 0x1000\ncount = 3',
            'do = "check"\nstale = 0',
            'do = "dma-read"\ndevice = "0000:03:00.0"\ngfn = 0x1002\nexpect = "fault"',
            'do = "flush-all"\ndomain = 1',
        ),
        vendor,
    )
    assert res.ok, res.failure
    assert [s.outcome for s in res.steps] == ["ok"] * 9
    assert res.steps[4].report is not None and len(res.steps[4].report.stale) == 1


@pytest.mark.skipif("vtd" not in TOOLED, reason="the IOMMU-layer map of an HVM guest is an x86 path")
def test_a_map_through_the_iommu_layer_and_a_declared_grant() -> None:
    text = (
        SMALL.replace("[[devices]]", '[[domains]]\nid = 2\nmemory = "4M"\n\n[[devices]]')
        + """
[[steps]]
do = "map"
via = "iommu"
domain = 1
dfn = 0x3000
mfn = "d2:0x1"
grant = true

[[steps]]
do = "check"
"""
    )
    res = run(text, "vtd")
    assert res.ok, res.failure
    assert res.grants and res.grants[0].domid == 1


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ('do = "dma-read"\ndevice = "0000:03:00.0"\ngfn = 0x10\nexpect_data = "xyz"', "expected to read 'xyz'"),
        ('do = "dma-read"\ndevice = "0000:03:00.0"\ngfn = 0x5000\n', "expected the access to succeed, but it faulted"),
        (
            'do = "dma-read"\ndevice = "0000:03:00.0"\ngfn = 0x5000\nexpect = "fault"\nreason = "nonsense"',
            "expected a fault for 'nonsense'",
        ),
        ('do = "dma-write"\ndevice = "0000:03:00.0"\ngfn = 0x10\ndata = "a"\nexpect_in = "d1:0x11"', "did not land"),
        ('do = "expect-mapping"\ndomain = 1\ngfn = 0x10\nexpect_mfn = "d1:0x11"', "expected dfn 0x10 to map mfn"),
        ('do = "expect-mapping"\ndomain = 1\ngfn = 0x10\nexpect_mfn = "none"', "expected dfn 0x10 not to be mapped"),
        (
            'do = "expect-mapping"\ndomain = 1\ngfn = 0x10\nexpect_mfn = "d1:0x10"\nexpect_page_size = "1G"',
            "1048576K page",
        ),
        ('do = "expect-counter"\ncounter = "iotlb_hits"\nmin = 1000', "expected iotlb_hits with min 1000"),
        ('do = "expect-counter"\ncounter = "x"\nunit = "nosuch"', "there is no unit 'nosuch'"),
        ('do = "expect-log"\nmatch = "never printed"', "expected a line matching /never printed/"),
        ('do = "check"\nexpect = "violations"', "expected violations, but the check passed"),
        ('do = "unmap"\ndomain = 1\ngfn = 0x10\nexpect_error = "ENOMEM"', "expected ENOMEM, but the step succeeded"),
        ('do = "crash"\ndomain = 1\nexpect_crashed = false', "expected d1 not to be crashed"),
    ],
)
def test_expectations_that_do_not_hold_fail_the_run_clearly(step: str, message: str) -> None:
    assert message in _failure(_steps(step))


def test_allocation_failures_errors_and_crashes() -> None:
    res = run(
        _steps(
            'do = "fail-alloc"\nevery = true',
            'do = "map"\ndomain = 1\ngfn = 0x40000\nmfn = "d1:0x1"\nexpect_error = "ENOMEM"',
            'do = "fail-alloc"\nclear = true',
            'do = "map"\ndomain = 1\ngfn = 0x40000\nmfn = "d1:0x1"',
            'do = "destroy"\ndomain = 1',
            'do = "check"',
        ),
        VENDOR,
    )
    assert res.ok, res.failure
    assert "ENOMEM, as expected" in res.steps[1].message


def test_logs_time_and_narration() -> None:
    res = run(
        _steps(
            'do = "say"\ntext = "hello"',
            'do = "dma-read"\ndevice = "0000:03:00.0"\ngfn = 0x5000\nexpect = "fault"',
            'do = "expect-log"\nmatch = "(?i)fault"\ncount = 1',
            'do = "expect-log"\nmatch = "(?i)fault"\nabsent = true',
            'do = "expect-log"\nmatch = "(?i)fault"\nsince = "start"',
            'do = "advance-time"\nms = 250',
        ),
        VENDOR,
    )
    assert res.ok, res.failure
    assert res.platform is not None and res.platform.machine.clock.ms == 250
    assert res.steps[0].summary == "hello"


def test_until_keep_going_and_steps_for_other_vendors(tmp_path: Path) -> None:
    other = next(v for v in ("vtd", "amd", "smmu") if v != VENDOR)
    text = _steps(
        'name = "first"\ndo = "say"\ntext = "one"',
        f'do = "say"\ntext = "only on {other}"\nvendors = ["{other}"]',
        'do = "expect-log"\nmatch = "never"',
        'name = "last"\ndo = "say"\ntext = "after the failure"',
    )
    res = run(text, VENDOR, until="first")
    assert res.ok and len(res.steps) == 1
    res = run(text, VENDOR)
    assert [s.outcome for s in res.steps] == ["ok", "skipped", "failed"]
    res = run(text, VENDOR, keep_going=True)
    assert [s.outcome for s in res.steps] == ["ok", "skipped", "failed", "ok"]
    path = tmp_path / "s.toml"
    path.write_text(text)
    result, trace = cli_json("run", path, "--vendor", VENDOR, "--keep-going", tmp=tmp_path)
    assert result.exit_code == 1
    assert [s["outcome"] for s in trace["runs"][0]["steps"]] == ["ok", "skipped", "failed", "ok"]
    assert "step 3 [expect-log] (line" in trace["runs"][0]["failure"]


def test_per_vendor_values_pick_the_running_vendor() -> None:
    text = _steps('do = "expect-counter"\ncounter = { default = "nosuch-counter" }\nequals = { default = 0 }')
    assert run(text, VENDOR).ok


def test_run_prints_every_step_and_its_console_lines(tmp_path: Path) -> None:
    result = cli("run", "fault", "--vendor", VENDOR)
    assert result.exit_code == 0
    out = " ".join(result.output.split())
    assert "✓ 3 dma-write" in out and "faulted, as expected" in out
    assert "xen:" in out
    assert f"fault on {VENDOR}: 7 step(s) passed" in out
    quiet = cli("run", "fault", "--vendor", VENDOR, "-q")
    assert "✓" not in quiet.output and "7 step(s) passed" in quiet.output
    listing = cli("run", "--list")
    assert listing.exit_code == 0 and "stale-window" in listing.output


def test_json_on_stdout_is_pure_json() -> None:
    import json

    result = cli("run", "basic", "--vendor", VENDOR, "--json", "-")
    assert result.exit_code == 0
    trace = json.loads(result.stdout)
    assert trace["ok"] and trace["runs"][0]["steps"][0]["do"] == "dma-write"


def test_final_check_reports_a_violation_left_at_the_end() -> None:
    result = cli("run", "expected-failure-isolation", "--vendor", VENDOR, "--keep-going", "--check")
    assert result.exit_code == 1
    assert "which belongs to d2" in " ".join(result.output.split())
