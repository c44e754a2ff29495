"""Historic defects brought back by quirks, each caught by the isolation check, and clean without the quirk.

Every packaged ``quirk-*`` scenario sets the defect up and ends with a check step that expects the
violation, so ``iommusim run`` passes on it and ``iommusim check`` (the check at the end) exits 1 and
names the problem.  Here each one is also run a second time without its quirk, to the step where the
defect happens: the device's access that the defect lets through must then be refused (or land where the
new mapping says), and the check must pass.  Defects that need something a scenario cannot express (a
hung VT-d invalidation queue, a stopped AMD command processor) are set up in Python.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from iommusim.cli.app import app
from iommusim.errors import DmaFault, TimedOut
from iommusim.frames import Daddr, Dfn, Gfn, Mfn
from iommusim.hw.amd import regs as amd_regs
from iommusim.hw.amd.unit import AmdIommu
from iommusim.hw.vtd.unit import VtdUnit
from iommusim.iommu.config import IommuConfig
from iommusim.machine import PciDevice, Sbdf
from iommusim.perms import Perm
from iommusim.platform import HardwareSpec, Platform, available_vendors, build_platform
from iommusim.tools.check import check
from iommusim.tools.scenario.library import packaged_scenarios
from iommusim.tools.scenario.model import Scenario, load_scenario
from iommusim.tools.scenario.runner import run_scenario

INSTALLED = set(available_vendors())
NIC, DISK = "0000:03:00.0", "0000:04:00.0"


@dataclass(frozen=True)
class Probe:
    """The access a defect lets through, made right after the scenario step where the defect happens."""

    quirk: str
    until: str | int  # the step (name or 1-based number) after which the defect is in place
    device: str
    dfn: int
    write: bool
    kind: str  # the violation kind the check reports with the quirk
    says: str  # and a piece of its message
    #: for a Dfn that stays mapped (elsewhere): the stale bytes the defect returns; the access itself is allowed
    stale: bytes | None = None
    #: the defect refuses an access that must work (a broken context) rather than letting one through
    refuses: bool = False


PROBES: dict[str, Probe] = {
    "quirk-amd-remap-perm-no-flush": Probe(
        "amd-remap-perm-no-flush", "make-read-only", NIC, 0x101, True, "stale-tlb", "dfn 0x101 -> mfn"
    ),
    "quirk-amd-pv-no-map-flush": Probe(
        "amd-pv-no-map-flush", "remap", DISK, 0x3F000, False, "stale-tlb", "dfn 0x3f000", stale=b"old page"
    ),
    "quirk-amd-split-rw-children": Probe(
        "amd-split-rw-children", "split", NIC, 0x2006, True, "escape", "can write mfn"
    ),
    "quirk-amd-merge-counter": Probe("amd-merge-counter", "remap", NIC, 0x1FF, False, "escape", "at dfn 0x1ff"),
    "quirk-amd-iotlb-s-bit-zero": Probe("amd-iotlb-s-bit-zero", "unmap", NIC, 0x102, False, "stale-tlb", "device-tlb"),
    "quirk-amd-unity-map-seed": Probe("amd-unity-map-seed", "deassign", DISK, 0x3E001, False, "escape", "0x3e000"),
    "quirk-arm-p2m-no-smmu-flush": Probe("arm-p2m-no-smmu-flush", 2, NIC, 0x101, False, "stale-tlb", "dfn 0x101"),
    "quirk-smmu-sl0-level1": Probe(
        "smmu-sl0-level1", "booted", NIC, 0x101, False, "context", "TCR describes no stage-2 walk", refuses=True
    ),
}


def _scenario(name: str) -> Scenario:
    return load_scenario(packaged_scenarios()[name])


def _without_quirk(sc: Scenario, quirk: str) -> Scenario:
    out = copy.deepcopy(sc)
    out.iommu["quirks"] = [q for q in out.iommu.get("quirks", []) if q != quirk]
    return out


def _vendor(sc: Scenario) -> str:
    assert sc.vendors is not None and len(sc.vendors) == 1, "a quirk scenario names its one vendor"
    return sc.vendors[0]


def _access(p: Platform, probe: Probe) -> bytes | None:
    """Make the probe's access; what it read (or b"" for a write), None if the IOMMU refused it."""
    dev = p.device(probe.device)
    try:
        if probe.write:
            p.machine.dma.write(dev, Daddr(probe.dfn << 12), b"probe!")
            return b""
        return p.machine.dma.read(dev, Daddr(probe.dfn << 12), 8)
    except DmaFault:
        return None


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"}, catch_exceptions=False)
    return result.exit_code, " ".join(result.output.split())


def test_every_quirk_scenario_is_probed_here() -> None:
    shipped = {n for n in packaged_scenarios() if n.startswith("quirk-")}
    assert set(PROBES) <= shipped
    assert shipped - set(PROBES) == {"quirk-vtd-dfn-truncated"}  # aliasing inside d1: no isolation to break
    assert len(PROBES) + 2 >= 10  # with the two Python-only defects below


