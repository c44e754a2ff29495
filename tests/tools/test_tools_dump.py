"""iommusim dump: trees, mappings read back from memory, cached translations with their state, counters."""

from __future__ import annotations

from pathlib import Path

import pytest
from tools_helpers import TOOLED, cli, cli_json, run

from iommusim.tools.dump import dump_platform
from iommusim.tools.tables import table_mappings

pytestmark = pytest.mark.skipif(not TOOLED, reason="no vendor with tools support is installed")


@pytest.mark.parametrize("vendor", TOOLED)
def test_dump_of_the_demo_machine(vendor: str, tmp_path: Path) -> None:
    result, data = cli_json("dump", "--vendor", vendor, tmp=tmp_path)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    # the tree, the mapping list, the cache with the stale entry, the counters
    assert "L1 table @ 0x" in out and ("4 levels" in out or "3 levels" in out)
    assert "[258-511] dfn 0x102-0x1ff" in out  # gfns 0x100 and 0x101 were unmapped
    assert "0x102-0x3fff │ -> │" in out
    assert "stale: flush owed" in out
    assert "flush owed for: dfn 0x101" in out
    assert "Counters" in out and "iotlb_hits" in out
    (dump,) = data["dumps"]
    assert dump["vendor"] == vendor
    d1 = next(d for d in dump["domains"] if d["domain"] == 1)
    assert d1["pages"] == (64 << 20 >> 12) - 2
    assert [m["dfn"] for m in d1["mappings"]] == ["0x0", "0x102"]
    assert d1["owed_flushes"] == [{"dfn": "0x101", "pages": 1}]
    stale = [c for c in dump["caches"] if c["state"] == "stale"]
    assert len(stale) == 1 and stale[0]["daddr"] == "0x101000"
    assert d1["tree"]["tables"] >= 3


@pytest.mark.parametrize("vendor", TOOLED)
def test_dump_reads_what_the_device_sees(vendor: str) -> None:
    res = run("superpage-split", vendor, until="split")
    assert res.platform is not None
    dump = dump_platform(res.platform, domains=[1])
    (d1,) = dump.domains
    assert d1.tables is not None
    assert d1.mappings == table_mappings(res.platform.machine.memory, d1.tables)
    assert {m.page_shift for m in d1.mappings} == {12, 21}
    ctx = d1.devices[0][1]
    assert ctx.tables is not None and ctx.tables.key == d1.tables.key
    if "dump_page_tables" in res.platform.ops.provided:
        assert d1.mappings == res.platform.iommu.dump_page_tables(res.platform.machine.domains[1])


def test_dump_until_a_step_and_of_one_domain(tmp_path: Path) -> None:
    vendor = TOOLED[0]
    result, data = cli_json(
        "dump", "superpage-split", "--vendor", vendor, "--until", "before-split", "-d", "1", tmp=tmp_path
    )
    assert result.exit_code == 0
    (dump,) = data["dumps"]
    assert [d["domain"] for d in dump["domains"]] == [1]
    assert [m["page_size"] for m in dump["domains"][0]["mappings"]] == ["2M"]
    assert "after step before-split" in result.output


def test_dump_mistakes_are_usage_errors() -> None:
    vendor = TOOLED[0]
    result = cli("dump", "--vendor", vendor, "-d", "9")
    assert result.exit_code == 2 and "there is no domain d9" in result.output
    result = cli("dump", "--vendor", vendor, "--until", "nosuch")
    assert result.exit_code == 2 and "no step is named 'nosuch'" in result.output


def test_dump_of_a_failed_run_still_dumps_and_says_so() -> None:
    vendor = TOOLED[0]
    result = cli("dump", "expected-failure-wrong-data", "--vendor", vendor, "--no-tree", "--no-caches")
    assert result.exit_code == 1
    assert "the scenario failed" in result.output and "d1" in result.output


@pytest.mark.parametrize("vendor", TOOLED)
def test_save_image_lists_the_decode_commands_that_read_it_back(vendor: str, tmp_path: Path) -> None:
    image = tmp_path / "mem.elf"
    result, data = cli_json("dump", "basic", "--vendor", vendor, "--no-tree", "--save-image", image, tmp=tmp_path)
    assert result.exit_code == 0 and image.exists()
    commands = data["dumps"][0]["image"]["decode"]
    assert commands and all(c["command"].startswith(f"iommusim decode {image}") for c in commands)
    for c in commands:
        args = c["command"].split()[1:]
        decoded = cli(*args)
        assert decoded.exit_code == 0, decoded.output
