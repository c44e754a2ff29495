"""The SMMU driver and hardware together, every operation observed through device DMA."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smmu_helpers import DEV_A, DEV_B, driver_of, guest_with, make_platform, mfn_of, page_addr, unit_of

from iommusim.drivers.smmu import NoSpace
from iommusim.errors import (
    AlreadyExists,
    DmaFault,
    HypervisorBug,
    InvalidArgument,
    IommuError,
    NoDevice,
    NoSuchDeviceOrAddress,
    NoSuchDomain,
    NotPermitted,
    OutOfMemory,
)
from iommusim.frames import Daddr, Dfn, Gfn, Mfn
from iommusim.hw.smmu import SmmuFaultRecord, regs
from iommusim.machine import PciDevice, Sbdf
from iommusim.machine.p2m import P2mType
from iommusim.perms import FlushFlags, Perm


def _fault(exc: pytest.ExceptionInfo[DmaFault]) -> SmmuFaultRecord:
    rec = exc.value.record
    assert isinstance(rec, SmmuFaultRecord)
    return rec


# -- the CPU's p2m change and the SMMU's view -------------------------------------------------------------


def test_p2m_change_seen_by_dma_exactly_after_the_flush() -> None:
    p = make_platform()
    g = guest_with(p, DEV_A)
    m, dev = p.machine, p.device(DEV_A)
    old, new = mfn_of(g, 0x10), mfn_of(g, 0x20)
    m.memory.write_bytes(old << 12, b"old page")
    m.memory.write_bytes(new << 12, b"new page")
    assert m.dma.read(dev, page_addr(0x10), 8) == b"old page"  # the SMMU now caches gfn 0x10
    syncs = unit_of(p).counters()["tlb_syncs"]
    # the CPU remaps gfn 0x10 without the IOMMU flush: the device still reaches the old page
    p.guest_map(g, Gfn(0x10), Mfn(new), flush=False)
    assert g.p2m is not None
    assert g.p2m.lookup(Gfn(0x10)).mfn == Mfn(new)  # type: ignore[union-attr]
    assert m.dma.read(dev, page_addr(0x10), 8) == b"old page"
    assert unit_of(p).counters()["tlb_syncs"] == syncs
    # the flush Xen issues (a TLBIVMID for the guest's context, then a sync) makes the change visible
    p.iommu.iotlb_flush(g, Dfn(0x10), 1)
    assert m.dma.read(dev, page_addr(0x10), 8) == b"new page"
    assert unit_of(p).counters()["tlb_syncs"] == syncs + 1
    # with the p2m's own flush the change is visible at once
    p.guest_map(g, Gfn(0x10), Mfn(old))
    assert m.dma.read(dev, page_addr(0x10), 8) == b"old page"


def test_unmap_is_stale_until_flushed_then_faults() -> None:
    p = make_platform()
    g = guest_with(p, DEV_A)
    m, dev = p.machine, p.device(DEV_A)
    m.dma.write(dev, page_addr(0x30), b"dma")
    p.guest_unmap(g, Gfn(0x30), flush=False)
    assert m.dma.read(dev, page_addr(0x30), 3) == b"dma"  # stale, still usable
    p.iommu.iotlb_flush(g, Dfn(0x30), 1)
    with pytest.raises(DmaFault) as exc:
        m.dma.read(dev, page_addr(0x30), 3)
    assert _fault(exc).kind == "translation"


def test_a_batch_is_flushed_once_by_its_caller() -> None:
    p = make_platform()
    g = guest_with(p, DEV_A)
    m, dev = p.machine, p.device(DEV_A)
    for gfn in (0x40, 0x41):
        m.dma.read(dev, page_addr(gfn), 1)
    target = mfn_of(g, 0x50)
    m.memory.write_bytes(target << 12, b"T")
    with p.iommu.dont_flush():
        for gfn in (0x40, 0x41):
            p.guest_map(g, Gfn(gfn), Mfn(target))
        assert m.dma.read(dev, page_addr(0x41), 1) != b"T"
    assert g.p2m.counters["iommu_flush_deferred"] == 2  # type: ignore[union-attr]
    p.iommu.iotlb_flush(g, Dfn(0x40), 2)
    assert m.dma.read(dev, page_addr(0x40), 1) == b"T"
    assert m.dma.read(dev, page_addr(0x41), 1) == b"T"


def test_quirk_reproduces_the_never_flushed_regression() -> None:
    p = make_platform(quirks=("arm-p2m-no-smmu-flush",))
    g = guest_with(p, DEV_A)
    m, dev = p.machine, p.device(DEV_A)
    old, new = mfn_of(g, 0x10), mfn_of(g, 0x20)
    m.memory.write_bytes(old << 12, b"O")
    m.memory.write_bytes(new << 12, b"N")
    assert m.dma.read(dev, page_addr(0x10), 1) == b"O"
    # the p2m tests need_iommu_pt_sync, false with shared tables: even a flushing change stays stale
    p.guest_map(g, Gfn(0x10), Mfn(new), flush=True)
    assert m.dma.read(dev, page_addr(0x10), 1) == b"O"
    assert g.p2m.counters["iommu_flush"] == 0  # type: ignore[union-attr]
    # the driver's flush itself works: an explicit one repairs the view
    p.iommu.iotlb_flush(g, Dfn(0x10), 1)
    assert m.dma.read(dev, page_addr(0x10), 1) == b"N"


def test_domain_without_devices_needs_no_smmu_flush() -> None:
    p = make_platform()
    p.create_hardware_domain(32 << 20)
    g = p.create_guest(1, 8 << 20)
    p.guest_map(g, Gfn(0x10), Mfn(mfn_of(g, 0x20)))
    assert g.p2m.counters["iommu_flush"] == 0  # type: ignore[union-attr]
    assert unit_of(p).counters().get("tlbi_vmid_accepted", 0) == 0


# -- direct-mapped map/unmap through the generic layer ------------------------------------------------------


def test_hwdom_devices_see_the_direct_map() -> None:
    p = make_platform(dom0_devices=[DEV_B])
    d0 = p.create_hardware_domain(64 << 20)
    m, dev = p.machine, p.device(DEV_B)
    frame = d0.extents[0].mfn.value + 5
    m.memory.write_bytes(frame << 12, b"dom0")
    # gfn == mfn: the device's DMA address is the machine address
    assert m.dma.read(dev, Daddr(frame << 12), 4) == b"dom0"
    assert driver_of(p).attached_context(dev).domain is d0  # type: ignore[union-attr]


def test_direct_mapped_map_and_unmap() -> None:
    p = make_platform(dom0_devices=[DEV_B])
    d0 = p.create_hardware_domain(64 << 20)
    g = p.create_guest(1, 8 << 20)
    m, dev = p.machine, p.device(DEV_B)
    foreign = mfn_of(g, 3)  # a guest page granted to dom0: mapped 1:1 at its machine frame
    m.memory.write_bytes(foreign << 12, b"grant")
    with pytest.raises(DmaFault):
        m.dma.read(dev, Daddr(foreign << 12), 5)
    flags = p.iommu.map_page(d0, Dfn(foreign), Mfn(foreign), Perm.R)
    assert flags == FlushFlags.ADDED
    assert d0.p2m.lookup(Gfn(foreign)).type == P2mType.IOMMU_MAP_RO  # type: ignore[union-attr]
    assert m.dma.read(dev, Daddr(foreign << 12), 5) == b"grant"
    with pytest.raises(DmaFault) as exc:
        m.dma.write(dev, Daddr(foreign << 12), b"x")
    assert _fault(exc).kind == "permission"
    # upgrade to read-write: a valid entry replaced (ADDED | MODIFIED), flushed by the p2m's hook
    assert p.iommu.map_page(d0, Dfn(foreign), Mfn(foreign), Perm.RW) == FlushFlags.ADDED | FlushFlags.MODIFIED
    m.dma.write(dev, Daddr(foreign << 12), b"G")
    assert m.memory.read_bytes(foreign << 12, 5) == b"Grant"
    assert p.iommu.unmap_page(d0, Dfn(foreign)) == FlushFlags.MODIFIED
    with pytest.raises(DmaFault):
        m.dma.read(dev, Daddr(foreign << 12), 1)
    # the range form batches and flushes once at the end with the flags it gathered
    syncs = unit_of(p).counters()["tlb_syncs"]
    assert p.iommu.map(d0, Dfn(foreign), Mfn(foreign), 2, Perm.RW) == FlushFlags.ADDED
    assert unit_of(p).counters()["tlb_syncs"] == syncs + 1
    assert m.dma.read(dev, Daddr((foreign + 1) << 12), 1) is not None
    assert not d0.crashed


def test_refused_map_requests() -> None:
    p = make_platform(dom0_devices=[DEV_B])
    d0 = p.create_hardware_domain(64 << 20)
    g = guest_with(p, DEV_A)
    m = p.machine
    frame = mfn_of(g, 2)
    view = m.dma.read(p.device(DEV_A), page_addr(2), 16)
    # a domain that is not direct-mapped: Xen BUGs
    with pytest.raises(HypervisorBug):
        p.iommu.map_page(g, Dfn(2), Mfn(2), Perm.RW)
    # mfn != dfn: Xen BUGs
    with pytest.raises(HypervisorBug):
        p.iommu.map_page(d0, Dfn(frame), Mfn(frame + 1), Perm.R)
    # neither read nor write: EINVAL; the hardware domain is exempt from the crash, the error is logged
    with pytest.raises(InvalidArgument) as exc:
        p.iommu.map_page(d0, Dfn(frame), Mfn(frame), Perm.NONE)
    assert exc.value.rc == -22
    assert not d0.crashed
    assert m.console.grep(f"IOMMU map of dfn {frame:x}")
    with pytest.raises(DmaFault):
        m.dma.read(p.device(DEV_B), Daddr(frame << 12), 1)
    # unmap on a domain that is not direct-mapped: EINVAL, and the generic layer crashes the guest
    with pytest.raises(InvalidArgument):
        p.iommu.unmap_page(g, Dfn(2))
    assert g.crashed
    assert m.dma.read(p.device(DEV_A), page_addr(2), 16) == view


def test_map_page_allocation_failure_at_each_point() -> None:
    p = make_platform(dom0_devices=[DEV_B])
    d0 = p.create_hardware_domain(64 << 20)
    m, dev = p.machine, p.device(DEV_B)
    far = 0x3FFFF  # a frame in the first GiB, far from dom0's RAM: new level-2... and level-1 tables
    mine = d0.extents[0].mfn.value + 1
    m.memory.write_bytes(mine << 12, b"mine")
    in_use = dict(m.allocator.in_use)
    leaves = d0.p2m.leaves()  # type: ignore[union-attr]
    failures = 0
    for nth in range(1, 6):
        m.allocator.fail_nth(nth)
        try:
            p.iommu.map_page(d0, Dfn(far), Mfn(far), Perm.RW)
        except IommuError:
            failures += 1
            assert dict(m.allocator.in_use) == in_use
            assert d0.p2m.leaves() == leaves  # type: ignore[union-attr]
            assert m.dma.read(dev, Daddr(mine << 12), 4) == b"mine"
            with pytest.raises(DmaFault):
                m.dma.read(dev, Daddr(far << 12), 1)
            continue
        finally:
            m.allocator.clear_failures()
        break
    assert failures >= 1
    m.dma.write(dev, Daddr(far << 12), b"ok")
    assert m.memory.read_bytes(far << 12, 2) == b"ok"


# -- assignment -------------------------------------------------------------------------------------------


def test_assignment_routes_streams_and_teardown_releases_the_bank() -> None:
    p = make_platform()
    p.create_hardware_domain(32 << 20)
    m, a, b = p.machine, p.device(DEV_A), p.device(DEV_B)
    # passthrough devices reach nothing until assigned (unidentified stream)
    with pytest.raises(DmaFault) as exc:
        m.dma.read(a, page_addr(1), 1)
    assert _fault(exc).kind == "unidentified-stream"
    g = p.create_guest(1, 8 << 20)
    p.iommu.assign_device(g, a)
    p.iommu.assign_device(g, b)
    assert a.owner is g
    assert b.owner is g
    ctxs = driver_of(p).contexts(g)
    assert len(ctxs) == 1
    assert (ctxs[0].cbndx, ctxs[0].vmid, ctxs[0].ref) == (0, 1, 2)
    m.memory.write_bytes(mfn_of(g, 1) << 12, b"g")
    assert m.dma.read(a, page_addr(1), 1) == b"g"
    assert m.dma.read(b, page_addr(1), 1) == b"g"
    # detach one device (device-tree style, no target): its stream faults again, the other still works
    p.ops.reassign_device(g, None, a.sbdf.devfn, a)
    assert a.owner is None
    with pytest.raises(DmaFault):
        m.dma.read(a, page_addr(1), 1)
    assert m.dma.read(b, page_addr(1), 1) == b"g"
    # the last device leaving frees the bank: the next domain gets bank 0 again
    p.ops.reassign_device(g, None, b.sbdf.devfn, b)
    assert driver_of(p).contexts(g) == []
    assert driver_of(p).smmus[0].context_map == set()
    g2 = p.create_guest(2, 8 << 20)
    a.owner = p.machine.hardware_domain
    p.iommu.assign_device(g2, a)
    assert driver_of(p).contexts(g2)[0].cbndx == 0
    m.memory.write_bytes(mfn_of(g2, 1) << 12, b"2")
    assert m.dma.read(a, page_addr(1), 1) == b"2"


def test_deassign_gives_the_device_back_to_the_hardware_domain() -> None:
    p = make_platform()
    d0 = p.create_hardware_domain(32 << 20)
    g = guest_with(p, DEV_A)
    dev = p.device(DEV_A)
    p.iommu.deassign_device(g, dev)
    # Xen's PCI path reassigns to the hardware domain: the stream now translates through dom0's p2m
    assert dev.owner is d0
    frame = d0.extents[0].mfn.value
    p.machine.memory.write_bytes(frame << 12, b"d0")
    assert p.machine.dma.read(dev, Daddr(frame << 12), 2) == b"d0"
    # ... which is why a later assignment of the same device is refused: it is attached to dom0
    g2 = p.create_guest(2, 8 << 20)
    with pytest.raises(AlreadyExists):
        p.iommu.assign_device(g2, dev)
    assert dev.owner is d0


def test_assignment_errors() -> None:
    p = make_platform(dom0_devices=[DEV_B])
    d0 = p.create_hardware_domain(32 << 20)
    g = p.create_guest(1, 8 << 20)
    drv = driver_of(p)
    a, b = p.device(DEV_A), p.device(DEV_B)
    # EEXIST: a device already behind dom0's context
    with pytest.raises(AlreadyExists):
        p.iommu.assign_device(g, b)
    # ENODEV: a device no SMMU serves (not in any "mmu-masters")
    stray = p.machine.add_pci_device(PciDevice(Sbdf.parse("0000:09:00.0")), owner=d0)
    with pytest.raises(NoDevice):
        p.iommu.assign_device(g, stray)
    # ESRCH: deassigning a device that is not attached to that domain
    with pytest.raises(NoSuchDomain):
        p.ops.reassign_device(g, d0, a.sbdf.devfn, a)
    # EPERM: only the hardware domain may receive a device back
    p.iommu.assign_device(g, a)
    g2 = p.create_guest(2, 8 << 20)
    with pytest.raises(NotPermitted):
        p.ops.reassign_device(g, g2, a.sbdf.devfn, a)
    assert a.owner is g
    # the hardware-domain check comes first (EPERM even to itself); the hardware domain to itself is a no-op
    with pytest.raises(NotPermitted):
        p.ops.reassign_device(g, g, a.sbdf.devfn, a)
    p.ops.reassign_device(d0, d0, b.sbdf.devfn, b)
    assert b.owner is d0
    assert drv.attached_context(b) is not None
    # ENXIO: attaching a device no SMMU serves
    ctx = drv.contexts(g)[0]
    with pytest.raises(NoSuchDeviceOrAddress):
        drv.attach_dev(ctx, stray)


def test_context_banks_and_smrs_run_out() -> None:
    p = make_platform(
        DEV_A,
        DEV_B,
        PciDevice(Sbdf.parse("0000:05:00.0"), stream_ids=(0x500, 0x501)),
        context_banks=1,
        stream_match_registers=2,
    )
    p.create_hardware_domain(32 << 20)
    g1 = guest_with(p, DEV_A, domid=1)
    g2 = p.create_guest(2, 8 << 20)
    in_use = dict(p.machine.allocator.in_use)
    with pytest.raises(NoSpace) as exc:
        p.iommu.assign_device(g2, p.device(DEV_B))
    assert exc.value.errno == 28
    # the context allocated for the attempt is gone; the generic layer also tore down g2's IOMMU state
    assert dict(p.machine.allocator.in_use) == {k: v for k, v in in_use.items() if k != "d2:smmu-domain"}
    # one SMR left, the device with two stream ids needs two: ENOSPC, and the bank stays as it was
    with pytest.raises(NoSpace):
        p.iommu.assign_device(g1, p.device("0000:05:00.0"))
    assert driver_of(p).contexts(g1)[0].ref == 1
    p.machine.memory.write_bytes(mfn_of(g1, 1) << 12, b"1")
    assert p.machine.dma.read(p.device(DEV_A), page_addr(1), 1) == b"1"


def test_assignment_allocation_failure_at_each_point() -> None:
    p = make_platform()
    p.create_hardware_domain(32 << 20)
    g = p.create_guest(1, 8 << 20)
    m, dev = p.machine, p.device(DEV_A)
    d0 = m.hardware_domain
    failures = 0
    for nth in range(1, 8):
        # the generic layer tears a guest's IOMMU state down when its first assignment fails, so the
        # per-domain structure goes too (and is allocated again by the next attempt)
        expected = {k: v for k, v in m.allocator.in_use.items() if k != "d1:smmu-domain"}
        m.allocator.fail_nth(nth)
        try:
            p.iommu.assign_device(g, dev)
        except OutOfMemory:
            failures += 1
            assert dict(m.allocator.in_use) == expected
            assert dev.owner is d0
            assert driver_of(p).attached_context(dev) is None
            with pytest.raises(DmaFault):
                m.dma.read(dev, page_addr(1), 1)
            continue
        finally:
            m.allocator.clear_failures()
        break
    # allocations: the context, then the master's SMR array; after a teardown also the per-domain structure
    assert failures == 3
    m.memory.write_bytes(mfn_of(g, 1) << 12, b"!")
    assert m.dma.read(dev, page_addr(1), 1) == b"!"
    # and everything goes away with the guest
    p.destroy(g)
    assert m.allocator.owned("d1:") == 0


_STEPS = st.lists(
    st.tuples(
        st.sampled_from(["map", "map_block", "unmap", "unmap_block", "read", "read", "write"]),
        st.integers(0, 1),  # 2 MiB slot of the guest's IPA space
        st.sampled_from([0, 1, 2, 511]),  # page within the slot (few, so that steps meet on the same page)
        st.integers(0, 15),  # which of the guest's own 2 MiB of memory to map there
    ),
    min_size=6,
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(steps=_STEPS)
def test_dma_always_sees_the_current_p2m_when_xen_flushes(steps: list[tuple[str, int, int, int]]) -> None:
    """With Xen's flushes, no device ever reaches memory its domain's p2m does not map there (now)."""
    p = make_platform(iotlb_entries=8)
    g = guest_with(p, DEV_A, memory=32 << 20)
    m, dev = p.machine, p.device(DEV_A)
    base = g.extents[0].mfn.value
    aligned = (base + 511) & ~511
    for step, (op, slot, page, src) in enumerate(steps):
        gfn = 0x4000 + slot * 512 + page
        marker = (step << 32 | gfn).to_bytes(8, "little")  # unique per step: stale data cannot match
        if op == "map":
            p.guest_map(g, Gfn(gfn), Mfn(base + src * 512 + page))
        elif op == "map_block":
            p.guest_map(g, Gfn(0x4000 + slot * 512), Mfn(aligned + (src % 14) * 512), order=9)
        elif op == "unmap":
            p.guest_unmap(g, Gfn(gfn))
        elif op == "unmap_block":
            p.guest_unmap(g, Gfn(0x4000 + slot * 512), order=9)
        else:
            assert g.p2m is not None
            entry = g.p2m.lookup(Gfn(gfn))
            if entry is None:
                with pytest.raises(DmaFault):
                    m.dma.read(dev, page_addr(gfn), 8)
                dev.fault_count = 0  # expected faults must not switch the device's bus mastering off
            elif op == "write":
                m.dma.write(dev, page_addr(gfn) + 8, marker)
                assert m.memory.read_bytes((entry.mfn.value << 12) + 8, 8) == marker
            else:
                m.memory.write_bytes(entry.mfn.value << 12, marker)
                assert m.dma.read(dev, page_addr(gfn), 8) == marker


def test_invalidations_complete_only_at_a_sync_and_the_tlb_is_lru() -> None:
    p = make_platform(iotlb_entries=2)
    g = guest_with(p, DEV_A)
    m, dev, unit = p.machine, p.device(DEV_A), unit_of(p)
    old, new = mfn_of(g, 0x10), mfn_of(g, 0x20)
    m.memory.write_bytes(old << 12, b"o")
    m.memory.write_bytes(new << 12, b"n")
    assert m.dma.read(dev, page_addr(0x10), 1) == b"o"
    p.guest_map(g, Gfn(0x10), Mfn(new), flush=False)
    # a TLBIVMID for the guest's VMID (bank 0 + 1) is only accepted...
    unit.mmio.write(regs.GR0_TLBIVMID, 1)
    assert m.dma.read(dev, page_addr(0x10), 1) == b"o"
    # ... and completed by the sync
    unit.mmio.write(regs.GR0_STLBGSYNC, 0)
    assert unit.mmio.read(regs.GR0_STLBGSTATUS) == regs.STLBGSTATUS_GSACTIVE  # one poll still active
    assert unit.mmio.read(regs.GR0_STLBGSTATUS) == 0
    assert m.dma.read(dev, page_addr(0x10), 1) == b"n"
    # TLBIALLNSNH drops every VMID's entries, again at the sync
    p.guest_map(g, Gfn(0x10), Mfn(old), flush=False)
    unit.mmio.write(regs.GR0_TLBIALLNSNH, 0)
    assert m.dma.read(dev, page_addr(0x10), 1) == b"n"
    unit.mmio.write(regs.GR0_STLBGSYNC, 0)
    assert m.dma.read(dev, page_addr(0x10), 1) == b"o"
    # two entries: a third translation evicts the least recently used one
    evictions = unit.counters().get("iotlb_evictions", 0)
    for gfn in (0x11, 0x12):
        m.dma.read(dev, page_addr(gfn), 1)
    assert unit.counters()["iotlb_evictions"] == evictions + 1
    walks = unit.counters()["walks"]
    m.dma.read(dev, page_addr(0x10), 1)  # 0x10 was the least recently used: walked again
    assert unit.counters()["walks"] == walks + 1
