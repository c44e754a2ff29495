"""Hardware-domain set-up, table population on first device, device assignment and p2m sync."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from doubles import ToyDriver
from iommusim.errors import Busy, CrossDevice, HypervisorBug, InvalidArgument, NoDevice, OutOfMemory
from iommusim.frames import Gfn, Mfn
from iommusim.iommu import FAULT_THRESHOLD, Iommu, IommuConfig, IommuStatus, check_disable_device
from iommusim.iommu.ops import OPTIONAL_OPS
from iommusim.machine import DomainKind, Machine, P2mType, PageType, PciDevice, Sbdf
from iommusim.perms import Perm

GiB = 1 << 30


def mapped(io: Iommu, d) -> dict[int, tuple[int, Perm]]:  # type: ignore[no-untyped-def]
    out: dict[int, tuple[int, Perm]] = {}
    for run in io.dump_page_tables(d):
        for i in range(run.pages):
            out[run.dfn + i] = (run.mfn + i, run.perms)
    return out


def boot(config: IommuConfig, *, ram: int = 2 * GiB, bulk: bool = True, hwdom_bytes: int = GiB, **kw: object):  # type: ignore[no-untyped-def]
    m = Machine(ram_bytes=ram)
    provided = OPTIONAL_OPS if bulk else OPTIONAL_OPS - {"map_range", "unmap_range"}
    drv = ToyDriver(provided=provided, **kw)  # type: ignore[arg-type]
    io = Iommu(m, drv, config)
    io.setup()
    hw = m.create_domain(0, DomainKind.PV, hardware=True, memory_bytes=hwdom_bytes)
    io.domain_init(hw)
    return m, drv, io, hw


@pytest.mark.parametrize("bulk", [True, False])
def test_strict_hwdom_of_1_gib_with_mixed_page_types(bulk: bool) -> None:
    m, drv, io, hw = boot(IommuConfig(hwdom_strict=True, hwdom_inclusive=False), bulk=bulk)
    base = hw.extents[0].mfn.value
    n = hw.tot_pages
    assert n == GiB >> 12
    pt = m.pages
    pt.set_type(base, PageType.L1_PAGE_TABLE, count=1000)  # validated page tables: read-only
    pt.set_type(base + 1000, PageType.WRITABLE, count=500)
    pt.set_type(base + 1500, PageType.SEG_DESC, count=300)  # typed with a reference: read-only
    pt.set_type(base + 1800, PageType.SEG_DESC, count=200, type_count=0)  # no reference: writable
    pt.set_type(base + 5000, PageType.L4_PAGE_TABLE, count=7)
    pt.m2p[base + 9000 : base + 9010] = 0xFFFF_FFFF_FFFF_FFFF  # pages with no guest frame are skipped
    pt.m2p[base + 20000] = 0x7_0000  # a page the guest moved elsewhere
    seen: list[tuple[int, int]] = []
    io.hwdom_init(hw, progress=lambda done, total: seen.append((done, total)))
    assert hw.iommu.status == IommuStatus.INITIALIZED and hw.iommu.need_sync
    expect: dict[int, tuple[int, Perm]] = {}
    for i in range(n):
        mfn = base + i
        gfn = int(pt.m2p[mfn])
        if gfn == 0xFFFF_FFFF_FFFF_FFFF:
            continue
        ro = i < 1000 or 1500 <= i < 1800 or 5000 <= i < 5007
        expect[gfn] = (mfn, Perm.R if ro else Perm.RW)
    assert mapped(io, hw) == expect
    assert seen and seen[-1] == (n - 10, n - 10)
    assert "hwdom_init" in drv.calls


def test_relaxed_pv_hwdom_maps_ram_and_holes_one_to_one_but_never_xen() -> None:
    m, drv, io, hw = boot(IommuConfig(), ram=512 << 20, hwdom_bytes=64 << 20)
    guest = m.create_domain(1, DomainKind.HVM, memory_bytes=16 << 20)
    xen_page = m.allocator.alloc("xen:heap")
    io.hwdom_init(hw)
    got = mapped(io, hw)
    gmfn = guest.extents[0].mfn.value
    assert got[gmfn] == (gmfn, Perm.RW)  # relaxed: all RAM, even another domain's
    assert xen_page.value not in got  # never the hypervisor's own frames
    assert got[(3 * GiB) >> 12] == ((3 * GiB) >> 12, Perm.RW)  # a hole below 4 GiB (PV, inclusive)
    assert ((5 * GiB) >> 12) not in got
    table_frames = set(m.allocator.frames_of("d0:"))
    assert not table_frames & set(got)  # its own IOMMU tables are Xen's frames too


def test_passthrough_hwdom_maps_nothing() -> None:
    m, drv, io, hw = boot(IommuConfig(hwdom_passthrough=True), ram=512 << 20, hwdom_bytes=64 << 20)
    io.hwdom_init(hw)
    assert mapped(io, hw) == {} and "hwdom_init" in drv.calls


def test_translated_hwdom_needs_the_iommu_and_is_forced_strict() -> None:
    m = Machine(ram_bytes=256 << 20)
    io = Iommu(m, None)
    io.setup()
    hw = m.create_domain(0, DomainKind.HVM, hardware=True, memory_bytes=16 << 20)
    io.domain_init(hw)
    with pytest.raises(HypervisorBug, match="PVH"):
        io.hwdom_init(hw)
    m2, drv, io2, _ = boot(IommuConfig(hwdom_passthrough=True), ram=256 << 20, hwdom_bytes=16 << 20)
    pvh = m2.create_domain(5, DomainKind.HVM, memory_bytes=4 << 20)
    pvh.is_hardware = True
    io2.domain_init(pvh)
    io2.hwdom_init(pvh)
    assert io2.config.hwdom_strict and not io2.config.hwdom_passthrough


def test_hwdom_allocation_failures_are_reported_not_fatal() -> None:
    m, drv, io, hw = boot(IommuConfig(hwdom_strict=True, hwdom_inclusive=False), ram=512 << 20, hwdom_bytes=8 << 20)
    m.allocator.fail_nth(2)
    io.hwdom_init(hw)
    assert m.console.grep("IOMMU mapping failed")
    assert not hw.crashed and hw.iommu.status == IommuStatus.INITIALIZED


# -- table population on a domain's first device --------------------------------------------------------


def guest_with_device(kind: DomainKind = DomainKind.HVM, **kw: object):  # type: ignore[no-untyped-def]
    cfg = IommuConfig(hwdom_strict=True, hwdom_inclusive=False)  # keeps the hardware domain's tables small
    m, drv, io, hw = boot(cfg, ram=512 << 20, hwdom_bytes=16 << 20, **kw)
    io.hwdom_init(hw)
    nic = m.add_pci_device(PciDevice(Sbdf.parse("0000:03:00.0"), phantom_stride=4), owner=hw)
    g = m.create_domain(1, kind, memory_bytes=8 << 20)
    io.domain_init(g)
    return m, drv, io, hw, g, nic


def test_first_device_populates_every_page_and_flushes_once() -> None:
    m, drv, io, hw, g, nic = guest_with_device()
    drv.flushes.clear()
    io.assign_device(g, "0000:03:00.0")
    ext = g.extents[0]
    assert mapped(io, g) == {ext.gfn.value + i: (ext.mfn.value + i, Perm.RW) for i in range(ext.count)}
    assert g.iommu.status == IommuStatus.INITIALIZED and g.iommu.need_sync
    assert [f.dfn for f in drv.flushes] == [None]  # one flush of everything
    assert nic.owner is g and nic in g.pci_devices and nic not in hw.pci_devices


def test_pv_guest_populates_only_writable_pages() -> None:
    m, drv, io, hw, g, nic = guest_with_device(DomainKind.PV)
    ext = g.extents[0]
    m.pages.set_type(ext.mfn.value + 3, PageType.WRITABLE, count=2)
    io.assign_device(g, nic.sbdf)
    assert mapped(io, g) == {
        ext.gfn.value + 3: (ext.mfn.value + 3, Perm.RW),
        ext.gfn.value + 4: (ext.mfn.value + 4, Perm.RW),
    }


@pytest.mark.parametrize("bulk", [True, False])
def test_populate_failure_at_each_allocation_tears_down_and_leaks_nothing(bulk: bool) -> None:
    m, drv, io, hw, g, nic = guest_with_device(bulk=bulk)
    before = dict(m.allocator.in_use)
    n = 1
    while True:
        m.allocator.fail_nth(n)
        try:
            io.assign_device(g, nic)
        except OutOfMemory as exc:
            assert exc.op in ("populate_page_table", "assign_device")  # noqa: PT017
            assert dict(m.allocator.in_use) == before
            assert g.iommu.status == IommuStatus.DISABLED and nic.owner is hw
            n += 1
            continue
        break
    m.allocator.clear_failures()
    assert n > 2 and nic.owner is g


def test_assignment_errors() -> None:
    m, drv, io, hw, g, nic = guest_with_device()
    with pytest.raises(NoDevice):
        io.assign_device(g, "0000:09:00.0")
    with pytest.raises(InvalidArgument):
        io.assign_device(g, "not-a-device")
    g.log_dirty = True
    with pytest.raises(CrossDevice) as info:
        io.assign_device(g, nic)
    assert info.value.errno == errno.EXDEV
    g.log_dirty = False
    io.assign_device(g, nic)
    other = m.create_domain(2, DomainKind.HVM, memory_bytes=4 << 20)
    io.domain_init(other)
    with pytest.raises(Busy):
        io.assign_device(other, nic)
    assert other.iommu.status == IommuStatus.DISABLED  # built for nothing, then torn down
    assert m.allocator.owned("d2:") == 0
    with pytest.raises(NoDevice):
        io.deassign_device(other, nic)


def test_phantom_function_failures_are_only_logged() -> None:
    m, drv, io, hw, g, nic = guest_with_device()
    calls = 0
    real = drv.assign_device

    def flaky(d, devfn, dev, flag):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if devfn != dev.sbdf.devfn:
            raise InvalidArgument("phantom refused")
        real(d, devfn, dev, flag)

    drv.assign_device = flaky  # type: ignore[method-assign]
    io.assign_device(g, nic)
    assert calls == 1 + len(nic.phantom_devfns) and nic.owner is g
    assert len(m.console.grep("phantom function")) == len(nic.phantom_devfns)


def test_last_device_leaving_tears_the_tables_down() -> None:
    m, drv, io, hw, g, nic = guest_with_device()
    io.assign_device(g, nic)
    assert m.allocator.owned("d1:") > 0
    io.deassign_device(g, nic)
    assert nic.owner is hw and g.iommu.status == IommuStatus.DISABLED and m.allocator.owned("d1:") == 0
    assert drv.calls.count("reassign_device") == 1 + len(nic.phantom_devfns)


def test_deassign_with_iommu_disabled_is_einval() -> None:
    m = Machine(ram_bytes=64 << 20)
    io = Iommu(m, ToyDriver(), IommuConfig(enable=False))
    io.setup()
    g = m.create_domain(1, DomainKind.HVM)
    with pytest.raises(InvalidArgument):
        io.deassign_device(g, "0000:00:01.0")
    io.assign_device(g, "0000:00:01.0")  # disabled: assignment is a no-op, even for unknown devices


# -- p2m sync ----------------------------------------------------------------------------------------------


def test_p2m_changes_reach_the_iommu_with_type_permissions() -> None:
    m, drv, io, hw, g, nic = guest_with_device()
    io.assign_device(g, nic)
    assert g.p2m is not None
    free = m.allocator.alloc_domain(1, 4)
    g.p2m.set_entry(Gfn(0x10_0000), free, 1, P2mType.RAM_RO)
    g.p2m.set_entry(Gfn(0x10_0002), free + 2, 0, P2mType.GRANT_MAP_RW)
    got = mapped(io, g)
    assert got[0x10_0000] == (free.value, Perm.R) and got[0x10_0001] == (free.value + 1, Perm.R)
    assert got[0x10_0002] == (free.value + 2, Perm.RW)
    g.p2m.set_entry(Gfn(0x10_0002), free + 3, 0, P2mType.INVALID)  # a type with no device access
    g.p2m.remove(Gfn(0x10_0000), 0)
    got = mapped(io, g)
    assert 0x10_0000 not in got and 0x10_0002 not in got and got[0x10_0001] == (free.value + 1, Perm.R)


def test_p2m_sync_failure_crashes_the_guest() -> None:
    m, drv, io, hw, g, nic = guest_with_device()
    io.assign_device(g, nic)
    assert g.p2m is not None
    m.allocator.fail_nth(1)
    with pytest.raises(OutOfMemory):
        g.p2m.set_entry(Gfn(0x40_0000), Mfn(0x300), 0, P2mType.RAM_RW)  # needs new tables
    assert g.crashed and 0x40_0000 not in mapped(io, g)


def test_no_sync_before_the_domain_has_tables() -> None:
    m, drv, io, hw, g, nic = guest_with_device()
    assert g.p2m is not None
    g.p2m.set_entry(Gfn(0x10_0000), Mfn(0x300), 0, P2mType.RAM_RW)
    assert m.allocator.owned("d1:") == 0 and g.iommu.status == IommuStatus.DISABLED


# -- fault threshold ------------------------------------------------------------------------------------------


def test_fault_threshold_disables_bus_mastering() -> None:
    m, drv, io, hw, g, nic = guest_with_device()
    for _ in range(FAULT_THRESHOLD - 1):
        assert not check_disable_device(io, nic)
        m.clock.advance_ms(1)
    assert check_disable_device(io, nic) and not nic.bus_master
    assert m.console.grep("disabling bus mastering")
    other = PciDevice(Sbdf.parse("0000:04:00.0"))
    for _ in range(50):  # faults far apart decay: the count halves after 10 ms of quiet
        m.clock.advance_ms(11)
        assert not check_disable_device(io, other)
    assert other.bus_master and other.fault_count < FAULT_THRESHOLD


def test_hwdom_and_guest_tables_are_separate_owners() -> None:
    m, drv, io, hw, g, nic = guest_with_device()
    io.assign_device(g, nic)
    io.domain_destroy(g)
    assert m.allocator.owned("d1:") == 0 and m.allocator.owned("d0:") > 0
    assert np.all(m.pages.owner[[f.value for f in m.allocator.frames_of("d0:")]] == 0x7FF2)
