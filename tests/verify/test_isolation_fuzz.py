"""Isolation fuzzing: random DMA from every device while domains and mappings change under it, every vendor.

A Hypothesis state machine builds a machine with a strict hardware domain and three devices (one is never
assigned), then interleaves guest creation, p2m maps (own RAM, read-only RAM, grants of another guest's
pages) and unmaps with and without their flush, flushes, device assignment and deassignment, domain crash
and destroy, with reads and writes at random Dfns from every device.  After each access:

* a successful one must land in a frame the device's owner may reach at that moment: a RAM page it owns
  (writable by devices if a write), a frame its p2m maps at that Dfn as a grant, for the hardware domain
  anything that is not RAM; or the Dfn must lie in a stale window the flush ledger reports for the owner
  (a flush skipped on purpose and not done yet).  The policy is written here again, on purpose, rather
  than taken from ``iommusim.tools.check``, and the check must agree at the end of every run;
* a refused one must be logged the way the vendor's hardware logs it: a VT-d fault record (source id,
  page, read/write) counted by the unit, an AMD IO_PAGE_FAULT event (device id, address, RW flag), an SMMU
  fault record of the context bank or the global fault registers (stream, address, direction).

The default run is bounded (a few seconds per vendor); ``-m slow`` runs many more, longer sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from iommusim.errors import DmaFault, IommuError
from iommusim.frames import Daddr, Dfn, Gfn, Mfn
from iommusim.hw.amd.structs import Event, EventCode, EventFlag
from iommusim.hw.smmu.unit import SmmuFaultRecord
from iommusim.hw.vtd.structs import FaultRecord
from iommusim.iommu.config import IommuConfig
from iommusim.machine import Machine, PciDevice, Sbdf
from iommusim.machine.domain import Domain
from iommusim.machine.p2m import P2mType
from iommusim.machine.pages import E820Type, PageType
from iommusim.perms import Perm
from iommusim.platform import HardwareSpec, Platform, available_vendors, build_platform
from iommusim.tools.check import check

VENDORS = [v for v in ("vtd", "amd", "smmu") if v in available_vendors()]
DEVICES = ("0000:03:00.0", "0000:04:00.0", "0000:05:00.0")
NEVER_ASSIGNED = "0000:05:00.0"
GUESTS = (1, 2, 3)
GUEST_PAGES = 0x400  # 4 MiB each
#: the gfns maps, unmaps and most DMA go to: a few of each guest's own pages and a few beyond its RAM (grants,
#: remaps), so that a device often touches a page again after it changed
HOT_GFNS = (*range(6), *range(GUEST_PAGES, GUEST_PAGES + 6))
TYPES = (P2mType.RAM_RW, P2mType.RAM_RO, P2mType.GRANT_MAP_RW, P2mType.GRANT_MAP_RO)
_GRANTS = {P2mType.GRANT_MAP_RW: True, P2mType.GRANT_MAP_RO: False, P2mType.MAP_FOREIGN: True}


#: one access: device, how its Dfn is picked, a number to pick it with, write or read, offset in the page
ACCESSES = st.tuples(
    st.sampled_from(DEVICES),
    st.sampled_from(("gfn", "gfn", "mfn", "wild")),
    st.integers(0, 0xFFFF),
    st.booleans(),
    st.integers(0, 0xFF8),
)


@dataclass
class Tally:
    """What one vendor's runs did, to show the fuzzing exercised both outcomes."""

    allowed: int = 0  # accesses that landed where the policy allows
    stale: int = 0  # accesses that landed elsewhere, through a stale window the ledger reports
    in_window: int = 0  # accesses at a Dfn inside a reported window (wherever they landed)
    faults: int = 0
    ops: dict[str, int] = field(default_factory=dict)


TALLIES: dict[str, Tally] = {}


def _fault_count(p: Platform) -> int:
    """How many refusals the units say they logged (or deliberately did not: suppressed, overflowed)."""
    total = 0
    for unit in p.units:
        c = unit.counters()
        if p.vendor == "smmu":
            total += sum(n for k, n in c.items() if k.startswith("fault_"))
        else:
            total += c.get("faults", 0)
    return total


