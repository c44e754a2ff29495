"""The unit's faults: every second-level reason provoked from hand-made tables, recorded as the spec says."""

from __future__ import annotations

import pytest
from vtd_rig import FRO, Rig

from iommusim.errors import DmaFault
from iommusim.hw.vtd.regs import FECTL_IM, FECTL_IP, FSTS, Cap, Ecap, Reg
from iommusim.hw.vtd.structs import FaultRecord
from iommusim.perms import Perm

SID = 0x0300  # 03:00.0
DID = 7


def _rig(**kw: object) -> tuple[Rig, int]:
    r = Rig(**kw)  # type: ignore[arg-type]
    pgd = r.page()
    r.context(SID, did=DID, slpt=pgd)
    r.start()
    return r, pgd


def _fault(r: Rig, daddr: int, access: Perm, sid: int = SID) -> FaultRecord:
    with pytest.raises(DmaFault) as info:
        r.unit.translate(sid, daddr, access)
    rec = info.value.record
    assert isinstance(rec, FaultRecord)
    return rec


def _recorded(r: Rig, index: int = 0) -> FaultRecord:
    lo, hi = r.frcd(index)
    return FaultRecord.decode(lo, hi)


def test_translation_off_means_untranslated() -> None:
    r = Rig()
    assert r.unit.translate(SID, 0x1234_5678, Perm.W).maddr == 0x1234_5678
    assert r.unit.counters()["untranslated"] == 1


def test_mapped_read_and_write() -> None:
    r, pgd = _rig()
    target = r.page()
    r.map(pgd, 0x10_0000, target, Perm.RW)
    tr = r.unit.translate(SID, 0x10_0123, Perm.W)
    assert (tr.maddr, tr.page_shift, tr.cached) == (target | 0x123, 12, False)
    assert r.unit.translate(SID, 0x10_0000, Perm.R).cached


def test_reason_1_root_not_present() -> None:
    r, _ = _rig()
    rec = _fault(r, 0x1000, Perm.R, sid=0x0500)  # bus 5 has no root entry
    assert (rec.reason, rec.sid, rec.addr, rec.is_read) == (0x1, 0x0500, 0x1000, True)
    assert _recorded(r) == rec
    # F is bit 31 of the 32-bit word at +12, reason in its bits 7:0, SID at +8
    assert r.regs.read(FRO + 12, 4) == (1 << 31) | (1 << 30) | 0x1
    assert r.regs.read(FRO + 8, 4) == 0x0500
    assert r.unit.counters()["fault_0x1"] == 1


def test_reason_2_context_not_present() -> None:
    r, _ = _rig()
    rec = _fault(r, 0x2000, Perm.W, sid=0x0308)  # 03:01.0: same bus, no context entry
    assert (rec.reason, rec.sid, rec.is_read) == (0x2, 0x0308, False)


@pytest.mark.parametrize(
    ("t", "aw", "ecap", "why"),
    [
        (3, 2, Ecap(iro=0x100), "reserved translation type"),
        (0, 3, Ecap(iro=0x100), "AGAW 3 (57-bit) not in SAGAW"),
        (2, 2, Ecap(iro=0x100, pt=False), "pass-through without ECAP.PT"),
        (1, 2, Ecap(iro=0x100, dt=False), "device-TLB type without ECAP.DT"),
    ],
)
def test_reason_3_invalid_context(t: int, aw: int, ecap: Ecap, why: str) -> None:
    r = Rig(ecap=ecap)
    r.context(SID, did=1, slpt=r.page(), t=t, aw=aw)
    r.start()
    assert _fault(r, 0, Perm.R).reason == 0x3, why


