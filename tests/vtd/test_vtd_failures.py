"""Allocation failure at every point of map, assignment and unit set-up: nothing leaks, nothing half-made."""

from __future__ import annotations

import pytest
from vtd_helpers import NIC, boot, gmfn, guest_with, lands_at, make, unit

from iommusim.errors import NoSuchEntry, OutOfMemory
from iommusim.frames import Dfn, Mfn
from iommusim.hw.vtd.regs import GSTS, Reg
from iommusim.iommu.config import IommuConfig
from iommusim.perms import Perm


def test_map_page_failure_at_each_table_allocation() -> None:
    p = make()
    boot(p)
    g = guest_with(p)
    alloc = p.machine.allocator
    far = Dfn(0x12_3456_789)  # a region with no tables yet: three levels to allocate
    failures = 0
    for n in range(1, 6):
        before = dict(alloc.in_use)
        alloc.fail_nth(n)
        try:
            p.ops.map_page(g, far, Mfn(gmfn(g, 1)), Perm.RW)
        except OutOfMemory:
            failures += 1
            assert dict(alloc.in_use) == before
            with pytest.raises(NoSuchEntry):
                p.ops.lookup_page(g, far)
            assert lands_at(p, NIC, 0x2 << 12) == gmfn(g, 2) << 12  # existing mappings intact
        else:
            alloc.clear_failures()
            assert lands_at(p, NIC, far.value << 12) == gmfn(g, 1) << 12
            break
        finally:
            alloc.clear_failures()
    assert failures == 3


def test_split_failure_leaves_the_superpage() -> None:
    p = make(ram=3 << 30)
    boot(p)
    g = p.create_guest(1, 0)
    p.machine.populate(g, 1 << 18, align_order=18)
    p.iommu.assign_device(g, NIC)
    sid = p.device(NIC).sbdf.bdf
    alloc = p.machine.allocator
    before = dict(alloc.in_use)
    for n in (1, 2):  # the 1 GiB leaf splits into 2 MiB leaves, then one of those into 4 KiB leaves
        alloc.fail_nth(n)
        with pytest.raises(OutOfMemory):
            p.ops.unmap_page(g, Dfn(0x1234))
        alloc.fail_nth(n)
        with pytest.raises(OutOfMemory):
            p.ops.map_range(g, Dfn(0x1000), Mfn(gmfn(g, 0)), 1, Perm.R)
    alloc.clear_failures()
    assert dict(alloc.in_use) == before
    assert unit(p).translate(sid, 0x1234 << 12, Perm.W).page_shift == 30
    assert lands_at(p, NIC, 0x1234 << 12) == gmfn(g, 0x1234) << 12


def test_assignment_failure_at_each_allocation() -> None:
    p = make()
    hw = boot(p)
    alloc = p.machine.allocator
    for n in range(1, 40):
        g = p.create_guest(1, 8 << 20)
        before = dict(alloc.in_use)
        alloc.fail_nth(n)
        try:
            p.iommu.assign_device(g, NIC)
        except OutOfMemory:
            alloc.clear_failures()
            assert dict(alloc.in_use) == before
            assert p.device(NIC).owner is hw
            assert lands_at(p, NIC, 0x42 << 12) == 0x42 << 12  # still the hardware domain's 1:1 view
            p.destroy(g)
            continue
        alloc.clear_failures()
        assert lands_at(p, NIC, 0x42 << 12) == gmfn(g, 0x42) << 12
        assert n > 1
        break
    else:
        pytest.fail("assignment never succeeded")


def test_context_table_allocation_failure_is_undone() -> None:
    from iommusim.machine.pci import PciDevice, PciDevType, Sbdf

    devices = [PciDevice(Sbdf.parse(NIC)), PciDevice(Sbdf.parse("0000:09:00.0"), PciDevType.PCIE_ENDPOINT)]
    p = make(devices=devices)
    boot(p)
    alloc = p.machine.allocator
    p.iommu.remove_device("0000:09:00.0")
    u = p.ops.units[0]  # type: ignore[attr-defined]
    # the context table of bus 9 exists from hwdom_init; drop it to force a new allocation
    table = u.context_tables.pop(9)
    p.machine.memory.write_u64((u.root.value << 12) + 16 * 9, 0)
    alloc.free(table)
    before = dict(alloc.in_use)
    alloc.fail_nth(1, owner_prefix="vtd0:ctx")
    with pytest.raises(OutOfMemory):
        p.ops.add_device(0, p.device("0000:09:00.0"))
    alloc.clear_failures()
    assert dict(alloc.in_use) == before
    assert 9 not in u.context_tables
    assert p.machine.memory.read_u64((u.root.value << 12) + 16 * 9) == 0


def test_queue_setup_failure_leaks_nothing_and_programs_nothing() -> None:
    p = make(config=IommuConfig(enable=False))
    alloc = p.machine.allocator
    for n in (1, 2, 3):
        before = dict(alloc.in_use)
        p.iommu.config = IommuConfig()
        alloc.fail_nth(n)
        p.iommu.setup()
        alloc.clear_failures()
        assert not p.iommu.enabled
        assert isinstance(p.iommu.setup_error, OutOfMemory)
        assert dict(alloc.in_use) == before
        assert unit(p).regs.read(Reg.GSTS, 4) == 0  # neither root pointer nor queue was programmed
    p.iommu.config = IommuConfig()
    p.iommu.setup()
    assert p.iommu.enabled
    assert unit(p).regs.read(Reg.GSTS, 4) & GSTS.QIES
    assert alloc.owned("vtd0:qi") == 4 + 1


def test_teardown_frees_every_table_page() -> None:
    p = make(ram=2 << 30)
    boot(p)
    alloc = p.machine.allocator
    baseline = dict(alloc.in_use)
    g = p.create_guest(1, 64 << 20)
    p.iommu.assign_device(g, NIC)
    for i in range(64):
        p.iommu.map_page(g, Dfn(0x40_0000 + 0x1_0000 * i), Mfn(gmfn(g, i)), Perm.RW)
    p.iommu.unmap_page(g, Dfn(0x101))  # splits a superpage
    assert alloc.owned("d1:iommu-pt") > 64
    p.destroy(g)
    assert dict(alloc.in_use) == baseline
    assert p.iommu.pending_frees == 0
