"""The unit's caches and invalidations: each granularity removes exactly what it covers, nothing else."""

from __future__ import annotations

import pytest
from vtd_rig import IRO, Rig

from iommusim.errors import DmaFault
from iommusim.hw.vtd.regs import CCMD, FSTS, ICS_IWC, IOTLB_REG, IVA, Cap, Reg
from iommusim.hw.vtd.structs import ContextEntry, ContextInvDesc, IecInvDesc, IotlbInvDesc, WaitDesc
from iommusim.perms import Perm

A, B = 0x0300, 0x0400  # two devices, on two buses
DA, DB = 5, 9  # their domain ids


def _two_domains(**kw: object) -> tuple[Rig, int, int]:
    r = Rig(**kw)  # type: ignore[arg-type]
    pa, pb = r.page(), r.page()
    r.context(A, did=DA, slpt=pa)
    r.context(B, did=DB, slpt=pb)
    r.start()
    return r, pa, pb


def _stale(r: Rig, sid: int, daddr: int) -> bool:
    """True if the device still reaches memory at ``daddr`` (its translation is cached)."""
    try:
        r.unit.translate(sid, daddr, Perm.R)
    except DmaFault:
        return False
    return True


def _prime(r: Rig, pa: int, pb: int) -> tuple[int, int]:
    """Map 0x1000 and 0x2000 for A and 0x1000 for B, use them, then clear A's 0x1000 in memory only."""
    slot = r.map(pa, 0x1000, r.page(), Perm.RW)
    r.map(pa, 0x2000, r.page(), Perm.RW)
    r.map(pb, 0x1000, r.page(), Perm.RW)
    for sid, a in ((A, 0x1000), (A, 0x2000), (B, 0x1000)):
        r.unit.translate(sid, a, Perm.R)
    r.w(slot, 0)
    return slot, 0


def test_queue_runs_descriptors_and_wait_writes_status() -> None:
    r, _, _ = _two_domains()
    r.enable_qi()
    status = r.page()
    r.submit(IotlbInvDesc(1).encode(), WaitDesc(status + 4, 0xABCD, sw=True).encode())
    assert r.mem.read_u32(status + 4) == 0xABCD
    assert r.regs.read(Reg.IQH, 8) == 2 << 4  # the head follows the tail
    # IF raises the completion status (and the interrupt, masked out of reset)
    r.submit(WaitDesc(0, 0, sw=False, if_=True).encode())
    assert r.regs.read(Reg.ICS, 4) & ICS_IWC
    r.submit(IecInvDesc().encode())
    assert r.unit.counters()["inv_interrupt_entry"] == 1


def test_queue_wraps_around() -> None:
    r, _, _ = _two_domains()
    r.enable_qi(qs=0)  # 256 slots
    status = r.page()
    for i in range(300):
        r.submit(WaitDesc(status, i, sw=True).encode())
    assert r.mem.read_u32(status) == 299
    assert r.regs.read(Reg.IQH, 8) == (300 % 256) << 4


def test_bad_descriptor_stops_the_queue_with_iqe() -> None:
    r, _, _ = _two_domains()
    r.enable_qi()
    status = r.page()
    lo, hi = IotlbInvDesc(2, did=1).encode()
    r.submit((lo | 0x100, hi), WaitDesc(status, 1).encode())  # reserved bit 8 set
    assert r.regs.read(Reg.FSTS, 4) & FSTS.IQE
    assert r.regs.read(Reg.IQH, 8) == 0  # the head stays on the bad descriptor
    assert r.mem.read_u32(status) == 0  # the wait behind it never ran
    r.submit((0x7, 0))  # an unknown type also stops the queue (nothing runs while IQE is set)
    assert r.unit.counters()["queue_errors"] == 1
    # software repairs the descriptor and clears IQE; the next tail write resumes
    r.w(r.queue, lo)
    r.w(r.queue + 32, IecInvDesc().encode()[0])
    r.regs.write(Reg.FSTS, FSTS.IQE, 4)
    r.submit(WaitDesc(status, 2).encode())
    assert r.mem.read_u32(status) == 2


def test_context_cache_by_granularity() -> None:
    """A context entry changed in memory keeps being used until a context invalidation covers it."""
    r, pa, _pb = _two_domains()
    r.enable_qi()
    target = r.page()
    r.map(pa, 0x1000, target, Perm.RW)
    r.unit.translate(A, 0x1000, Perm.R)
    slot = r.ctx_tables[3]
    r.w(slot, 0)  # A's context entry cleared in memory only
    r.w(slot + 8, 0)
    assert _stale(r, A, 0x1000)
    r.submit(ContextInvDesc(3, did=DB, sid=B).encode())  # another device
    r.submit(ContextInvDesc(2, did=DB).encode())  # another domain
    r.submit(ContextInvDesc(3, did=DB, sid=A).encode())  # right device, wrong domain id
    assert _stale(r, A, 0x1000)
    r.submit(ContextInvDesc(3, did=DA, sid=A).encode())
    with pytest.raises(DmaFault) as info:
        r.unit.translate(A, 0x1000, Perm.R)
    assert info.value.record.reason == 0x2  # type: ignore[union-attr]