def test_reason_4_beyond_address_width() -> None:
    r, _ = _rig()
    assert _fault(r, 1 << 48, Perm.R).reason == 0x4  # AW 2 is 48 bits
    # with MGAW 39 the limit is min(39, 48) bits
    r2 = Rig(cap=Cap(fro=FRO, nfr=4, mgaw=39))
    r2.context(SID, did=1, slpt=r2.page())
    r2.start()
    assert _fault(r2, 1 << 40, Perm.R).reason == 0x4


def test_reasons_5_and_6_permissions_anded_over_levels() -> None:
    r, pgd = _rig()
    ro, wo = r.page(), r.page()
    r.map(pgd, 0x1000, ro, Perm.R)
    r.map(pgd, 0x2000, wo, Perm.W)
    assert _fault(r, 0x1000, Perm.W).reason == 0x5
    assert _fault(r, 0x2000, Perm.R).reason == 0x6
    assert _fault(r, 0x3000, Perm.R).reason == 0x6  # not present: the read is not permitted
    assert _fault(r, 0x3000, Perm.W).reason == 0x5
    # a read-only table entry (R only at level 2) makes the RW leaf below it read-only
    leaf_target = r.page()
    r.map(pgd, 0x40_0000, leaf_target, Perm.RW)
    l2 = r.slot_of(pgd, 0x40_0000, 2)
    r.w(l2, r.mem.read_u64(l2) & ~0x2)
    assert r.unit.translate(SID, 0x40_0000, Perm.R).perms == Perm.R
    assert _fault(r, 0x40_0000, Perm.W).reason == 0x5


def test_reason_7_next_table_pointer_leads_nowhere() -> None:
    r, pgd = _rig()
    nowhere = 0x10_0000_0000  # 64 GiB: below the 46-bit HAW, above the machine's 256 MiB of RAM
    r.w(pgd, nowhere | 3)
    assert _fault(r, 0, Perm.R).reason == 0x7
    r2 = Rig()
    r2.context(SID, did=1, slpt=nowhere)  # the context's own pointer
    r2.start()
    assert _fault(r2, 0, Perm.R).reason == 0x7


def test_reason_8_root_table_leads_nowhere() -> None:
    r = Rig()
    r.start(root=0x10_0000_0000)
    assert _fault(r, 0, Perm.R).reason == 0x8


def test_reason_9_context_table_pointer_leads_nowhere() -> None:
    r, _ = _rig()
    r.w(r.root + 16 * 4, 0x10_0000_0000 | 1)  # bus 4's root entry points beyond memory
    assert _fault(r, 0, Perm.R, sid=0x0400).reason == 0x9


def test_reason_a_reserved_root_bits() -> None:
    r, _ = _rig()
    r.w(r.root + 16 * 3, r.mem.read_u64(r.root + 16 * 3) | 0x2)  # bit 1 of the root entry
    assert _fault(r, 0, Perm.R).reason == 0xA


def test_reason_b_reserved_context_bits() -> None:
    r, _ = _rig()
    slot = r.ctx_tables[3] + 16 * 0
    r.w(slot + 8, r.mem.read_u64(slot + 8) | 0x80)  # hi bit 7
    assert _fault(r, 0, Perm.R).reason == 0xB


@pytest.mark.parametrize(
    ("raw_bits", "level"),
    [(0x4, 1), (0x80, 4), (1 << 47, 1)],
    ids=["bit2-in-leaf", "sp-at-level4", "address-above-haw"],
)
def test_reason_c_reserved_pte_bits(raw_bits: int, level: int) -> None:
    r, pgd = _rig()
    if level == 1:
        slot = r.map(pgd, 0x5000, r.page(), Perm.RW)
        r.w(slot, r.mem.read_u64(slot) | raw_bits)
    else:
        r.w(pgd, r.page() | 3 | raw_bits)
    assert _fault(r, 0x5000, Perm.R).reason == 0xC


def test_reason_c_superpage_size_not_supported() -> None:
    r, pgd = _rig(cap=Cap(fro=FRO, nfr=4, sllps=0b01))  # 2 MiB pages only
    r.map(pgd, 0x4000_0000, 0x4000_0000, Perm.RW, leaf_level=3)
    assert _fault(r, 0x4000_0000, Perm.R).reason == 0xC


