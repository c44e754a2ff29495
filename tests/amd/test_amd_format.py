"""Golden values for the AMD v1 I/O page-table entry, worked out by hand from the AMD IOMMU specification.

Bit map used in the arithmetic: PR = bit 0 (0x1), NextLevel = bits 11:9 (value << 9), address = bits
51:12, U = bit 59, FC = bit 60 (0x1000_0000_0000_0000), IR = bit 61 (0x2000_...), IW = bit 62 (0x4000_...).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iommusim.pagetable.amd import (
    AmdV1Format,
    EntryProblem,
    beyond_reach_mask,
    entry_problem,
    pde_counter,
    sized_page_shift,
    skipped_bits_mask,
    with_pde_counter,
)
from iommusim.pagetable.format import EntryKind
from iommusim.perms import Perm

F = AmdV1Format()


def test_4k_leaf_read_write() -> None:
    # mfn 0x12345 -> address 0x1234_5000; PR 0x1; FC|IR|IW = 0x7000_0000_0000_0000
    raw = (0x12345 << 12) | F.leaf_bits(Perm.RW, 1)
    assert raw == 0x7000_0000_1234_5001
    d = F.decode(raw, 1)
    assert (d.kind, d.address, d.perms, d.page_shift) == (EntryKind.LEAF, 0x1234_5000, Perm.RW, 12)


def test_4k_leaf_read_only() -> None:
    # FC|IR = 0x3000_0000_0000_0000; no IW
    raw = (0xABCDE << 12) | F.leaf_bits(Perm.R, 1)
    assert raw == 0x3000_0000_ABCD_E001
    assert F.decode(raw, 1).perms == Perm.R


def test_pde_points_one_level_down_with_ir_iw() -> None:
    # a level-3 PDE: NextLevel 2 -> 2 << 9 = 0x400; PR 0x1; IR|IW = 0x6000_0000_0000_0000
    raw = F.table_entry(0x7654_3000, 3)
    assert raw == 0x6000_0000_7654_3401
    d = F.decode(raw, 3)
    assert (d.kind, d.next_level, d.address, d.perms) == (EntryKind.TABLE, 2, 0x7654_3000, Perm.RW)


def test_2m_leaf_is_next_level_0_at_level_2() -> None:
    # 0x4020_0000 is 2 MiB aligned; same bits as a 4 KiB leaf, the level decides the size (2**21)
    raw = 0x4020_0000 | F.leaf_bits(Perm.RW, 2)
    assert raw == 0x7000_0000_4020_0001
    d = F.decode(raw, 2)
    assert (d.kind, d.page_shift, d.address) == (EntryKind.LEAF, 21, 0x4020_0000)


def test_1g_leaf_is_next_level_0_at_level_3() -> None:
    raw = 0x1_4000_0000 | F.leaf_bits(Perm.RW, 3)
    assert raw == 0x7000_0001_4000_0001
    d = F.decode(raw, 3)
    assert (d.kind, d.page_shift, d.address) == (EntryKind.LEAF, 30, 0x1_4000_0000)


@pytest.mark.parametrize(
    ("base", "shift", "level", "raw"),
    [
        # 8 KiB: bit 12 clear, NextLevel 7 -> 0xE00; IR|IW; no FC: 0x6000_0000_1000_2E01
        (0x1000_2000, 13, 1, 0x6000_0000_1000_2E01),
        # 16 KiB: bit 12 set, bit 13 clear -> 0x1000_4000 | 0x1000 = 0x1000_5000
        (0x1000_4000, 14, 1, 0x6000_0000_1000_5E01),
        # 1 MiB: bits 18:12 set (seven ones, 0x7F000), bit 19 clear: 13 + 7 = 20
        (0x1010_0000, 20, 1, 0x6000_0000_1017_FE01),
        # 4 MiB at level 2: bits 20:12 set (nine ones, 0x1FF000): 13 + 9 = 22
        (0x4040_0000, 22, 2, 0x6000_0000_405F_FE01),
        # 256 GiB at level 3: bits 36:12 set (25 ones, 0x1F_FFFF_F000): 13 + 25 = 38
        (0x40_0000_0000, 38, 3, 0x6000_005F_FFFF_FE01),
    ],
)
def test_next_level_7_sizes(base: int, shift: int, level: int, raw: int) -> None:
    assert F.sized_leaf(base, shift, Perm.RW, fc=False) == raw
    assert sized_page_shift(raw) == shift
    d = F.decode(raw, level)
    assert (d.kind, d.page_shift, d.address) == (EntryKind.LEAF, shift, base)
    words = np.array([raw], dtype=np.uint64)
    assert F.leaf_shift_array(words, level)[0] == shift
    assert not F.malformed_array(words, level)[0]


@pytest.mark.parametrize(
    ("shift", "level"),
    [
        (21, 1),  # 2 MiB is not strictly between 4 KiB and 2 MiB
        (13, 2),  # 8 KiB is smaller than a level-2 entry
        (21, 2),  # the level's own size must use NextLevel 0
        (30, 2),
    ],
)
def test_next_level_7_size_outside_the_level_is_refused(shift: int, level: int) -> None:
    raw = F.sized_leaf(0x8000_0000, shift, Perm.RW)
    assert entry_problem(raw, level) == EntryProblem.PAGE_SIZE
    assert F.decode(raw, level).kind == EntryKind.MALFORMED
    assert F.malformed_array(np.array([raw], dtype=np.uint64), level)[0]


def test_replicated_16k_page_translates_from_every_replica() -> None:
    # a 16 KiB page covers four level-1 slots (dfn 4..7); each slot holds the same entry.  DMA address
    # 0x6ABC indexes slot 6; offset within the page = 0x6ABC & 0x3FFF = 0x2ABC -> 0x1000_4000 + 0x2ABC.
    from iommusim.machine import Machine
    from iommusim.pagetable.walk import walk

    m = Machine(ram_bytes=64 << 20)
    t = m.allocator.alloc("t").value
    raw = F.sized_leaf(0x1000_4000, 14, Perm.R)
    for i in range(4, 8):
        m.memory.store_word(t, i, raw)
    for daddr in (0x4000, 0x5123, 0x6ABC, 0x7FFF):
        r = walk(m.memory, F, t, 1, daddr)
        assert r.ok
        assert r.maddr == 0x1000_4000 + (daddr & 0x3FFF)
    assert walk(m.memory, F, t, 1, 0x6ABC).maddr == 0x1000_6ABC


def test_reserved_bits() -> None:
    leaf = 0x7000_0000_1234_5001
    assert entry_problem(leaf | (1 << 52), 1) == EntryProblem.RESERVED  # PTE 58:52
    assert entry_problem(leaf | (1 << 59), 1) is None  # U is defined for a PTE
    pde = F.table_entry(0x7654_3000, 3)
    assert entry_problem(pde | (1 << 59), 3) == EntryProblem.RESERVED  # PDE 60:52
    assert entry_problem(pde | (1 << 60), 3) == EntryProblem.RESERVED  # a PDE has no FC
    assert entry_problem(pde | (1 << 63) | (0xFF << 1), 3) is None  # ignored bits


def test_level_encodings() -> None:
    pde_nl3 = F.pointer_entry(0x1000, 3)
    assert entry_problem(pde_nl3, 3) == EntryProblem.LEVEL_ENCODING  # cannot point to its own level
    assert entry_problem(pde_nl3, 4) is None
    assert entry_problem(F.pointer_entry(0x1000, 1), 1) == EntryProblem.LEVEL_ENCODING
    assert entry_problem(0x7000_0000_0000_1001, 6) == EntryProblem.LEVEL_ENCODING  # no leaves at level 6
    assert entry_problem(0x7000_0000_0000_1001, 5) is None


def test_skipped_and_beyond_reach_masks() -> None:
    # a level-4 PDE pointing at a level-2 table skips level 3, indexed by bits 38:30
    assert skipped_bits_mask(4, 2) == 0x7F_C000_0000
    assert skipped_bits_mask(4, 3) == 0
    # two levels translate bits 29:0; bits 63:30 must be zero
    assert beyond_reach_mask(2) == 0xFFFF_FFFF_C000_0000
    assert beyond_reach_mask(6) == 0


def test_seed_merge_counter_bits() -> None:
    # 421 = 0x1A5: bit 8 -> PDE bit 63; bits 7:0 (0xA5) -> PDE bits 8:1 = 0xA5 << 1 = 0x14A
    assert with_pde_counter(0, 421) == 0x8000_0000_0000_014A
    pde = with_pde_counter(0x6000_0000_7654_3401, 421)
    assert pde == 0xE000_0000_7654_354B
    assert pde_counter(pde) == 421
    d = F.decode(pde, 3)
    assert (d.kind, d.next_level, d.address) == (EntryKind.TABLE, 2, 0x7654_3000)


def test_split_children_keep_permissions_unless_quirk() -> None:
    leaf2m = 0x4020_0000 | F.leaf_bits(Perm.R, 2)
    assert F.split_leaf_bits(leaf2m, 2) == F.leaf_bits(Perm.R, 1)
    assert AmdV1Format(split_children_rw=True).split_leaf_bits(leaf2m, 2) == F.leaf_bits(Perm.RW, 1)


_nl = st.integers(0, 7)
_level = st.integers(1, 6)


@st.composite
def _entries(draw: st.DrawFn) -> int:
    raw = draw(st.integers(0, (1 << 52) - 1)) & ~0xFFF
    raw |= draw(_nl) << 9
    raw |= draw(st.booleans()) | (draw(st.integers(0, 3)) << 61)
    if draw(st.booleans()):
        raw |= draw(st.integers(0, 0x7F)) << 52
    if draw(st.booleans()):
        raw |= (1 << 63) | (draw(st.integers(0, 0xFF)) << 1)
    return raw


@settings(max_examples=300, deadline=None)
@given(words=st.lists(_entries(), min_size=1, max_size=16), level=_level)
def test_vectorised_views_agree_with_decode(words: list[int], level: int) -> None:
    arr = np.array(words, dtype=np.uint64)
    decoded = [F.decode(w, level) for w in words]
    present = [d.kind != EntryKind.EMPTY for d in decoded]
    assert list(F.present_array(arr)) == present
    assert list(F.table_array(arr, level)) == [d.kind == EntryKind.TABLE for d in decoded]
    assert list(F.malformed_array(arr, level)) == [d.kind == EntryKind.MALFORMED for d in decoded]
    assert list(F.perms_array(arr, level)) == [(w >> 61) & 3 for w in words]
    shifts = F.leaf_shift_array(arr, level)
    for d, s in zip(decoded, shifts, strict=True):
        if d.kind == EntryKind.LEAF:
            assert d.page_shift == s