@pytest.mark.parametrize("gran", [1, 2])
def test_context_cache_global_and_domain(gran: int) -> None:
    r, pa, _ = _two_domains()
    r.enable_qi()
    r.map(pa, 0x1000, r.page(), Perm.RW)
    r.unit.translate(A, 0x1000, Perm.R)
    r.w(r.ctx_tables[3], 0)
    r.submit(ContextInvDesc(2, did=DB).encode())
    assert _stale(r, A, 0x1000)
    r.submit(ContextInvDesc(gran, did=DA).encode())
    assert not _stale(r, A, 0x1000)


def test_context_function_mask() -> None:
    r, pa, _ = _two_domains()
    r.enable_qi()
    r.map(pa, 0x1000, r.page(), Perm.RW)
    fn5 = A | 5  # 03:00.5 in the same domain
    r.context(fn5, did=DA, slpt=pa)
    r.unit.translate(fn5, 0x1000, Perm.R)
    r.w(r.ctx_tables[3] + 16 * 5, 0)
    # FM masks the top 1, 2 or 3 bits of the function number before comparing
    r.submit(ContextInvDesc(3, did=DA, sid=A | 1, fm=0).encode())  # .1 only (101b != 001b)
    assert _stale(r, fn5, 0x1000)
    r.submit(ContextInvDesc(3, did=DA, sid=A, fm=2).encode())  # bit 0 compared: 1 (from .5) != 0 (from .0)
    assert _stale(r, fn5, 0x1000)
    r.submit(ContextInvDesc(3, did=DA, sid=A | 1, fm=1).encode())  # bits 1:0 compared: 01b == 01b
    assert not _stale(r, fn5, 0x1000)


def test_iotlb_page_selective() -> None:
    r, pa, pb = _two_domains()
    r.enable_qi()
    _prime(r, pa, pb)
    assert _stale(r, A, 0x1000)
    r.submit(IotlbInvDesc(3, did=DA, addr=0x2000).encode())  # another page of the domain
    r.submit(IotlbInvDesc(3, did=DB, addr=0x1000).encode())  # the same page of another domain
    r.submit(IotlbInvDesc(2, did=DB).encode())  # another domain entirely
    r.submit(ContextInvDesc(1).encode())  # the context cache
    assert _stale(r, A, 0x1000)
    assert _stale(r, B, 0x1000)
    r.submit(IotlbInvDesc(3, did=DA, addr=0x1000).encode())
    assert not _stale(r, A, 0x1000)
    assert _stale(r, B, 0x1000)
    assert _stale(r, A, 0x2000)


def test_iotlb_address_mask_covers_an_aligned_block() -> None:
    r, pa, _ = _two_domains()
    r.enable_qi()
    for page in range(8):
        r.map(pa, page << 12, r.page(), Perm.RW)
        r.unit.translate(A, page << 12, Perm.R)
    for page in range(8):
        r.w(r.slot_of(pa, page << 12, 1), 0)
    # AM 2 at 0x5000: the 4-page block 0x4000-0x7fff (the low AM bits of the page number are ignored)
    r.submit(IotlbInvDesc(3, did=DA, addr=0x5000, am=2).encode())
    assert [_stale(r, A, p << 12) for p in range(8)] == [True] * 4 + [False] * 4


def test_iotlb_domain_and_global() -> None:
    r, pa, pb = _two_domains()
    r.enable_qi()
    _prime(r, pa, pb)
    r.submit(IotlbInvDesc(2, did=DB).encode())
    assert _stale(r, A, 0x1000)
    r.submit(IotlbInvDesc(2, did=DA).encode())
    assert not _stale(r, A, 0x1000)
    r.map(pb, 0x1000, r.page(), Perm.RW)
    r.unit.translate(B, 0x1000, Perm.R)
    r.w(r.slot_of(pb, 0x1000, 1), 0)
    r.submit(IotlbInvDesc(3, did=DA, addr=0x1000).encode())
    assert _stale(r, B, 0x1000)
    r.submit(IotlbInvDesc(1).encode())
    assert not _stale(r, B, 0x1000)


def test_superpage_entry_dropped_by_a_psi_inside_it() -> None:
    r, pa, _ = _two_domains()
    r.enable_qi()
    slot = r.map(pa, 0x4000_0000, 0x0400_0000, Perm.RW, leaf_level=2)  # 2 MiB at 64 MiB
    assert r.unit.translate(A, 0x4012_3000, Perm.R).page_shift == 21
    r.w(slot, 0)
    r.submit(IotlbInvDesc(3, did=DA, addr=0x4000_0000 + 0x3000).encode())
    assert not _stale(r, A, 0x4012_3000)


