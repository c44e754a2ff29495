"""Golden values for the VMSAv8-64 stage-2 descriptor codec (4 KiB granule), worked out by hand.

Bit positions (ARM ARM, stage-2 block/page and table descriptors; Xen's lpae.h for the p2m type):
valid 0, table/page 1, MemAttr 5:2, S2AP read 6 / write 7, SH 9:8, AF 10, output address 47:12,
contiguous 52, XN 54, software (Xen's p2m type) 58:55.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iommusim.arm.p2m import p2m_entry_for_type
from iommusim.arm.vtcr import p2m_layout_for_pa_range
from iommusim.errors import InvalidArgument
from iommusim.machine.p2m import P2mType
from iommusim.pagetable.arm_s2 import (
    MATTR_DEV,
    ArmS2Format,
    S2Attrs,
    S2Problem,
    Shareability,
    XenP2mType,
    arm_level,
    describe_memattr,
    leaf_attrs,
    s2_geometry_aarch32,
    s2_geometry_aarch64,
)
from iommusim.pagetable.format import EntryKind
from iommusim.perms import Perm

F = ArmS2Format()


def _leaf(t: P2mType, maddr: int, level: int) -> int:
    perms, attrs = p2m_entry_for_type(t)
    return maddr | F.leaf_bits(perms, level, attrs)


def test_level_numbering() -> None:
    # our level 1 holds 4 KiB pages = ARM lookup level 3; our level 4 = ARM level 0
    assert [arm_level(lv) for lv in (1, 2, 3, 4)] == [3, 2, 1, 0]


def test_table_descriptor_as_xen_writes_it() -> None:
    # table at 0x12345000, ARM level 1 (our 3), from Xen's p2m_invalid template:
    #   valid|table 0x3, MemAttr 0xF<<2 = 0x3C, read 0x40, SH inner 3<<8 = 0x300, AF 0x400  -> 0x77F
    #   XN 1<<54 = 0x0040_0000_0000_0000
    raw = F.table_entry(0x1234_5000, 3)
    assert raw == 0x0040_0000_1234_577F
    d = F.decode(raw, 3)
    assert d.kind == EntryKind.TABLE
    assert d.address == 0x1234_5000
    assert d.next_level == 2


def test_page_descriptor_ram_rw() -> None:
    # ram_rw page at 0x12345000 (ARM level 3): 0x3 + 0x3C + R 0x40 + W 0x80 + SH 0x300 + AF 0x400 = 0x7FF
    #   XN 0; type 1 << 55 = 0x0080_0000_0000_0000
    raw = _leaf(P2mType.RAM_RW, 0x1234_5000, 1)
    assert raw == 0x0080_0000_1234_57FF
    d = F.decode(raw, 1)
    assert d.kind == EntryKind.LEAF
    assert d.perms == Perm.RW
    assert d.page_shift == 12


def test_page_descriptor_iommu_map_ro() -> None:
    # iommu_map_ro (10) page at 0x80000000: 0x3 + 0x3C + R 0x40 + SH 0x300 + AF 0x400 = 0x77F (no W)
    #   XN 0x0040_0000_0000_0000; type 10 = 0b1010 << 55 = 2**58 + 2**56 = 0x0500_0000_0000_0000
    raw = _leaf(P2mType.IOMMU_MAP_RO, 0x8000_0000, 1)
    assert raw == 0x0540_0000_8000_077F
    assert F.decode(raw, 1).perms == Perm.R
    assert leaf_attrs(raw).sw == XenP2mType.IOMMU_MAP_RO == 10


def test_page_descriptor_iommu_map_rw() -> None:
    # iommu_map_rw (9): low bits 0x7FF (R and W); XN 2**54; type 0b1001 << 55 = 2**58 + 2**55
    #   = 0x0400_0000_0000_0000 + 0x0080_0000_0000_0000, plus XN 0x0040_0000_0000_0000 = 0x04C0...
    raw = _leaf(P2mType.IOMMU_MAP_RW, 0x0004_0000, 1)
    assert raw == 0x04C0_0000_0004_07FF
    assert leaf_attrs(raw).sw == 9


def test_page_descriptor_ram_ro() -> None:
    # ram_ro (2): read only, executable: low 0x77F, type 2 << 55 = 0x0100_0000_0000_0000
    assert _leaf(P2mType.RAM_RO, 0x5000, 1) == 0x0100_0000_0000_577F


def test_block_descriptor_2m_ram_rw() -> None:
    # 2 MiB block at 0x40200000 (ARM level 2): bits[1:0] = 0b01, so 0x1 + 0x3C + 0x40 + 0x80 + 0x300 + 0x400
    #   = 0x7FD; type 1 << 55
    raw = _leaf(P2mType.RAM_RW, 0x4020_0000, 2)
    assert raw == 0x0080_0000_4020_07FD
    d = F.decode(raw, 2)
    assert d.kind == EntryKind.LEAF
    assert d.page_shift == 21


def test_block_descriptor_1g_device_mmio() -> None:
    # mmio_direct_dev (3) 1 GiB block at 0x80000000 (ARM level 1): 0x1 + MemAttr Device-nGnRE 0x1<<2 = 0x4
    #   + R 0x40 + W 0x80 + SH outer 2<<8 = 0x200 + AF 0x400 = 0x6C5
    #   XN 0x0040...; type 3 << 55 = 0x0180_0000_0000_0000 -> upper 0x01C0
    raw = _leaf(P2mType.MMIO_DIRECT_DEV, 0x8000_0000, 3)
    assert raw == 0x01C0_0000_8000_06C5
    assert F.decode(raw, 3).page_shift == 30
    a = leaf_attrs(raw)
    assert (a.mattr, a.sh, a.xn) == (MATTR_DEV, Shareability.OUTER, True)
    assert describe_memattr(a.mattr) == "Device-nGnRE"


def test_mmio_nc_and_cacheable_types() -> None:
    # mmio_direct_nc (4): MemAttr 0x5 << 2 = 0x14; page: 0x3 + 0x14 + 0xC0 + SH outer 0x200 + AF 0x400 = 0x6D7
    #   XN + type 4 << 55 = 0x0040... + 0x0200... = 0x0240...
    assert _leaf(P2mType.MMIO_DIRECT_NC, 0x1000, 1) == 0x0240_0000_0000_16D7
    # mmio_direct_c (5): MemAttr 0xF: 0x3 + 0x3C + 0xC0 + 0x200 + 0x400 = 0x6FF; type 5 << 55 = 0x0280...
    assert _leaf(P2mType.MMIO_DIRECT_C, 0x1000, 1) == 0x02C0_0000_0000_16FF
    assert describe_memattr(0x5) == "Normal outer-NC inner-NC"
    assert describe_memattr(0xF) == "Normal outer-WB inner-WB"
    assert describe_memattr(0x4) == "reserved (Normal with inner 0b00)"


def test_permission_and_type_table_of_xen() -> None:
    # §9.2: (XN, W) by type; read is always granted by the default access
    expect = {
        P2mType.RAM_RW: (False, True),
        P2mType.RAM_RO: (False, False),
        P2mType.IOMMU_MAP_RW: (True, True),
        P2mType.MAP_FOREIGN: (True, True),
        P2mType.GRANT_MAP_RW: (True, True),
        P2mType.MMIO_DIRECT_DEV: (True, True),
        P2mType.IOMMU_MAP_RO: (True, False),
        P2mType.GRANT_MAP_RO: (True, False),
        P2mType.INVALID: (True, False),
    }
    for t, (xn, w) in expect.items():
        perms, attrs = p2m_entry_for_type(t)
        assert attrs.xn is xn, t
        assert bool(perms & Perm.W) is w, t
        assert perms & Perm.R
        assert attrs.af


def test_x86_only_types_are_refused() -> None:
    with pytest.raises(InvalidArgument):
        p2m_entry_for_type(P2mType.RAM_LOGDIRTY)
    with pytest.raises(InvalidArgument):
        p2m_entry_for_type(P2mType.MMIO_DIRECT)


def test_encodings_xen_never_writes_are_decoded() -> None:
    # a page with only S2AP write (0b10 at 7:6 -> 0x80) and the contiguous hint (2**52)
    raw = 0x0010_0000_0000_7000 | 0x3 | 0x80 | 0x400
    d = F.decode(raw, 1)
    assert d.kind == EntryKind.LEAF
    assert d.perms == Perm.W
    assert leaf_attrs(raw).contiguous
    # S2AP 0b00: valid but no access
    assert F.decode(0x7000 | 0x3 | 0x400, 1).perms == Perm.NONE
    # reserved encoding 0b01 at ARM level 3
    assert F.decode(0x7000 | 0x1 | 0x400, 1).kind == EntryKind.MALFORMED
    assert F.problem(0x7000 | 0x1, 1) == S2Problem.RESERVED_ENCODING
    # a block at ARM level 0 does not exist with a 4 KiB granule
    assert F.problem(0x1, 4) == S2Problem.LEVEL0_BLOCK
    # output address bit 48 set: beyond a 48-bit output address -> address size
    assert F.problem((1 << 48) | 0x7000 | 0x3, 1) == S2Problem.ADDRESS_SIZE
    # RES0 bit 11 (nG in stage 1) and bit 53 in a leaf
    assert F.problem(0x7000 | 0x3 | (1 << 11), 1) == S2Problem.RES0_SET
    assert F.problem(0x7000 | 0x3 | (1 << 53), 1) == S2Problem.RES0_SET
    # a 2 MiB block whose output address has bit 12 set (0x40201000) is not aligned
    assert F.problem(0x4020_1000 | 0x1, 2) == S2Problem.MISALIGNED_BLOCK
    # table descriptor bits 63:59 are RES0 at stage 2; bits 58:52 and 11:2 are ignored
    assert F.problem((1 << 59) | 0x5000 | 0x3, 2) == S2Problem.RES0_SET
    assert F.problem((0x7F << 52) | 0x5000 | 0xFFF, 2) == S2Problem.NONE
    # software bits of a leaf and bits 63:59 are ignored by hardware
    assert F.decode((0x1F << 59) | (0xF << 55) | 0x7000 | 0x3 | 0x400, 1).kind == EntryKind.LEAF
    # invalid: bit 0 clear, whatever else is set
    assert F.decode(0xFFFF_FFFF_FFFF_FFFE, 2).kind == EntryKind.EMPTY


def test_split_keeps_attributes_and_sets_the_page_bit() -> None:
    # a 2 MiB ram_rw block 0x0080_0000_4020_07FD splits into pages 0x0080_0000_4020_07FF (bit 1 set)
    block = 0x0080_0000_4020_07FD
    assert F.split_leaf_bits(block, 2) == 0x0080_0000_0000_07FF
    # a 1 GiB block splits into 2 MiB blocks: bit 1 stays clear
    assert F.split_leaf_bits(0x01C0_0000_8000_06C5, 3) == 0x01C0_0000_0000_06C5


def test_leaf_bits_refuse_impossible_levels_and_attrs() -> None:
    with pytest.raises(InvalidArgument):
        F.leaf_bits(Perm.R, 4)
    with pytest.raises(InvalidArgument):
        F.table_entry(0x1000, 1)
    with pytest.raises(TypeError):
        F.leaf_bits(Perm.R, 1, object())
    with pytest.raises(InvalidArgument):
        S2Attrs(mattr=0x10)
    # no attributes: normal write-back, inner shareable, AF set, executable, type 0
    assert F.leaf_bits(Perm.RW, 1) == 0x7FF


def test_geometry_from_t0sz_and_sl0() -> None:
    # T0SZ 24 -> 40-bit IPA; SL0 1 -> start at level 1, which resolves 40 - (12 + 9 * 2) = 10 bits: 2 tables
    g = s2_geometry_aarch64(24, 1)
    assert g is not None
    assert (g.ipa_bits, g.start_level, g.root_pages, g.levels) == (40, 1, 2, 3)
    # T0SZ 16 -> 48 bits; SL0 2 -> level 0 resolves 48 - 39 = 9 bits: one table, 4 levels
    g = s2_geometry_aarch64(16, 2)
    assert g is not None
    assert (g.start_level, g.root_pages, g.levels) == (0, 1, 4)
    # T0SZ 21 (43 bits) at level 1: 13 bits -> 16 concatenated tables, the most allowed
    g = s2_geometry_aarch64(21, 1)
    assert g is not None
    assert g.root_pages == 16
    # T0SZ 30 (34 bits) at level 2 (SL0 0): 34 - 21 = 13 bits -> 16 tables
    g = s2_geometry_aarch64(30, 0)
    assert g is not None
    assert (g.start_level, g.root_pages) == (2, 16)
    # inconsistent: T0SZ 20 (44 bits) at level 1 would need 14 bits; T0SZ 16 at level 1 needs 18
    assert s2_geometry_aarch64(20, 1) is None
    assert s2_geometry_aarch64(16, 1) is None
    # SL0 3 is reserved with a 4 KiB granule
    assert s2_geometry_aarch64(24, 3) is None
    # AArch32 VTCR: T0SZ is signed 4 bits: 0b1000 = -8 -> 40-bit IPA; S must equal T0SZ[3]
    g = s2_geometry_aarch32(0b1000, 1, 1)
    assert g is not None
    assert (g.ipa_bits, g.root_pages) == (40, 2)
    assert s2_geometry_aarch32(0b1000, 0, 1) is None


def test_xen_pa_range_table_and_vtcr() -> None:
    # PARange 40: T0SZ 24, SL0 1, root order 1.  VTCR_EL2 = RES1 0x8000_0000 | SH0 inner 0x3000
    #   | ORGN0 WBWA 0x400 | IRGN0 WBWA 0x100 | PS 2 << 16 = 0x2_0000 | SL0 1 << 6 = 0x40 | T0SZ 0x18
    lay = p2m_layout_for_pa_range(40)
    assert lay.vtcr == 0x8002_3558
    assert (lay.ipa_bits, lay.root_level, lay.root_pages) == (40, 1, 2)
    # PARange 42 keeps a 40-bit IPA (T0SZ 24) in Xen's table; PS becomes 3
    lay42 = p2m_layout_for_pa_range(42)
    assert lay42.ipa_bits == 40
    assert lay42.vtcr == 0x8003_3558
    # PARange 48: T0SZ 16 = 0x10, SL0 2 = 0x80, PS 5 << 16 = 0x5_0000 -> 0x8005_3590; root at level 0
    lay48 = p2m_layout_for_pa_range(48)
    assert lay48.vtcr == 0x8005_3590
    assert (lay48.root_level, lay48.root_pages, lay48.geometry.levels) == (0, 1, 4)
    # PARange 32: T0SZ 32 = 0x20, SL0 1, PS 0 -> 0x8000_3560; one root table at level 1
    assert p2m_layout_for_pa_range(32).vtcr == 0x8000_3560
    with pytest.raises(InvalidArgument):
        p2m_layout_for_pa_range(39)


_WORDS = st.lists(
    st.one_of(
        st.integers(0, (1 << 64) - 1),
        st.builds(
            lambda t, a, lv: int(a << 12) | F.leaf_bits(p2m_entry_for_type(t)[0], lv, p2m_entry_for_type(t)[1]),
            st.sampled_from([t for t in P2mType if t not in (P2mType.RAM_LOGDIRTY, P2mType.MMIO_DIRECT)]),
            st.integers(0, (1 << 36) - 1),
            st.sampled_from([1, 2, 3]),
        ),
        st.builds(lambda a: int(a << 12) | 0x3, st.integers(0, (1 << 36) - 1)),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(words=_WORDS, level=st.sampled_from([1, 2, 3, 4]))
def test_vectorised_views_agree_with_decode(words: list[int], level: int) -> None:
    arr = np.array(words, dtype=np.uint64)
    decoded = [F.decode(w, level) for w in words]
    assert list(F.present_array(arr)) == [d.kind != EntryKind.EMPTY for d in decoded]
    assert list(F.table_array(arr, level)) == [d.kind == EntryKind.TABLE for d in decoded]
    assert list(F.malformed_array(arr, level)) == [d.kind == EntryKind.MALFORMED for d in decoded]
    leaves = [i for i, d in enumerate(decoded) if d.kind == EntryKind.LEAF]
    assert [int(F.perms_array(arr, level)[i]) for i in leaves] == [int(decoded[i].perms) for i in leaves]
    assert [int(F.address_array(arr)[i]) for i in leaves] == [decoded[i].address for i in leaves]
    assert list(F.sw_array(arr)) == [(w >> 55) & 0xF for w in words]