class IsolationMachine(RuleBasedStateMachine):
    """One machine of ``vendor`` with a strict hardware domain, up to three guests and three devices."""

    vendor = "vtd"
    quirks: frozenset[str] = frozenset()

    def __init__(self) -> None:
        super().__init__()
        self.tally = TALLIES.setdefault(self.vendor, Tally())
        devices = [PciDevice(Sbdf.parse(s)) for s in DEVICES]
        self.p = build_platform(
            HardwareSpec(self.vendor, ram_bytes=96 << 20, iotlb_entries=32),
            config=IommuConfig(hwdom_strict=True, quirks=self.quirks),
            devices=devices,
        )
        self.hwdom = self.p.create_hardware_domain(8 << 20)

    # -- helpers ---------------------------------------------------------------------------------------------

    @property
    def m(self) -> Machine:
        return self.p.machine

    def guest(self, domid: int) -> Domain | None:
        d = self.m.domains.get(domid)
        return None if d is None or d.is_hardware else d

    def count(self, op: str) -> None:
        self.tally.ops[op] = self.tally.ops.get(op, 0) + 1

    def frame_of(self, d: Domain, index: int) -> Mfn:
        ext = d.extents[0]
        return ext.mfn + (index % ext.count)

    # -- domains ----------------------------------------------------------------------------------------------

    @initialize(domid=st.sampled_from(GUESTS), both=st.booleans())
    def first_guest(self, domid: int, both: bool) -> None:
        """Every run starts with a guest that has the NIC (and maybe the disk); the third device stays dom0's."""
        self.create(domid)
        for dev in DEVICES[: 2 if both else 1]:
            self.assign(dev, domid)

    @rule(domid=st.sampled_from(GUESTS))
    def create(self, domid: int) -> None:
        if domid in self.m.domains:
            return
        self.p.create_guest(domid, GUEST_PAGES << 12)
        self.count("create")

    @rule(domid=st.sampled_from(GUESTS))
    def crash(self, domid: int) -> None:
        d = self.guest(domid)
        if d is not None:
            d.crash("fuzz")
            self.count("crash")

    @rule(domid=st.sampled_from(GUESTS))
    def destroy(self, domid: int) -> None:
        d = self.guest(domid)
        if d is not None:
            self.p.destroy(d)
            self.count("destroy")

    # -- devices ----------------------------------------------------------------------------------------------

    @rule(dev=st.sampled_from(DEVICES[:2]), domid=st.sampled_from(GUESTS))
    def assign(self, dev: str, domid: int) -> None:
        d = self.guest(domid)
        if d is None:
            return
        try:
            self.p.iommu.assign_device(d, dev)
            self.count("assign")
        except IommuError:
            self.count("assign-refused")

    @rule(dev=st.sampled_from(DEVICES[:2]))
    def deassign(self, dev: str) -> None:
        owner = self.p.device(dev).owner
        if owner is not None and not owner.is_hardware:
            self.p.iommu.deassign_device(owner, dev)
            self.count("deassign")

    # -- mappings ---------------------------------------------------------------------------------------------

    @rule(
        domid=st.sampled_from(GUESTS),
        gfn=st.sampled_from(HOT_GFNS),
        ptype=st.sampled_from(TYPES),
        source=st.sampled_from(GUESTS),
        index=st.integers(0, GUEST_PAGES - 1),
        flush=st.booleans(),
    )
    def map(self, domid: int, gfn: int, ptype: P2mType, source: int, index: int, flush: bool) -> None:
        d = self.guest(domid)
        if d is None or d.is_dying:
            return
        if ptype in _GRANTS:
            granter = self.guest(source)
            if granter is None or granter is d or not granter.extents:
                return
            mfn = self.frame_of(granter, index)
        else:
            mfn = self.frame_of(d, index)  # its own RAM, maybe at another gfn, maybe read-only
        try:
            self.p.guest_map(d, Gfn(gfn), mfn, type=ptype, flush=flush)
            self.count("map" if flush else "map-unflushed")
        except IommuError:
            self.count("map-failed")

    @rule(domid=st.sampled_from(GUESTS), gfn=st.sampled_from(HOT_GFNS), flush=st.booleans())
    def unmap(self, domid: int, gfn: int, flush: bool) -> None:
        d = self.guest(domid)
        if d is None or d.is_dying or d.p2m is None or d.p2m.lookup(Gfn(gfn)) is None:
            return
        self.p.guest_unmap(d, Gfn(gfn), flush=flush)
        self.count("unmap" if flush else "unmap-unflushed")

    @rule(dev=st.sampled_from(DEVICES[:2]), gfn=st.sampled_from(HOT_GFNS), index=st.integers(0, GUEST_PAGES - 1))
    def use_then_change_unflushed(self, dev: str, gfn: int, index: int) -> None:
        """A device uses a page, then its guest unmaps or moves it and skips the flush (a batching caller)."""
        d = self.p.device(dev).owner
        if d is None or d.is_hardware or d.is_dying or d.p2m is None:
            return
        self.access(self.p.device(dev), gfn, 0x20, False)
        if d.p2m.lookup(Gfn(gfn)) is not None and index & 1:
            self.p.guest_unmap(d, Gfn(gfn), flush=False)
        else:
            self.p.guest_map(d, Gfn(gfn), self.frame_of(d, index), type=P2mType.RAM_RW, flush=False)
        self.count("use-then-change")

    @rule(domid=st.sampled_from(GUESTS), everything=st.booleans())
    def flush(self, domid: int, everything: bool) -> None:
        d = self.guest(domid)
        if d is None:
            return
        if everything:
            self.p.iommu.iotlb_flush_all(d)
        else:
            for lo, n in self.p.iommu.ledger.pending(domid)[:1]:
                self.p.iommu.iotlb_flush(d, Dfn(lo), n)
        self.count("flush")

    # -- DMA ----------------------------------------------------------------------------------------------------

    @rule(bursts=st.lists(ACCESSES, min_size=1, max_size=8))
    def dma(self, bursts: list[tuple[str, str, int, bool, int]]) -> None:
        """Reads and writes at Dfns that are some domain's gfn, some domain's machine frame, or anything."""
        doms = sorted(self.m.domains.values(), key=lambda x: x.domid)
        for dev, how, index, write, offset in bursts:
            if how == "gfn":
                dfn = HOT_GFNS[index % len(HOT_GFNS)] if index & 0xF else index % (GUEST_PAGES + 0x20)
            elif how == "mfn":
                pick = doms[index % len(doms)]
                dfn = self.frame_of(pick, index >> 4).value if pick.extents else index
            else:
                dfn = index * 7 % (self.m.pages.frames + 0x100)
            self.access(self.p.device(dev), dfn, offset, write)

    @rule(
        touches=st.lists(
            st.tuples(st.sampled_from(DEVICES[:2]), st.sampled_from(HOT_GFNS), st.booleans()), min_size=1, max_size=6
        )
    )
    def touch(self, touches: list[tuple[str, int, bool]]) -> None:
        """Assigned devices going back to the pages that change most (to fill caches and hit stale windows)."""
        for dev, gfn, write in touches:
            self.access(self.p.device(dev), gfn, 0x10, write)

    def access(self, dev: PciDevice, dfn: int, offset: int, write: bool) -> None:
        owner = dev.owner
        daddr = (dfn << 12) | offset
        before = _fault_count(self.p)
        enabled = dev.bus_master
        refused: DmaFault | None = None
        try:
            if write:
                self.m.dma.write(dev, Daddr(daddr), b"fz")
            else:
                self.m.dma.read(dev, Daddr(daddr), 2)
        except DmaFault as exc:
            refused = exc
        if refused is not None:
            self.tally.faults += 1
            if not enabled:  # Xen turned it off after a burst of faults: the bus aborts, no unit sees it
                assert refused.record is None and _fault_count(self.p) == before, refused
                self.count("bus-master-off")
                return
            self.logged_as_hardware_does(dev, daddr, write, refused)
            assert _fault_count(self.p) == before + 1, "the unit counts the refusal it logged"
            return
        maddr = self.m.dma.translate(
            dev, daddr, Perm.W if write else Perm.R
        )  # the same route, now cached: where it landed
        mfn = maddr >> 12
        in_window = owner is not None and self.p.iommu.ledger.covers(owner.domid, dfn)
        self.tally.in_window += in_window
        if self.may_reach(owner, dfn, mfn, write):
            self.tally.allowed += 1
            return
        assert owner is not None, f"{dev.sbdf} has no owner, yet its DMA reached mfn {mfn:#x}"
        assert in_window, (
            f"{dev.sbdf} ({owner}) {'wrote' if write else 'read'} mfn {mfn:#x} at dfn {dfn:#x}, "
            f"which belongs to d{int(self.m.pages.owner[mfn]) if mfn < self.m.pages.frames else -1}, "
            "and no stale window is reported there"
        )
        self.tally.stale += 1

    def may_reach(self, owner: Domain | None, dfn: int, mfn: int, write: bool) -> bool:
        """The access policy, written out independently of iommusim.tools.check."""
        if owner is None:
            return False
        pages = self.m.pages
        if mfn >= pages.frames or self.m.e820.type_of(mfn) != E820Type.RAM:
            return owner.is_hardware  # MMIO, holes, firmware ranges: the hardware domain's identity map
        if int(pages.owner[mfn]) == owner.domid:
            return not write or int(pages.type_count[mfn]) == 0 or int(pages.ptype[mfn]) == int(PageType.WRITABLE)
        if owner.p2m is not None:
            e = owner.p2m.lookup(Gfn(dfn))
            if e is not None and e.mfn.value == mfn and e.type in _GRANTS:
                return not write or _GRANTS[e.type]
        return False

    def logged_as_hardware_does(self, dev: PciDevice, daddr: int, write: bool, exc: DmaFault) -> None:
        route = self.m.dma.route_of(dev)
        assert route is not None, f"{dev.sbdf} has no IOMMU in front of it, yet it faulted: {exc}"
        rec = exc.record
        if self.vendor == "vtd":
            assert isinstance(rec, FaultRecord), exc
            assert rec.fault and rec.sid == route.source_id and rec.is_read == (not write)
            assert rec.addr >> 12 == daddr >> 12
        elif self.vendor == "amd":
            assert isinstance(rec, Event), exc
            assert rec.code == EventCode.IO_PAGE_FAULT and rec.device_id == route.source_id
            assert rec.address >> 12 == daddr >> 12 and bool(rec.flags & EventFlag.RW) == write
        else:
            assert isinstance(rec, SmmuFaultRecord), exc
            assert (rec.stream_id in dev.sids and rec.context_bank is not None) or rec.stream_id == route.source_id
            assert rec.address >> 12 == daddr >> 12 and rec.write == write

    @invariant()
    def nothing_owned_by_nobody_is_assigned(self) -> None:
        for name in DEVICES:
            owner = self.p.device(name).owner
            assert owner is not None and owner.domid in self.m.domains, f"{name} is owned by a domain that is gone"

    def teardown(self) -> None:
        report = check(self.p)
        assert report.ok, report.violations


