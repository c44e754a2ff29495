"""The driver's dealings with the unit: set-up, fault handling, invalidation interfaces, timeouts, power."""

from __future__ import annotations

import errno

import pytest
from vtd_helpers import NIC, NVME, boot, fault_of, gmfn, guest_with, lands_at, make, reaches, unit

from iommusim.errors import DmaFault, TimedOut
from iommusim.frames import Daddr, Dfn, Gfn
from iommusim.hw.vtd.regs import FECTL_IM, FSTS, GSTS, IOTLB_REG, Reg
from iommusim.iommu.config import IommuConfig
from iommusim.iommu.devices import FAULT_THRESHOLD
from iommusim.perms import FlushFlags


def test_setup_programs_the_unit() -> None:
    p = make()
    regs = unit(p).regs
    gsts = regs.read(Reg.GSTS, 4)
    assert gsts & GSTS.RTPS
    assert gsts & GSTS.QIES
    assert not gsts & GSTS.TES
    root = p.ops.units[0].root  # type: ignore[attr-defined]
    assert regs.read(Reg.RTADDR, 8) == root.value << 12
    queue = p.ops.units[0].queue  # type: ignore[attr-defined]
    assert regs.read(Reg.IQA, 8) == (queue.base.value << 12) | 2  # QS = 2: four pages
    assert regs.read(Reg.FECTL, 4) & FECTL_IM == 0  # the fault event is unmasked
    boot(p)
    assert regs.read(Reg.GSTS, 4) & GSTS.TES
    assert regs.read(Reg.IQH, 8) == regs.read(Reg.IQT, 8)
    c = unit(p).counters()
    assert c["wait_descriptors"] * 2 == c["qi_descriptors"]  # every invalidation is followed by a wait


def test_fault_is_logged_cleared_and_counted() -> None:
    p = make()
    boot(p)
    guest_with(p)
    rec = fault_of(p, NIC, 0x2000_0123)
    assert (rec.reason, rec.sid, rec.addr, rec.is_read) == (0x6, 0x0300, 0x2000_0000, True)
    line = p.machine.console.grep("[VT-D]")[-1].text
    for field in ("DMA Read", "[0000:03:00.0]", "20000000", "reason 06", "read not permitted", "0xfed90000"):
        assert field in line
    assert not unit(p).regs.read(Reg.FSTS, 4) & FSTS.PPF  # the handler cleared F in the record
    assert p.device(NIC).fault_count == 1
    fault_of(p, NIC, 0x2000_0000, write=True)
    assert "DMA Write" in p.machine.console.grep("[VT-D]")[-1].text
    assert "reason 05" in p.machine.console.grep("[VT-D]")[-1].text
    assert unit(p).counters()["faults"] == 2


def test_repeated_faults_disable_bus_mastering() -> None:
    p = make()
    boot(p)
    guest_with(p)
    for i in range(FAULT_THRESHOLD):
        fault_of(p, NIC, 0x2000_0000 + (i << 12))
    nic = p.device(NIC)
    assert not nic.bus_master
    with pytest.raises(DmaFault, match="bus mastering"):
        p.machine.dma.read(nic, Daddr(0), 1)


def test_masked_faults_overflow_then_are_drained() -> None:
    p = make(fault_records=2)
    boot(p)
    guest_with(p)
    u = unit(p)
    u.regs.write(Reg.FECTL, FECTL_IM, 4)  # software masks the fault event
    for i in range(3):
        fault_of(p, NIC, 0x2000_0000 + (i << 12))
    assert u.regs.read(Reg.FSTS, 4) & FSTS.PFO
    assert not p.machine.console.grep("[VT-D]")
    u.regs.write(Reg.FECTL, 0, 4)  # unmasking delivers the pending event: the handler drains the ring
    lines = p.machine.console.grep("[VT-D]")
    assert [line.text.split(" at address ")[1].split()[0] for line in lines] == ["20000000", "20001000"]
    assert not u.regs.read(Reg.FSTS, 4) & (FSTS.PFO | FSTS.PPF)


def test_stalled_queue_times_out() -> None:
    p = make()
    boot(p)
    g = guest_with(p)
    unit(p).stall_queue = True
    with pytest.raises(TimedOut) as info:
        p.ops.unmap_page(g, Dfn(3))
    assert info.value.errno == errno.ETIMEDOUT
    assert p.machine.console.grep("queued invalidation timed out")


