"""The isolation checker as a library (issue 7 calls it after every step) and as `iommusim check`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tools_helpers import SMALL, TOOLED, cli, run

from iommusim.frames import Dfn, Gfn, Mfn
from iommusim.images import write_raw
from iommusim.machine.p2m import P2mType
from iommusim.machine.pci import PciDevice, Sbdf
from iommusim.perms import Perm
from iommusim.platform import Platform
from iommusim.tools.check import Grant, check
from iommusim.tools.scenario.runner import RunResult
from iommusim.tools.vendors import vendor_tools

pytestmark = pytest.mark.skipif(not TOOLED, reason="no vendor with tools support is installed")

TWO_GUESTS = SMALL.replace("[[devices]]", '[[domains]]\nid = 2\nmemory = "8M"\n\n[[devices]]') + (
    '\n[[devices]]\nsbdf = "0000:04:00.0"\nassign = 2\n'
)


def _machine(vendor: str, text: str = TWO_GUESTS) -> Platform:
    res: RunResult = run(text, vendor)
    assert res.ok and res.platform is not None
    return res.platform


def _frame(p: Platform, domid: int, gfn: int) -> Mfn:
    d = p.machine.domains[domid]
    ext = d.extents[0]
    return ext.mfn + (gfn - ext.gfn.value)


@pytest.mark.parametrize("vendor", TOOLED)
def test_a_clean_machine_passes(vendor: str) -> None:
    p = _machine(vendor)
    report = check(p)
    assert report.ok, report.violations
    assert report.stats["device_functions"] >= 2 and report.stats["trees"] >= 2
    assert not report.stale


@pytest.mark.parametrize("vendor", TOOLED)
def test_an_owed_flush_is_a_stale_window_and_a_missing_one_a_violation(vendor: str) -> None:
    p = _machine(vendor)
    g = p.machine.domains[1]
    nic = p.device("0000:03:00.0")
    from iommusim.frames import Daddr

    p.machine.dma.read(nic, Daddr(0x5000), 8)
    p.guest_unmap(g, Gfn(5), flush=False)
    report = check(p)
    assert report.ok and len(report.stale) == 1
    (w,) = report.stale
    assert (w.domid, w.dfn, w.cached_mfn) == (1, 5, _frame(p, 1, 5).value)
    # forget the debt without flushing: now nobody owes the flush the IOTLB still needs
    p.iommu.ledger.flushed(1, 5, 1)
    report = check(p)
    assert report.kinds() == {"stale-tlb"}
    assert "no flush is outstanding" in report.violations[0].message
    p.iommu.iotlb_flush(g, Dfn(5), 1)
    assert check(p).ok


@pytest.mark.parametrize("vendor", TOOLED)
def test_an_escape_into_another_guest_and_the_grants_that_allow_it(vendor: str) -> None:
    p = _machine(vendor)
    g = p.machine.domains[1]
    foreign = _frame(p, 2, 0x40)
    p.guest_map(g, Gfn(0x3000), foreign, type=P2mType.RAM_RW)
    report = check(p)
    (v,) = report.violations
    assert v.kind == "escape" and v.domid == 1 and v.mfn == foreign.value and v.dfn == 0x3000
    assert "0000:03:00.0 (d1) can write" in v.message and "belongs to d2" in v.message
    assert check(p, grants=[Grant(1, foreign.value, 1, Perm.RW)]).ok
    read_only = check(p, grants=[Grant(1, foreign.value, 1, Perm.R)])
    assert read_only.kinds() == {"escape"} and "can write" in read_only.violations[0].message
    # a grant mapping in the p2m is a grant too
    p.guest_map(g, Gfn(0x3000), foreign, type=P2mType.GRANT_MAP_RW)
    assert check(p).ok


@pytest.mark.parametrize("vendor", TOOLED)
def test_orphaned_and_leaked_table_pages(vendor: str) -> None:
    p = _machine(vendor)
    owner = vendor_tools(vendor).table_owner
    stray = p.machine.allocator.alloc(owner(1))
    report = check(p)
    assert report.kinds() == {"orphan"}
    assert f"{stray.value << 12:#x}" in report.violations[0].message
    p.machine.allocator.free(stray)
    ghost = p.machine.allocator.alloc(owner(9))
    report = check(p)
    assert report.kinds() == {"leak"} and "d9, which no longer exists" in report.violations[0].message
    p.machine.allocator.free(ghost)
    assert check(p).ok


@pytest.mark.parametrize("vendor", TOOLED)
def test_shared_and_foreign_table_pages(vendor: str) -> None:
    p = _machine(vendor)
    tools = vendor_tools(vendor)
    t1 = tools.domain_tables(p, p.machine.domains[1])
    t2 = tools.domain_tables(p, p.machine.domains[2])
    assert t1 is not None and t2 is not None
    mem = p.machine.memory
    r1, r2 = mem.words(t1.root_mfn), mem.peek_words(t2.root_mfn)
    used = int(np.nonzero(r2)[0][0])
    r1[511] = r2[used]  # d1's root now also points at d2's subtree
    report = check(p)
    assert {"shared-table", "escape"} <= report.kinds()
    assert any("reachable from both d1 and d2" in v.message for v in report.violations)
    r1[511] = t1.fmt.table_entry(_frame(p, 1, 0x40).value << 12, t1.levels)  # a guest page as a table
    report = check(p)
    assert "foreign-table" in report.kinds()
    assert any("is not hypervisor memory: it belongs to d1" in v.message for v in report.violations)


@pytest.mark.parametrize("vendor", TOOLED)
def test_a_device_no_iommu_translates(vendor: str) -> None:
    p = _machine(vendor)
    stray = PciDevice(Sbdf.parse("0000:07:00.0"))
    p.machine.add_pci_device(stray, owner=p.machine.domains[2])  # no route: it reaches memory directly
    report = check(p)
    assert report.kinds() == {"untranslated"}
    assert "0000:07:00.0 (d2) is not translated (no IOMMU in front of it)" in report.violations[0].message
    stray.bus_master = False
    assert check(p).ok


@pytest.mark.skipif("vtd" not in TOOLED, reason="VT-d is not installed")
def test_a_context_the_unit_still_caches_after_memory_changed() -> None:
    from iommusim.frames import Daddr

    p = _machine("vtd")
    nic = p.device("0000:03:00.0")
    p.machine.dma.read(nic, Daddr(0x1000), 4)  # the unit caches the NIC's context
    unit = p.units[0]
    rta = unit.regs.get("RTADDR") & ~0xFFF  # type: ignore[attr-defined]
    mem = p.machine.memory
    ctp = mem.read_u64(rta + 16 * 3) & ~0xFFF
    mem.write_u64(ctp, 0)  # the NIC's context entry cleared, and no context invalidation sent
    report = check(p)
    assert "stale-context" in report.kinds()
    assert "the context cache of vtd0 still holds 03:00.0" in report.violations[0].message


@pytest.mark.skipif("vtd" not in TOOLED, reason="VT-d is not installed")
def test_tables_waiting_for_the_deferred_free_are_not_orphans() -> None:
    res = run("superpage-split", "vtd", until="split")
    p = res.platform
    assert p is not None
    g = p.machine.domains[1]
    p.iommu.map(g, Dfn(0x200), _frame(p, 1, 0x200), 512, Perm.RW)  # merges back into a 2M leaf
    assert p.iommu.deferred_frees()
    report = check(p)
    assert report.ok, report.violations
    assert any("wait for the deferred free" in n for n in report.notes)


def test_check_command_on_scenarios(tmp_path: Path) -> None:
    vendor = TOOLED[0]
    result = cli("check", "--vendor", vendor, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "isolation holds" in out and "[stale window]" in out
    data = json.loads((tmp_path / "r.json").read_text())
    (c,) = data["checks"]
    assert c["ok"] and len(c["stale_windows"]) == 1 and c["vendor"] == vendor
    result = cli("check", "expected-failure-isolation", "--vendor", vendor)
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "[escape]" in out and "which belongs to d2" in out and "the scenario failed" in out
    result = cli("check", "stale-window", "--vendor", vendor, "--until", "flush")
    assert result.exit_code == 0 and "[stale window]" not in result.output


@pytest.mark.skipif("smmu" not in TOOLED, reason="the SMMU is not installed")
def test_check_catches_the_arm_flush_quirk() -> None:
    result = cli("check", "quirk-arm-p2m-no-smmu-flush")
    assert result.exit_code == 1
    assert "[stale-tlb]" in result.output


@pytest.mark.parametrize("vendor", TOOLED)
def test_check_on_an_image(vendor: str, tmp_path: Path) -> None:
    p = _machine(vendor)
    tools = vendor_tools(vendor)
    image = tmp_path / "mem.raw"
    target = next(t for t in tools.decode_targets(p) if t.domid == 1)
    opts = [x for k, v in target.options.items() for x in ("-o", f"{k}={v}")]
    args = ["check", "--image", image, "--format", target.format, "--root", hex(target.root), *opts]
    write_raw(p.machine.memory, image)
    assert cli(*args).exit_code == 0
    t1 = tools.domain_tables(p, p.machine.domains[1])
    assert t1 is not None
    p.guest_map(p.machine.domains[1], Gfn(0x3000), Mfn(t1.root_mfn), type=P2mType.RAM_RW)  # its own root, writable
    write_raw(p.machine.memory, image)
    result = cli(*args, "--json", tmp_path / "c.json")
    assert result.exit_code == 1
    assert f"can write the table page {t1.root_maddr:#x} at dfn 0x3000" in " ".join(result.output.split())
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["violations"][0]["kind"] == "escape"
    assert check(p).kinds() >= {"escape"}  # the live check agrees: the page is the hypervisor's
    result = cli("check", "--image", image, "--format", target.format)
    assert result.exit_code == 2


def test_reports_are_capped_per_kind() -> None:
    p = _machine(TOOLED[0])
    g = p.machine.domains[1]
    for i in range(3):
        p.guest_map(g, Gfn(0x3000 + 2 * i), _frame(p, 2, 0x40 + 2 * i), type=P2mType.RAM_RW)
    assert len(check(p).violations) == 3
    capped = check(p, max_reports=2)
    assert len(capped.violations) == 2 and not capped.ok
    assert "more escape violations were found; only the first 2 are listed" in capped.notes


@pytest.mark.skipif("vtd" not in TOOLED, reason="an x86 hardware domain without an IOMMU")
def test_without_an_iommu_only_dom0_has_devices_and_that_is_by_design() -> None:
    text = SMALL.replace("assign = 1", "") + "\n[iommu]\nenable = false\n"
    p = _machine("vtd", text)
    report = check(p)
    assert report.ok
    assert any("the hardware domain reaches all memory" in n for n in report.notes)


@pytest.mark.skipif("vtd" not in TOOLED, reason="VT-d is not installed")
def test_an_image_where_two_domain_ids_share_tables(tmp_path: Path) -> None:
    p = _machine("vtd")
    (root_target,) = [t for t in vendor_tools("vtd").decode_targets(p) if t.format == "vtd-root"]
    mem = p.machine.memory
    ctp = mem.read_u64(root_target.root + 16 * 4) & ~0xFFF  # bus 4: the NVMe drive of d2
    d1_ctx = mem.read_u64(mem.read_u64(root_target.root + 16 * 3) & ~0xFFF)  # the NIC's context (d1's tables)
    mem.write_u64(ctp, d1_ctx)  # d2's drive now walks d1's tables, under d2's domain id
    image = tmp_path / "mem.raw"
    write_raw(mem, image)
    result = cli("check", "--image", image, "--format", "vtd-root", "--root", hex(root_target.root))
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "[shared-table]" in out and "are reachable from did" in out
    assert check(p).kinds() >= {"escape"}  # live: d2's drive reaches d1's memory
