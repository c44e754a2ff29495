"""Hand-written table images with encodings Xen never writes, through the fast batch and the reference.

Each image is built twice; every call is checked against the reference loop (and the unit's recorded
state against its twin's), and the answers are also checked against values worked out by hand from the
specifications, so a fast path and a reference that agreed on a wrong answer would still fail.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import pytest
from batch_rigs import SID, AmdRig, Rig, SmmuRig, VtdRig
from test_batch_equivalence import bypass_reference, rows, same_state, steps

from iommusim.errors import DmaFault
from iommusim.frames import PAGE_SHIFT
from iommusim.hw.batch import FAULT_NONE, BatchResult, ReferenceBatch
from iommusim.hw.fastbatch import IdentityPlan
from iommusim.pagetable.amd import AmdV1Format, sized_leaf_address
from iommusim.pagetable.arm_s2 import AF, ArmS2Format
from iommusim.perms import Perm

AMD = AmdV1Format()
S2 = ArmS2Format()
G = 1 << 30
M2 = 1 << 21


def run_both(make: Callable[[], Rig], build: Callable[[Rig], None], addrs: list[int], access: Perm) -> BatchResult:
    """Every batch call on a fresh pair of twins, each compared with the reference; returns the bypassed
    result (every address walked from memory)."""
    daddrs = np.array(addrs, dtype=np.uint64)
    pair = []
    for _ in range(2):
        rig = make()
        build(rig)
        pair.append(rig)
    fast, ref = pair
    got = fast.unit.translate_batch(SID, daddrs, access)
    assert rows(got) == rows(ReferenceBatch(ref.unit).translate_batch(SID, daddrs, access))
    same_state(fast, ref)
    kinds = np.full(daddrs.size, int(access), dtype=np.uint8)
    trace = np.concatenate([daddrs, daddrs[::-1]])
    got_r = fast.unit.replay(SID, trace, np.concatenate([kinds, kinds]))
    assert steps(got_r) == steps(ReferenceBatch(ref.unit).replay(SID, trace, np.concatenate([kinds, kinds])))
    same_state(fast, ref)
    bypassed = fast.unit.translate_batch(SID, daddrs, access, use_iotlb=False)
    assert rows(bypassed) == bypass_reference(ref, daddrs, access)
    same_state(fast, ref)
    return bypassed


def ok_at(r: BatchResult, i: int, maddr: int, shift: int) -> None:
    assert (int(r.faults[i]), int(r.maddrs[i]), int(r.page_shifts[i])) == (FAULT_NONE, maddr, shift)


# -- VT-d ---------------------------------------------------------------------------------------------------


def vtd(aw: int = 2, sllps: int = 3, cm: bool = False) -> Callable[[], Rig]:
    return lambda: VtdRig(aw=aw, cm=cm, sllps=sllps, nfr=2, handler=True, iotlb=4, pde=2)


def test_vtd_1g_and_2m_leaves_4k_pages_and_what_they_refuse() -> None:
    def build(r: Rig) -> None:
        r.store(*r.slot(G, 3), 0x1_8000_0000 | 0x80 | 3)  # 1 GiB at 6 GiB
        r.store(*r.slot(2 * G + M2, 2), 0x4000_0000 | 0x80 | 1)  # 2 MiB read-only at 1 GiB
        r.store(*r.slot(0x5000, 1), 0x77_7000 | 3)
        r.store(*r.slot(0x6000, 1), 0x77_8000 | 3 | 1 << 2)  # reserved bit 2
        r.store(*r.slot(0x7000, 1), 0x77_9000 | 3 | 1 << 50)  # beyond HAW 46

    addrs = [G + 0x1234_5678, 2 * G + M2 + 0x1_2345, 0x5ABC, 0x6000, 0x7000, 0x8000, 1 << 48]
    r = run_both(vtd(), build, addrs, Perm.R)
    ok_at(r, 0, 0x1_8000_0000 + 0x1234_5678, 30)
    ok_at(r, 1, 0x4000_0000 + 0x1_2345, 21)
    ok_at(r, 2, 0x77_7ABC, 12)
    assert r.faults.tolist()[3:] == [0xC, 0xC, 0x6, 0x4]  # reserved, reserved, read denied, beyond MGAW
    w = run_both(vtd(), build, addrs[:3], Perm.W)
    assert w.faults.tolist() == [0, 0x5, 0]  # the 2 MiB page is read-only


def test_vtd_superpage_the_unit_does_not_list_and_a_table_beyond_dram() -> None:
    def build(r: Rig) -> None:
        r.store(*r.slot(G, 3), 0x1_8000_0000 | 0x80 | 3)  # 1 GiB, but CAP.SLLPS lists 2 MiB only
        r.store(*r.slot(2 * G, 3), ((r.machine.pages.frames + 9) << PAGE_SHIFT) | 3)

    r = run_both(vtd(sllps=1), build, [G, 2 * G + 0x1000], Perm.R)
    assert r.faults.tolist() == [0xC, 0x7]  # SP reserved at level 3; next table invalid


def test_vtd_five_level_tables() -> None:
    top = (1 << 56) + (5 << 48)

    def build(r: Rig) -> None:
        r.store(*r.slot(top + 0x3000, 1), 0xABC_D000 | 3)

    r = run_both(vtd(aw=3), build, [top + 0x3123, top + 0x4000], Perm.RW)
    ok_at(r, 0, 0xABC_D123, 12)
    assert r.faults[1] != 0


def test_vtd_caching_mode_negative_entries() -> None:
    def build(r: Rig) -> None:
        r.store(*r.slot(0x3000, 1), 0x9000 | 3)

    r = run_both(vtd(cm=True), build, [0x3000, 0x4000, 0x4000, 0x3008], Perm.R)
    assert r.faults.tolist() == [0, 6, 6, 0]


# -- AMD-Vi ---------------------------------------------------------------------------------------------------


def amd(mode: int = 4, dte_perms: int = 3, exclusion: bool = False) -> Callable[[], Rig]:
    return lambda: AmdRig(mode=mode, dte_perms=dte_perms, handler=True, iotlb=4, evt_head=0, exclusion=exclusion)


def test_amd_skipped_levels_need_zero_address_bits() -> None:
    """A level-4 PDE pointing straight at a level-2 table skips level 3 (address bits 38:30)."""

    def build(r: Rig) -> None:
        l2 = r.new_table()
        l1 = r.new_table()
        r.store(r.root_mfn, 0, AMD.pointer_entry(l2 << PAGE_SHIFT, 2))
        r.store(l2, 3, AMD.leaf_bits(Perm.RW, 2) | 0x4060_0000)  # a 2 MiB page for bits 29:21 = 3
        r.store(l2, 4, AMD.pointer_entry(l1 << PAGE_SHIFT, 1))
        r.store(l1, 7, AMD.leaf_bits(Perm.R, 1) | 0x1234_5000)

    addrs = [3 * M2 + 0x10, 4 * M2 + 0x7008, G + 3 * M2, (5 << 30) + 4 * M2 + 0x7000, 4 * M2 + 0x8000]
    r = run_both(amd(), build, addrs, Perm.R)
    ok_at(r, 0, 0x4060_0010, 21)
    ok_at(r, 1, 0x1234_5008, 12)
    assert all(r.faults[2:] != 0)


def test_amd_next_level_7_pages_and_a_nl0_leaf_at_level_3() -> None:
    def build(r: Rig) -> None:
        l3 = r.new_table()
        l2 = r.new_table()
        l1 = r.new_table()
        r.store(r.root_mfn, 0, AMD.pointer_entry(l3 << PAGE_SHIFT, 3))
        r.store(l3, 0, AMD.pointer_entry(l2 << PAGE_SHIFT, 2))
        r.store(l3, 1, AMD.leaf_bits(Perm.RW, 3) | (7 << 30))  # a 1 GiB page
        page8m = sized_leaf_address(0x8080_0000, 23)
        for i in range(4):  # an 8 MiB page is written in the four 2 MiB slots it covers
            r.store(l2, 4 + i, page8m | 1 | 7 << 9 | 3 << 61)
        r.store(l2, 0, AMD.pointer_entry(l1 << PAGE_SHIFT, 1))
        r.store(l1, 2, sized_leaf_address(0x5_0000, 16) | 1 | 7 << 9 | 1 << 61)  # a 64 KiB read-only page
        r.store(l1, 3, sized_leaf_address(0, 22) | 1 | 7 << 9 | 3 << 61)  # 4 MiB cannot sit at level 1

    addrs = [G + 0x123, 5 * M2 + 0x456, 0x2000 + 0xF00, 0x3000]
    r = run_both(amd(), build, addrs, Perm.R)
    ok_at(r, 0, 7 * G + 0x123, 30)
    ok_at(r, 1, 0x8080_0000 + M2 + 0x456, 23)
    ok_at(r, 2, 0x5_0000 + 0x2F00, 16)
    assert r.faults[3] != 0
    w = run_both(amd(), build, addrs[:3], Perm.W)
    assert w.faults.tolist()[:2] == [0, 0] and w.faults[2] != 0


def test_amd_one_and_six_level_modes_and_the_exclusion_range() -> None:
    def build1(r: Rig) -> None:
        r.store(r.root_mfn, 9, AMD.leaf_bits(Perm.RW, 1) | 0xAB000)

    r = run_both(amd(mode=1), build1, [0x9010, 0xA000, 1 << 21], Perm.R)
    ok_at(r, 0, 0xAB010, 12)
    assert all(r.faults[1:] != 0)

    def build6(r: Rig) -> None:
        r.store(*r.slot((1 << 63) + 0x4000, 1), AMD.leaf_bits(Perm.RW, 1) | 0xCD000)
        r.store(*r.slot(M2 + 0x1000, 1), AMD.leaf_bits(Perm.RW, 1) | 0xEF000)

    r = run_both(
        amd(mode=6, exclusion=True), build6, [(1 << 63) + 0x4008, M2 + 0x1008, M2 + 0x2000, M2 + 0x9000], Perm.R
    )
    ok_at(r, 0, 0xCD008, 12)
    assert r.maddrs.tolist()[1:3] == [M2 + 0x1008, M2 + 0x2000]  # excluded: untranslated
    assert r.faults[3] != 0  # past the exclusion limit: walked, and not mapped


# -- SMMU ------------------------------------------------------------------------------------------------------


def smmu(geometry: int, ps: int = 5, affd: bool = False) -> Callable[[], Rig]:
    return lambda: SmmuRig(geometry=geometry, ps=ps, affd=affd, stall=False, handler=True, iotlb=4)


def test_smmu_concatenated_root_tables() -> None:
    """T0SZ 24 / SL0 1: a 40-bit input resolved from ARM level 1 with two concatenated root tables."""
    top = (1 << 39) + 3 * G

    def build(r: Rig) -> None:
        assert r.root_pages == 2
        r.store(*r.slot(top + 0x2000, 1), 0x3456_7000 | S2.leaf_bits(Perm.RW, 1))
        r.store(*r.slot(G, 3), 0x8000_0000 | S2.leaf_bits(Perm.R, 3))

    r = run_both(smmu(1), build, [top + 0x2345, G + 0x1234_5678, 1 << 40], Perm.R)
    ok_at(r, 0, 0x3456_7345, 12)
    ok_at(r, 1, 0x8000_0000 + 0x1234_5678, 30)
    assert r.faults[2] != 0


def test_smmu_level_2_start_with_sixteen_root_tables_and_a_level_0_start() -> None:
    def build(r: Rig) -> None:
        assert r.root_pages == 16
        r.store(*r.slot((15 << 30) + M2, 2), 0x6000_0000 | S2.leaf_bits(Perm.RW, 2))

    r = run_both(smmu(3), build, [(15 << 30) + M2 + 0x10, 14 << 30], Perm.W)
    ok_at(r, 0, 0x6000_0010, 21)

    def build0(r: Rig) -> None:
        assert r.levels == 4
        r.store(*r.slot((1 << 47) + 0x5000, 1), 0x1_0000_5000 | S2.leaf_bits(Perm.RW, 1))
        r.store(*r.slot(1 << 40, 4), 0x1_0000_0000 | S2.leaf_bits(Perm.RW, 3))  # no blocks at level 0

    r = run_both(smmu(2), build0, [(1 << 47) + 0x5FFF, 1 << 40], Perm.R)
    ok_at(r, 0, 0x1_0000_5FFF, 12)
    assert r.faults[1] != 0


def test_smmu_access_flag_and_output_size() -> None:
    def build(r: Rig) -> None:
        r.store(*r.slot(0x3000, 1), (0x9000 | S2.leaf_bits(Perm.RW, 1)) & ~AF)
        r.store(*r.slot(0x4000, 1), (1 << 41) | S2.leaf_bits(Perm.RW, 1))

    r = run_both(smmu(0, ps=2), build, [0x3000, 0x4000], Perm.R)
    assert all(r.faults != 0)  # access flag fault; address size fault beyond the 40-bit output
    r = run_both(smmu(0, ps=5, affd=True), build, [0x3000, 0x4000], Perm.R)
    ok_at(r, 0, 0x9000, 12)
    ok_at(r, 1, 1 << 41, 12)


@pytest.mark.slow
def test_many_faults_under_an_interrupt_handler_across_restart_chunks() -> None:
    """With a handler connected the engine starts again after each fault (software may have changed
    anything), walking a chunk ahead; long batches with scattered faults must still match exactly."""

    def build(r: Rig) -> None:
        for page in range(96):
            if page % 3:
                r.store(*r.slot(page << PAGE_SHIFT, 1), ((0x400 + page) << PAGE_SHIFT) | 3)

    rng = np.random.default_rng(5)
    addrs = ((rng.integers(0, 96, 9000) << PAGE_SHIFT) | rng.integers(0, 4096, 9000)).tolist()
    r = run_both(vtd(), build, addrs, Perm.R)
    pages = np.array(addrs) >> PAGE_SHIFT
    assert np.array_equal(r.faults != 0, pages % 3 == 0)
    assert np.array_equal(r.maddrs[r.ok], ((0x400 + pages[r.ok]) << PAGE_SHIFT) | (np.array(addrs)[r.ok] & 0xFFF))


def test_smmu_blocks_of_a_size_its_tlb_does_not_hold_are_answered_by_their_4k_piece() -> None:
    def build(r: Rig) -> None:
        r.store(*r.slot(M2, 2), 0x6000_0000 | S2.leaf_bits(Perm.RW, 2))

    def make() -> Rig:
        return SmmuRig(geometry=0, ps=5, affd=False, stall=False, handler=False, iotlb=4, tlb_shifts=(12,))

    r = run_both(make, build, [M2 + 0x1_2345, M2 + 0x1_2FFF, M2 + 0x2_0000], Perm.R)
    ok_at(r, 0, 0x6001_2345, 12)
    ok_at(r, 1, 0x6001_2FFF, 12)
    ok_at(r, 2, 0x6002_0000, 12)


# -- DMA the unit lets through untranslated ---------------------------------------------------------------------

UNTRANSLATED = [0x1234, 0x5_6789, M2 + 0x10, 3 << 30]


def mapped_one(r: Rig) -> None:
    r.store(*r.slot(0x1000, 1), leaf_of(r, 0x9000))


def leaf_of(r: Rig, maddr: int) -> int:
    raw = r.leaf(maddr, 1, 3)
    assert raw is not None
    return raw


def untranslated(make: Callable[[], Rig], tweak: Callable[[Rig], None], access: Perm = Perm.R) -> BatchResult:
    def build(r: Rig) -> None:
        mapped_one(r)
        tweak(r)

    probe = make()
    build(probe)
    with contextlib.suppress(DmaFault):
        probe.unit.translate(SID, UNTRANSLATED[0], access)  # loads the context caches
    assert isinstance(probe.unit._batch_plan(SID), IdentityPlan)  # the batch takes the untranslated path
    return run_both(make, build, UNTRANSLATED, access)


def test_vtd_translation_off_and_pass_through_contexts() -> None:
    def te_off(r: Rig) -> None:
        from iommusim.hw.vtd.regs import GCMD, GSTS, Reg

        u = r.unit
        u.regs.write(Reg.GCMD, u.regs.read(Reg.GSTS, 4) & GSTS.PERSISTENT & ~GCMD.TE, 4)

    for make, tweak in (
        (vtd(), te_off),
        (lambda: VtdRig(aw=2, cm=False, sllps=3, nfr=2, handler=True, iotlb=4, pde=2, t=2), lambda r: None),
    ):
        r = untranslated(make, tweak, Perm.RW)
        assert r.maddrs.tolist() == UNTRANSLATED and not r.faults.any() and set(r.page_shifts.tolist()) == {12}


def test_amd_unit_off_dte_v0_and_paging_mode_0() -> None:
    from iommusim.hw.amd import regs
    from iommusim.hw.amd.structs import Dte

    def off(r: Rig) -> None:
        r.unit.mmio.write(regs.CONTROL, 0, 8)

    def dte(**kw: object) -> Callable[[Rig], None]:
        def set_it(r: Rig) -> None:
            assert isinstance(r, AmdRig)
            fields = {"valid": True, "translation_valid": True, "mode": 0, "ir": True, "iw": False, "domain_id": 9}
            fields.update(kw)
            for i, q in enumerate(Dte(**fields).qwords()):  # type: ignore[arg-type]
                r.machine.memory.write_u64(r.devtab + (SID & 0xFFFF) * 32 + 8 * i, q)

        return set_it

    for tweak in (off, dte(valid=False), dte()):
        r = untranslated(amd(exclusion=True), tweak)
        assert r.maddrs.tolist() == UNTRANSLATED and not r.faults.any()
    w = untranslated(amd(exclusion=True), dte(), Perm.W)  # mode 0 under IW=0: writes fault, but not excluded ones
    assert w.faults[2] == 0 and all(w.faults[[0, 1, 3]] != 0)


def test_smmu_bypasses() -> None:
    from iommusim.hw.smmu import regs

    def client_off(r: Rig) -> None:
        mm = r.unit.mmio
        mm.write(regs.GR0_SCR0, mm.read(regs.GR0_SCR0) | regs.Scr0.CLIENTPD)

    def unmatched(r: Rig) -> None:
        r.unit.mmio.write(regs.gr0_smr(0), regs.Smr(id=(SID + 1) & 0x7FFF).encode())

    def s2cr_bypass(r: Rig) -> None:
        r.unit.mmio.write(regs.gr0_s2cr(0), regs.S2cr(regs.S2crType.BYPASS, 0).encode())

    def bank_off(r: Rig) -> None:
        half = r.unit.window_size // 2
        r.unit.mmio.write(half + regs.CB_SCTLR, 0)
        # and a second stream match group that matches too (with SMCFCFG clear: counted, unpredictable)
        mm = r.unit.mmio
        mm.write(regs.GR0_SCR0, mm.read(regs.GR0_SCR0) & ~regs.Scr0.SMCFCFG)
        mm.write(regs.gr0_smr(1), regs.Smr(id=SID & 0x7FFF).encode())

    for tweak in (client_off, unmatched, s2cr_bypass, bank_off):
        r = untranslated(smmu(0), tweak, Perm.W)
        assert r.maddrs.tolist() == UNTRANSLATED and not r.faults.any()