def _machine_for(vendor: str, quirks: frozenset[str] = frozenset()) -> type[IsolationMachine]:
    return type(f"Isolation_{vendor}", (IsolationMachine,), {"vendor": vendor, "quirks": quirks})


@pytest.mark.parametrize("vendor", VENDORS)
def test_isolation_fuzz(vendor: str) -> None:
    TALLIES.pop(vendor, None)
    run_state_machine_as_test(
        _machine_for(vendor),
        settings=settings(
            max_examples=25,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    t = TALLIES[vendor]
    assert t.allowed and t.faults, t  # the fuzzing reached memory and was refused, both


@pytest.mark.slow
@pytest.mark.parametrize("vendor", VENDORS)
def test_isolation_fuzz_deep(vendor: str) -> None:
    run_state_machine_as_test(
        _machine_for(vendor),
        settings=settings(
            max_examples=300,
            stateful_step_count=80,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


@pytest.mark.skipif("smmu" not in VENDORS, reason="the SMMU is not installed")
def test_the_fuzzing_finds_a_missing_flush() -> None:
    """The same machine with the SMMU's p2m flush lost (arm-p2m-no-smmu-flush) must be caught."""
    with pytest.raises(AssertionError, match=r"no stale window is reported there|stale-tlb"):
        run_state_machine_as_test(
            _machine_for("smmu", frozenset({"arm-p2m-no-smmu-flush"})),
            settings=settings(
                max_examples=80,
                stateful_step_count=40,
                deadline=None,
                derandomize=True,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )


@pytest.mark.parametrize("vendor", VENDORS)
def test_a_destroyed_domains_windows_are_not_inherited(vendor: str) -> None:
    """Regression: the flush ledger kept a destroyed domain's open windows for the next domain with its id."""
    p = build_platform(
        HardwareSpec(vendor, ram_bytes=96 << 20),
        config=IommuConfig(hwdom_strict=True),
        devices=[PciDevice(Sbdf.parse(DEVICES[0]))],
    )
    p.create_hardware_domain(8 << 20)
    g = p.create_guest(1, GUEST_PAGES << 12)
    p.iommu.assign_device(g, DEVICES[0])
    p.machine.dma.read(p.device(DEVICES[0]), Daddr(0x1000), 2)
    p.guest_unmap(g, Gfn(1), flush=False)
    assert p.iommu.ledger.pending(1) == [(1, 1)]
    p.destroy(g)
    assert p.iommu.ledger.pending(1) == []
    again = p.create_guest(1, GUEST_PAGES << 12)
    assert not p.iommu.ledger.covers(again.domid, 1)
    assert check(p).ok