@pytest.mark.parametrize("name", sorted(PROBES))
def test_check_catches_the_defect_and_passes_without_the_quirk(name: str) -> None:
    probe = PROBES[name]
    sc = _scenario(name)
    vendor = _vendor(sc)
    if vendor not in INSTALLED:
        pytest.skip(f"{vendor} is not installed")
    assert probe.quirk in sc.iommu["quirks"]

    on = run_scenario(sc, vendor, until=probe.until)
    assert on.failure is None, on.failure
    assert on.platform is not None
    got = _access(on.platform, probe)
    assert (got is None) == probe.refuses, "the defect lets the access through (or refuses a good one)"
    if probe.stale is not None:
        assert got == probe.stale
    report = check(on.platform, grants=on.grants)
    assert probe.kind in report.kinds(), report.violations
    assert any(probe.says in v.message for v in report.violations if v.kind == probe.kind), report.violations

    off = run_scenario(_without_quirk(sc, probe.quirk), vendor, until=probe.until)
    assert off.failure is None, off.failure
    assert off.platform is not None
    clean = check(off.platform, grants=off.grants)
    assert clean.ok, clean.violations
    got = _access(off.platform, probe)
    if probe.stale is not None:
        assert got is not None and got != probe.stale, "without the quirk the access reaches the new page"
    elif probe.refuses:
        assert got is not None, "without the quirk the device reaches its own page"
    else:
        assert got is None, "without the quirk the access is refused"
    assert check(off.platform, grants=off.grants).ok


@pytest.mark.parametrize("name", sorted(PROBES))
def test_iommusim_check_exits_nonzero_and_names_the_problem(name: str) -> None:
    probe = PROBES[name]
    if _vendor(_scenario(name)) not in INSTALLED:
        pytest.skip("vendor not installed")
    code, out = _cli("check", name)
    assert code == 1, out
    assert f"[{probe.kind}]" in out
    assert probe.says in out
    code, out = _cli("run", name)
    assert code == 0, out  # the scenario itself expects the violation


# -- VT-d: a flush error on one unit overwritten by a later unit's success (fixed by e7059776f9) -------------


def _vtd_two_units(quirks: frozenset[str]) -> tuple[Platform, VtdUnit]:
    """A guest with a device behind each of two VT-d units, both caching d1's page 0x101; the NIC's unit hung."""
    devices = [PciDevice(Sbdf.parse(NIC)), PciDevice(Sbdf.parse(DISK))]
    p = build_platform(
        HardwareSpec("vtd", ram_bytes=256 << 20, units=2), config=IommuConfig(quirks=quirks), devices=devices
    )
    p.create_hardware_domain(32 << 20)
    g = p.create_guest(1, 16 << 20)
    for name in (NIC, DISK):
        p.iommu.assign_device(g, name)
    nic_route, disk_route = (p.machine.dma.route_of(p.device(n)) for n in (NIC, DISK))
    assert nic_route is not None and disk_route is not None
    assert nic_route.unit is not disk_route.unit, "the two devices sit behind different units"
    for name in (NIC, DISK):
        p.machine.dma.read(p.device(name), Daddr(0x101 << 12), 8)  # both IOTLBs cache dfn 0x101
    hung = nic_route.unit
    assert isinstance(hung, VtdUnit)
    order = sorted(p.units, key=lambda u: u.name)
    assert order.index(hung) < order.index(disk_route.unit), "the hung unit is flushed first, the good one last"
    hung.stall_queue = True  # the hardware stops fetching invalidation descriptors: the driver times out
    return p, hung


def _reads(p: Platform, name: str, dfn: int) -> bool:
    try:
        p.machine.dma.read(p.device(name), Daddr(dfn << 12), 8)
    except DmaFault:
        return False
    return True


@pytest.mark.skipif("vtd" not in INSTALLED, reason="VT-d is not installed")
def test_vtd_flush_error_overwritten_is_a_silent_stale_window() -> None:
    p, hung = _vtd_two_units(frozenset({"vtd-flush-rc-overwritten"}))
    g = p.machine.domain(1)
    p.guest_unmap(g, Gfn(0x101))  # no error comes back: the good unit's success overwrote the time-out
    assert not g.crashed
    assert p.machine.console.grep("queued invalidation timed out"), "the unit did time out"
    assert _reads(p, NIC, 0x101), "the NIC still reaches the page through its unit's stale IOTLB"
    assert not _reads(p, DISK, 0x101), "the other unit was flushed"
    report = check(p)
    assert report.kinds() == {"stale-tlb"}, report.violations
    (v,) = report.violations
    assert v.unit == hung.name and "dfn 0x101" in v.message and "no flush is outstanding" in v.message


