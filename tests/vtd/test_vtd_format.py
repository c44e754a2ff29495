"""Second-level entry codec: golden values worked out by hand from the VT-d specification.

Layout (legacy second-level entries): bit 0 R, bit 1 W, bits 6:2 reserved here, bit 7 SP, bits 10:8 ignored,
bit 11 SNP, bits 51:12 address (bits at and above HAW reserved), bits 61:52 ignored, bit 62 TM, 63 ignored.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iommusim.errors import InvalidArgument
from iommusim.pagetable.format import EntryKind
from iommusim.pagetable.vtd import VTD_SNP, VTD_SP, VtdSecondLevelFormat
from iommusim.perms import Perm

FMT = VtdSecondLevelFormat(haw=46)


def test_leaf_4k_read_write_snoop_golden() -> None:
    # address 0x1234_5000 | R (0x1) | W (0x2) | SNP (bit 11 = 0x800) = 0x1234_5803
    raw = 0x1234_5000 | FMT.leaf_bits(Perm.RW, 1, True)
    assert raw == 0x1234_5803
    d = FMT.decode(raw, 1)
    assert (d.kind, d.address, d.perms, d.page_shift) == (EntryKind.LEAF, 0x1234_5000, Perm.RW, 12)


def test_leaf_read_only_golden() -> None:
    # 0xABCDE000 | R = 0xABCDE001; no SNP without the snoop attribute
    assert 0xABCDE000 | FMT.leaf_bits(Perm.R, 1) == 0xABCD_E001
    assert FMT.decode(0xABCD_E001, 1).perms == Perm.R


def test_table_entry_golden() -> None:
    # intermediate entries carry R=W=1 and the next table's address: 0x7FFF_F000 | 0x3 = 0x7FFF_F003
    raw = FMT.table_entry(0x7FFF_F000, 3)
    assert raw == 0x7FFF_F003
    d = FMT.decode(raw, 3)
    assert (d.kind, d.address, d.next_level) == (EntryKind.TABLE, 0x7FFF_F000, 2)


def test_superpage_leaves_golden() -> None:
    # 2 MiB at 0x4000_0000: address | SP (0x80) | RW (0x3) = 0x4000_0083; with SNP (0x800): 0x4000_0883
    assert 0x4000_0000 | FMT.leaf_bits(Perm.RW, 2) == 0x4000_0083
    assert 0x4000_0000 | FMT.leaf_bits(Perm.RW, 2, True) == 0x4000_0883
    d = FMT.decode(0x4000_0883, 2)
    assert (d.kind, d.address, d.page_shift) == (EntryKind.LEAF, 0x4000_0000, 21)
    # 1 GiB read-only at 0x1_4000_0000: 0x1_4000_0000 | 0x80 | 0x1 = 0x1_4000_0081
    assert 0x1_4000_0000 | FMT.leaf_bits(Perm.R, 3) == 0x1_4000_0081
    d = FMT.decode(0x1_4000_0081, 3)
    assert (d.kind, d.page_shift, d.perms) == (EntryKind.LEAF, 30, Perm.R)


def test_empty_means_neither_read_nor_write() -> None:
    # an address without R or W is not present: the hardware ignores every other bit
    assert FMT.decode(0x1234_5000, 1).kind == EntryKind.EMPTY
    assert FMT.decode(0, 4).kind == EntryKind.EMPTY


def test_address_bits_above_haw_are_reserved() -> None:
    # bit 40 of the address: fine under a 46-bit HAW, reserved under a 39-bit one (bits 51:39)
    raw = (1 << 40) | 0x3
    assert VtdSecondLevelFormat(haw=46).decode(raw, 1).kind == EntryKind.LEAF
    assert VtdSecondLevelFormat(haw=39).decode(raw, 1).kind == EntryKind.MALFORMED
    assert VtdSecondLevelFormat(haw=39).decode(raw | VTD_SP, 2).kind == EntryKind.MALFORMED
    assert VtdSecondLevelFormat(haw=39).decode((1 << 40) | 0x3, 3).kind == EntryKind.MALFORMED


def test_superpage_address_must_be_aligned() -> None:
    # a 2 MiB leaf with address bit 12 set (0x4000_1000): bits 20:12 are reserved in it
    assert FMT.decode(0x4000_1083, 2).kind == EntryKind.MALFORMED
    # a 1 GiB leaf with bit 21 set: bits 29:12 reserved
    assert FMT.decode(0x4020_0083, 3).kind == EntryKind.MALFORMED


def test_sp_at_unsupported_level_is_reserved() -> None:
    only_2m = VtdSecondLevelFormat(haw=46, superpage_levels={2})
    assert only_2m.decode(0x4000_0083, 2).kind == EntryKind.LEAF
    assert only_2m.decode(0x4000_0083, 3).kind == EntryKind.MALFORMED  # no 1 GiB pages on this unit
    assert VtdSecondLevelFormat(haw=46, superpage_levels=set()).decode(0x4000_0083, 2).kind == EntryKind.MALFORMED
    assert FMT.decode(0x80_0000_0083, 4).kind == EntryKind.MALFORMED  # never a leaf at level 4
    assert FMT.decode(0x80_0000_0083, 5).kind == EntryKind.MALFORMED
    with pytest.raises(InvalidArgument):
        only_2m.leaf_bits(Perm.RW, 3)


def test_bit7_of_a_4k_leaf_is_ignored() -> None:
    assert FMT.decode(0x1234_5083, 1).kind == EntryKind.LEAF


def test_snp_and_tm() -> None:
    # SNP (0x800) in a table entry is reserved
    assert FMT.decode(0x7FFF_F803, 2).kind == EntryKind.MALFORMED
    # SNP in a leaf is reserved only when the unit has no snoop control (ECAP.SC=0)
    assert VtdSecondLevelFormat(haw=46, snoop_control=False).decode(0x1234_5803, 1).kind == EntryKind.MALFORMED
    # TM (bit 62) is meaningful in leaves of a unit with device TLBs, reserved otherwise and in tables
    tm_leaf = (1 << 62) | 0x1234_5003
    assert FMT.decode(tm_leaf, 1).kind == EntryKind.LEAF
    assert VtdSecondLevelFormat(haw=46, device_tlb=False).decode(tm_leaf, 1).kind == EntryKind.MALFORMED
    assert FMT.decode((1 << 62) | 0x7FFF_F003, 2).kind == EntryKind.MALFORMED


def test_reserved_and_ignored_low_bits() -> None:
    # bits 6:2 are reserved: bit 2 set in 0x1234_5007
    assert FMT.decode(0x1234_5007, 1).kind == EntryKind.MALFORMED
    assert FMT.decode(0x7FFF_F043, 3).kind == EntryKind.MALFORMED  # bit 6 in a table entry
    # bits 10:8, 61:52 and 63 are ignored: 0x8FF0_0000_1234_5703 still maps 0x1234_5000
    d = FMT.decode(0x8FF0_0000_1234_5703, 1)
    assert (d.kind, d.address) == (EntryKind.LEAF, 0x1234_5000)


def test_split_keeps_attributes() -> None:
    # splitting a 1 GiB RW+SNP leaf gives 2 MiB leaves that keep SP; those split into 4K without SP
    raw = 0x4000_0000 | VTD_SP | VTD_SNP | 3
    assert FMT.split_leaf_bits(raw, 3) == VTD_SP | VTD_SNP | 3
    assert FMT.split_leaf_bits(raw, 2) == VTD_SNP | 3


_words = st.integers(min_value=0, max_value=(1 << 64) - 1)


@settings(max_examples=60, deadline=None)
@given(words=st.lists(_words, min_size=1, max_size=32), level=st.integers(1, 5), haw=st.sampled_from([39, 46, 52]))
def test_vectorised_forms_agree_with_decode(words: list[int], level: int, haw: int) -> None:
    fmt = VtdSecondLevelFormat(haw=haw, superpage_levels={2})
    arr = np.array(words, dtype=np.uint64)
    decoded = [fmt.decode(int(w), level) for w in arr]
    assert list(fmt.present_array(arr)) == [d.kind != EntryKind.EMPTY for d in decoded]
    assert list(fmt.malformed_array(arr, level)) == [d.kind == EntryKind.MALFORMED for d in decoded]
    tables = fmt.table_array(arr, level)
    for t, d in zip(tables, decoded, strict=True):
        if d.kind == EntryKind.TABLE:
            assert t
        if d.kind in (EntryKind.EMPTY, EntryKind.LEAF):
            assert not t
    perms = fmt.perms_array(arr, level)
    for p, d in zip(perms, decoded, strict=True):
        if d.kind in (EntryKind.LEAF, EntryKind.TABLE):
            assert Perm(int(p)) == d.perms


@settings(max_examples=40, deadline=None)
@given(addr=st.integers(0, (1 << 34) - 1), perms=st.sampled_from([Perm.R, Perm.W, Perm.RW]), snoop=st.booleans())
def test_encode_decode_leaf(addr: int, perms: Perm, snoop: bool) -> None:
    page = addr << 12
    d = FMT.decode(page | FMT.leaf_bits(perms, 1, snoop), 1)
    assert (d.kind, d.address, d.perms) == (EntryKind.LEAF, page, perms)


@settings(max_examples=60, deadline=None)
@given(word=_words, level=st.integers(1, 5))
def test_fast_table_check_agrees_with_decode(word: int, level: int) -> None:
    assert FMT.is_table(word, level) == (FMT.decode(word, level).kind == EntryKind.TABLE)
    table = FMT.table_entry(word & 0xF_FFFF_F000, level)
    assert FMT.is_table(table, level) == (level > 1)