def test_register_based_invalidation_without_qi() -> None:
    p = make(qi=False)
    u = unit(p)
    assert not u.regs.read(Reg.GSTS, 4) & GSTS.QIES
    boot(p)
    g = guest_with(p)
    assert reaches(p, NIC, 0x3000)
    p.iommu.unmap_page(g, Dfn(3))
    assert not reaches(p, NIC, 0x3000)
    # what the driver left in the registers: IVA = 0x3000 (AM 0, IH 0); IOTLB = IIRG 3 (PSI) | DR | DW |
    # DID, with IVT cleared and IAIG 3 reported: 3 << 60 | 3 << 57 | 1 << 49 | 1 << 48 | did << 32
    did = p.ops.units[0].did_for(g.domid, alloc=False)  # type: ignore[attr-defined]
    assert u.regs.read(0x100, 8) == 0x3000
    assert u.regs.read(0x108, 8) == 3 << 60 | 3 << 57 | 1 << 49 | 1 << 48 | did << 32
    assert not u.regs.read(0x108, 8) & IOTLB_REG.IVT
    assert "qi_descriptors" not in u.counters()
    # a device-selective context invalidation with the old DID when the device leaves the guest:
    # CCMD = CIRG 3 << 61 | CAIG 3 << 59 | SID 0x300 << 16 | DID, ICC (bit 63) cleared by the unit
    p.iommu.deassign_device(g, NIC)
    assert u.regs.read(Reg.CCMD, 8) == 3 << 61 | 3 << 59 | 0x300 << 16 | did


def test_flush_error_of_an_earlier_unit_is_kept() -> None:
    p = make(units=2)
    boot(p)
    g = guest_with(p, NIC)
    p.iommu.assign_device(g, NVME)
    assert p.ops.unit_of(p.device(NIC)).index != p.ops.unit_of(p.device(NVME)).index  # type: ignore[attr-defined]
    first = p.ops.unit_of(p.device(NIC))  # type: ignore[attr-defined]
    assert first.index == 0
    unit(p, 0).stall_queue = True
    with pytest.raises(TimedOut):
        p.ops.iotlb_flush_all(g)


def test_quirk_flush_rc_overwritten_loses_the_error() -> None:
    p = make(units=2, config=IommuConfig(quirks=frozenset({"vtd-flush-rc-overwritten"})))
    boot(p)
    g = guest_with(p, NIC)
    p.iommu.assign_device(g, NVME)
    unit(p, 0).stall_queue = True
    p.ops.iotlb_flush_all(g)  # unit 0 timed out, unit 1 succeeded last: no error comes back


def test_suspend_resume_and_crash_shutdown() -> None:
    p = make()
    boot(p)
    g = guest_with(p)
    p.iommu.suspend()
    assert not unit(p).regs.read(Reg.GSTS, 4) & (GSTS.TES | GSTS.QIES)
    assert lands_at(p, NIC, 0x5000) == 0x5000  # translation off: untranslated
    p.iommu.resume()
    assert unit(p).regs.read(Reg.GSTS, 4) & GSTS.TES
    assert lands_at(p, NIC, 0x5000) == gmfn(g, 5) << 12
    p.guest_unmap(g, Gfn(5))  # the queue works again after resume
    assert not reaches(p, NIC, 0x5000)
    p.iommu.crash_shutdown()
    assert not unit(p).regs.read(Reg.GSTS, 4) & (GSTS.TES | GSTS.QIES)


@pytest.mark.parametrize(("extra", "kind"), [({}, "iotlb_inv_page"), ({"psi": False}, "iotlb_inv_domain")])
def test_one_page_flush_is_psi_unless_the_unit_lacks_it(extra: dict[str, bool], kind: str) -> None:
    p = make(**extra)
    boot(p)
    g = guest_with(p)
    before = dict(unit(p).counters())
    p.iommu.unmap_page(g, Dfn(3))
    after = unit(p).counters()
    assert after[kind] == before.get(kind, 0) + 1
    assert not reaches(p, NIC, 0x3000)


def test_flush_flags_decide_the_non_present_shortcut() -> None:
    p = make()
    boot(p)
    g = guest_with(p)
    before = unit(p).counters()["qi_descriptors"]
    p.iommu.iotlb_flush(g, Dfn(0x9000), 1, FlushFlags.ADDED)  # only additions: nothing can be cached
    assert unit(p).counters()["qi_descriptors"] == before
    p.iommu.iotlb_flush(g, Dfn(0x9000), 1, FlushFlags.MODIFIED)
    assert unit(p).counters()["qi_descriptors"] == before + 2  # the PSI and its wait descriptor