@pytest.mark.skipif("vtd" not in INSTALLED, reason="VT-d is not installed")
def test_vtd_flush_error_reported_without_the_quirk() -> None:
    p, hung = _vtd_two_units(frozenset())
    g = p.machine.domain(1)
    with pytest.raises(TimedOut):
        p.guest_unmap(g, Gfn(0x101))
    assert g.crashed, "Xen crashes a domain whose flush failed"
    assert _reads(p, NIC, 0x101)  # the same stale entry as with the quirk, but now it is a reported one:
    report = check(p)
    assert report.ok, report.violations
    assert [(s.unit, s.dfn) for s in report.stale] == [(hung.name, 0x101)]
    hung.stall_queue = False  # the unit recovers; a flush that works closes the window
    p.iommu.iotlb_flush(g, Dfn(0x101), 1)
    assert not _reads(p, NIC, 0x101)
    after = check(p)
    assert after.ok and not after.stale


# -- AMD: a full command ring silently drops the flush (XSA-373) ---------------------------------------------


def _amd_stopped_ring(quirks: frozenset[str]) -> tuple[Platform, AmdIommu]:
    devices = [PciDevice(Sbdf.parse(NIC)), PciDevice(Sbdf.parse(DISK))]
    spec = HardwareSpec("amd", ram_bytes=256 << 20, extra={"cmd_entries": 256})
    p = build_platform(spec, config=IommuConfig(quirks=quirks), devices=devices)
    p.create_hardware_domain(32 << 20)
    g = p.create_guest(1, 16 << 20)
    p.iommu.assign_device(g, NIC)
    unit = p.units[0]
    assert isinstance(unit, AmdIommu)
    # the command processor stops (as a hung or busy unit would): the ring fills up
    unit.mmio.write(amd_regs.CONTROL, unit.mmio.read(amd_regs.CONTROL) & ~amd_regs.CTRL_CMD_BUF_EN)
    return p, unit


def _fill_ring_then_remap(p: Platform) -> None:
    """Cache page 0x101 in the IOTLB, then fill the stopped ring with the flushes of 130 remaps of page 0x200."""
    g = p.machine.domain(1)
    p.machine.dma.read(p.device(NIC), Daddr(0x101 << 12), 8)  # cached while the page is d1's frame 0x101
    first = g.extents[0].mfn.value
    for i in range(130):  # each remap of a present page queues an invalidation and a completion wait
        p.iommu.map_page(g, Dfn(0x200), Mfn(first + 0x300 + i), Perm.RW)


@pytest.mark.skipif("amd" not in INSTALLED, reason="AMD-Vi is not installed")
def test_amd_cmd_ring_drop_loses_the_flush() -> None:
    p, unit = _amd_stopped_ring(frozenset({"amd-cmd-ring-drop"}))
    g = p.machine.domain(1)
    _fill_ring_then_remap(p)
    p.guest_unmap(g, Gfn(0x101))  # its flush finds the ring full and is dropped without a word
    assert not g.crashed
    unit.mmio.write(amd_regs.CONTROL, unit.mmio.read(amd_regs.CONTROL) | amd_regs.CTRL_CMD_BUF_EN)
    assert _reads(p, NIC, 0x101), "the IOTLB still translates the page that was unmapped"
    report = check(p)
    assert "stale-tlb" in report.kinds(), report.violations
    assert any("dfn 0x101" in v.message and "no flush is outstanding" in v.message for v in report.violations)


@pytest.mark.skipif("amd" not in INSTALLED, reason="AMD-Vi is not installed")
def test_amd_full_ring_times_out_without_the_quirk() -> None:
    p, _unit = _amd_stopped_ring(frozenset())
    with pytest.raises(TimedOut):
        _fill_ring_then_remap(p)
    assert p.machine.console.grep("command ring full")
    assert p.machine.domain(1).crashed, "the time-out is an error Xen acts on, not a lost flush"


# -- a bug the unity-range scenario found in the checker -------------------------------------------------------


@pytest.mark.skipif("amd" not in INSTALLED, reason="AMD-Vi is not installed")
def test_check_allows_a_reserved_region_beyond_ram() -> None:
    """Regression: the check clipped a device's reserved range to RAM and called the rest an escape."""
    sc = _without_quirk(_scenario("quirk-amd-unity-map-seed"), "amd-unity-map-seed")
    res = run_scenario(sc, "amd", until=1)  # the NIC reads its IVMD range, which lies beyond 256 MiB of RAM
    assert res.failure is None and res.platform is not None
    assert res.platform.machine.pages.frames <= 0x3E000
    report = check(res.platform)
    assert report.ok, report.violations
    res.platform.iommu.deassign_device(res.platform.machine.domain(1), NIC)
    assert check(res.platform).ok  # gone with the NIC (without the quirk)
    res.platform.iommu.map_page(res.platform.machine.domain(1), Dfn(0x3E001), Mfn(0x3E001), Perm.R)
    late = check(res.platform)  # the disk may not reach the NIC's range: still an escape
    assert [v.kind for v in late.violations] == ["escape"] and "mfn 0x3e001" in late.violations[0].message