def test_ih_keeps_cached_non_leaf_entries() -> None:
    """With IH=1 software promises only leaves changed; a changed table pointer then stays cached."""
    r, pa, _ = _two_domains()
    r.enable_qi()
    old_target, new_target = r.page(), r.page()
    r.map(pa, 0x1000, old_target, Perm.RW)
    r.unit.translate(A, 0x1000, Perm.R)  # caches the level-2 entry pointing at the old level-1 table
    new_l1 = r.page()
    r.w(new_l1 + 8 * 1, new_target | 3)
    r.w(r.slot_of(pa, 0x1000, 2), new_l1 | 3)  # the level-2 entry now points to another table
    r.submit(IotlbInvDesc(3, did=DA, addr=0x1000, ih=True).encode())
    assert r.unit.translate(A, 0x1000, Perm.R).maddr == old_target  # walked through the stale PDE
    r.submit(IotlbInvDesc(3, did=DA, addr=0x1000, ih=False).encode())
    assert r.unit.translate(A, 0x1000, Perm.R).maddr == new_target


def test_caching_mode_caches_not_present() -> None:
    r, pa, _ = _two_domains(cap=Cap(fro=0x200, nfr=4, cm=True))
    r.enable_qi()
    with pytest.raises(DmaFault):
        r.unit.translate(A, 0x1000, Perm.R)
    r.map(pa, 0x1000, r.page(), Perm.RW)
    assert not _stale(r, A, 0x1000)  # the not-present result is cached
    r.submit(IotlbInvDesc(3, did=DB, addr=0x1000).encode())
    assert not _stale(r, A, 0x1000)
    r.submit(IotlbInvDesc(3, did=0, addr=0x1000).encode())  # domain id 0 covers not-present entries
    assert _stale(r, A, 0x1000)
    # a missing context entry is cached too, under domain id 0
    with pytest.raises(DmaFault):
        r.unit.translate(0x0600, 0, Perm.R)
    r.context(0x0600, did=DA, slpt=pa)
    assert not _stale(r, 0x0600, 0x1000)
    r.submit(ContextInvDesc(3, did=0, sid=0x0600).encode())
    assert _stale(r, 0x0600, 0x1000)


def test_without_caching_mode_nothing_negative_is_cached() -> None:
    r, pa, _ = _two_domains()
    with pytest.raises(DmaFault):
        r.unit.translate(A, 0x1000, Perm.R)
    r.map(pa, 0x1000, r.page(), Perm.RW)
    assert _stale(r, A, 0x1000)


def test_register_based_invalidation() -> None:
    r, pa, pb = _two_domains()
    _prime(r, pa, pb)
    iotlb = IRO + 8
    # PSI: address in IVA, then IVT | IIRG=3 | DID; the unit clears IVT and reports IAIG=3
    r.regs.write(IRO, 0x2000, 8)
    r.regs.write(iotlb, IOTLB_REG.IVT | 3 << 60 | DA << 32, 8)
    v = r.regs.read(iotlb, 8)
    assert not v & IOTLB_REG.IVT
    assert v >> 57 & 3 == 3
    assert _stale(r, A, 0x1000)
    r.regs.write(IRO, 0x1000, 8)
    r.regs.write(iotlb, IOTLB_REG.IVT | 3 << 60 | DA << 32, 8)
    assert not _stale(r, A, 0x1000)
    # context command: global (CIRG=1) reports CAIG=1
    r.regs.write(Reg.CCMD, CCMD.ICC | 1 << 61, 8)
    v = r.regs.read(Reg.CCMD, 8)
    assert not v & CCMD.ICC
    assert v >> 59 & 3 == 1
    assert IVA.IH == 0x40


def test_psi_falls_back_to_domain_without_psi_capability() -> None:
    r, pa, pb = _two_domains(cap=Cap(fro=0x200, nfr=4, psi=False))
    _prime(r, pa, pb)
    iotlb = IRO + 8
    r.regs.write(IRO, 0x3000, 8)
    r.regs.write(iotlb, IOTLB_REG.IVT | 3 << 60 | DA << 32, 8)
    assert r.regs.read(iotlb, 8) >> 57 & 3 == 2  # performed as domain-selective
    assert not _stale(r, A, 0x1000)


def test_register_invalidation_ignored_while_qi_enabled() -> None:
    r, pa, pb = _two_domains()
    _prime(r, pa, pb)
    r.enable_qi()
    r.regs.write(IRO + 8, IOTLB_REG.IVT | 1 << 60, 8)
    assert _stale(r, A, 0x1000)
    assert r.unit.counters()["register_invalidation_ignored"] == 1


def test_iotlb_lru_capacity() -> None:
    r, pa, _ = _two_domains(iotlb=4)
    r.enable_qi()
    for page in range(6):
        r.map(pa, page << 12, r.page(), Perm.RW)
        r.unit.translate(A, page << 12, Perm.R)
    assert len(r.unit.iotlb) == 4
    assert r.unit.counters()["iotlb_evictions"] == 2
    for page in range(6):
        r.w(r.slot_of(pa, page << 12, 1), 0)
    # the two oldest were evicted and are walked again (now absent); the four newest are stale
    assert [_stale(r, A, p << 12) for p in range(6)] == [False, False, True, True, True, True]


def test_context_entry_encoding_read_back() -> None:
    r, _pa, _ = _two_domains()
    lo, hi = r.mem.read_u64(r.ctx_tables[3]), r.mem.read_u64(r.ctx_tables[3] + 8)
    assert ContextEntry.decode(lo, hi).did == DA