def test_reason_d_translation_request_blocked() -> None:
    r, pgd = _rig()
    r.map(pgd, 0x1000, r.page(), Perm.RW)
    with pytest.raises(DmaFault) as info:
        r.unit.ats_translate(SID, 0x1000, Perm.R)  # T=0: translation requests are blocked
    assert isinstance(info.value.record, FaultRecord)
    assert info.value.record.reason == 0xD
    # with T=1 the same request is served and the device keeps the translation
    r.context(SID, did=DID, slpt=pgd, t=1)
    r.unit.context_cache.invalidate_all()
    assert r.unit.ats_translate(SID, 0x1000, Perm.R).page_shift == 12
    assert r.unit.device_tlb.lookup(SID, 0x1000) is not None


def test_fpd_suppresses_recording_but_not_blocking() -> None:
    r = Rig()
    r.context(SID, did=1, slpt=r.page(), fpd=True)
    r.start()
    _fault(r, 0, Perm.R)
    assert not r.frcd(0)[1] >> 63
    assert r.unit.counters()["faults_unrecorded_fpd"] == 1


def test_fault_ring_overflows() -> None:
    r, _ = _rig()  # four fault-recording registers, no handler connected
    for i in range(4):
        _fault(r, i << 12, Perm.R)
    fsts = r.regs.read(Reg.FSTS, 4)
    assert fsts & FSTS.PPF
    assert not fsts & FSTS.PFO
    assert fsts >> 8 & 0xFF == 0  # FRI: the first pending record
    assert [_recorded(r, i).addr for i in range(4)] == [0, 0x1000, 0x2000, 0x3000]
    _fault(r, 0x4000, Perm.R)  # the next register still holds a fault: overflow, the fault is lost
    assert r.regs.read(Reg.FSTS, 4) & FSTS.PFO
    _fault(r, 0x5000, Perm.R)  # while PFO is set nothing more is recorded
    assert r.unit.counters()["faults_dropped"] == 2
    assert [_recorded(r, i).addr for i in range(4)] == [0, 0x1000, 0x2000, 0x3000]
    # software clears F (write 1 to bit 31 at +12) in every record, then PFO
    for i in range(4):
        r.regs.write(FRO + 16 * i + 12, 1 << 31, 4)
    assert not r.regs.read(Reg.FSTS, 4) & FSTS.PPF
    r.regs.write(Reg.FSTS, FSTS.PFO, 4)
    _fault(r, 0x6000, Perm.W)
    assert _recorded(r, 0) == FaultRecord(True, SID, 0x5, False, 0x6000)  # the ring wrapped to register 0
    assert r.regs.read(Reg.FSTS, 4) >> 8 & 0xFF == 0


def test_fault_interrupt_masking() -> None:
    r, _ = _rig()
    calls: list[int] = []
    r.unit.fault_irq.connect(lambda: calls.append(r.regs.read(Reg.FSTS, 4)))
    assert r.regs.read(Reg.FECTL, 4) & FECTL_IM  # masked out of reset
    _fault(r, 0, Perm.R)
    assert calls == []
    assert r.regs.read(Reg.FECTL, 4) & FECTL_IP
    r.regs.write(Reg.FECTL, 0, 4)  # unmasking delivers the pending interrupt
    assert len(calls) == 1
    assert calls[0] & FSTS.PPF
    assert not r.regs.read(Reg.FECTL, 4) & FECTL_IP
    _fault(r, 0x1000, Perm.R)  # PPF was still set: no new interrupt
    assert len(calls) == 1
    for i in range(4):
        r.regs.write(FRO + 16 * i + 12, 1 << 31, 4)
    _fault(r, 0x2000, Perm.R)
    assert len(calls) == 2
