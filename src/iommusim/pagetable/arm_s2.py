"""ARM VMSAv8-64 stage-2 translation tables, 4 KiB granule: what Xen's ARM p2m writes and the SMMU walks.

On ARM the p2m *is* the IOMMU's table: the CPU (through VTTBR_EL2) and every SMMU context bank of a domain
(through TTBR0) walk the same stage-2 tree, so this one codec serves the p2m code that encodes entries and
the SMMU model that decodes them.

Level numbering.  The rest of iommusim numbers levels the VT-d way (level 1 holds 4 KiB leaves); ARM
numbers its lookup levels from the root down.  With a 4 KiB granule::

    our level 4 = ARM lookup level 0   512 GiB per entry, table descriptors only (no level-0 blocks)
    our level 3 = ARM lookup level 1   1 GiB blocks
    our level 2 = ARM lookup level 2   2 MiB blocks
    our level 1 = ARM lookup level 3   4 KiB pages

``arm_level(level)`` and ``our_level(arm_level)`` convert; fault syndromes (FSYNR0.PLVL) use ARM's numbers.

A descriptor (64 bits, bits[1:0] say what it is)::

    bits[1:0]  0b00/0b10 invalid; 0b11 table (ARM levels 0-2) or page (ARM level 3);
               0b01 block (ARM levels 1-2), reserved at ARM level 3, not allowed at level 0 with 4 KiB
    leaf (block or page):
      5:2   MemAttr  stage-2 memory type: [3:2]=00 Device (nGnRnE/nGnRE/nGRE/GRE by [1:0]),
                     otherwise Normal with outer=[3:2], inner=[1:0] (01 NC, 10 WT, 11 WB; inner 00 reserved)
      7:6   S2AP     bit 6 = read, bit 7 = write
      9:8   SH       00 non-shareable, 01 reserved, 10 outer, 11 inner
      10    AF       access flag (0 gives an access-flag fault)
      11    RES0
      47:12 output address (bits below the block size are RES0 in a block)
      51:48 RES0 here (a 48-bit output address): set, they name memory beyond the output size
      52    contiguous hint (16 adjacent entries map one contiguous, aligned region)
      53    RES0 in Armv8.0
      54    XN       execute-never
      58:55 ignored by hardware: Xen keeps its p2m_type_t here
      63:59 ignored by hardware
    table:
      11:2 and 58:52 ignored; 47:12 next-level table address; 51:48 and 63:59 RES0

Xen builds table descriptors from its ``p2m_invalid`` entry template (AF=1, read=1, MemAttr=0xF, SH=inner,
XN=1, type 0): those bits are ignored by the walker in a table descriptor, but the model writes them all
so that memory is bit-identical to Xen's.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final

import numpy as np
import numpy.typing as npt

from iommusim.errors import InvalidArgument
from iommusim.pagetable.format import Decoded, EntryKind, PageTableFormat, U64Array, level_shift
from iommusim.perms import Perm

__all__ = [
    "AF",
    "CONTIG",
    "MATTR_DEV",
    "MATTR_MEM",
    "MATTR_MEM_NC",
    "OA_MASK",
    "S2AP_R",
    "S2AP_W",
    "SW_SHIFT",
    "VALID",
    "XN",
    "ArmS2Format",
    "S2Attrs",
    "S2Geometry",
    "S2Problem",
    "Shareability",
    "XenP2mType",
    "arm_level",
    "describe_memattr",
    "leaf_attrs",
    "our_level",
    "s2_geometry_aarch32",
    "s2_geometry_aarch64",
]

VALID: Final = 1 << 0
TABLE_BIT: Final = 1 << 1  # table (levels > ARM 3) or page (ARM level 3)
MEMATTR_SHIFT: Final = 2
MEMATTR_MASK: Final = 0xF << MEMATTR_SHIFT
S2AP_R: Final = 1 << 6
S2AP_W: Final = 1 << 7
SH_SHIFT: Final = 8
SH_MASK: Final = 3 << SH_SHIFT
AF: Final = 1 << 10
OA_MASK: Final = ((1 << 48) - 1) & ~0xFFF  # bits 47:12
OA_HIGH_MASK: Final = 0xF << 48  # bits 51:48, RES0 with a 48-bit output address
CONTIG: Final = 1 << 52
XN: Final = 1 << 54
SW_SHIFT: Final = 55
SW_MASK: Final = 0xF << SW_SHIFT
LEAF_RES0: Final = (1 << 11) | (1 << 53)
TABLE_RES0: Final = 0x1F << 59  # bits 63:59 of a stage-2 table descriptor

#: Xen's stage-2 MemAttr values (asm-arm/page.h): Device-nGnRE, Normal non-cacheable, Normal write-back.
MATTR_DEV: Final = 0x1
MATTR_MEM_NC: Final = 0x5
MATTR_MEM: Final = 0xF


def arm_level(level: int) -> int:
    """ARM lookup level of one of our levels (our 1 = ARM 3 ... our 4 = ARM 0)."""
    return 4 - level


def our_level(arm: int) -> int:
    return 4 - arm


class Shareability(IntEnum):
    NON = 0
    RESERVED = 1
    OUTER = 2
    INNER = 3


class XenP2mType(IntEnum):
    """Xen's ARM ``p2m_type_t``, in its enum order, as stored in descriptor bits 58:55."""

    INVALID = 0
    RAM_RW = 1
    RAM_RO = 2
    MMIO_DIRECT_DEV = 3
    MMIO_DIRECT_NC = 4
    MMIO_DIRECT_C = 5
    MAP_FOREIGN = 6
    GRANT_MAP_RW = 7
    GRANT_MAP_RO = 8
    IOMMU_MAP_RW = 9
    IOMMU_MAP_RO = 10
    # 11 is p2m_max_real_type, a sentinel never stored; 12-15 are unused


@dataclass(frozen=True, slots=True)
class S2Attrs:
    """Everything in a leaf except the output address and the S2AP permissions."""

    mattr: int = MATTR_MEM
    sh: Shareability = Shareability.INNER
    af: bool = True
    xn: bool = False
    contiguous: bool = False
    sw: int = 0  # the 4 software bits (Xen: the p2m type)

    def __post_init__(self) -> None:
        if not 0 <= self.mattr <= 0xF or not 0 <= self.sw <= 0xF:
            raise InvalidArgument(f"MemAttr {self.mattr:#x} and software bits {self.sw:#x} are 4-bit fields")


def leaf_attrs(raw: int) -> S2Attrs:
    """The attributes of a block or page descriptor."""
    return S2Attrs(
        mattr=(raw & MEMATTR_MASK) >> MEMATTR_SHIFT,
        sh=Shareability((raw & SH_MASK) >> SH_SHIFT),
        af=bool(raw & AF),
        xn=bool(raw & XN),
        contiguous=bool(raw & CONTIG),
        sw=(raw & SW_MASK) >> SW_SHIFT,
    )


_DEVICE_KINDS = ("nGnRnE", "nGnRE", "nGRE", "GRE")
_CACHE_KINDS = {1: "NC", 2: "WT", 3: "WB"}


def describe_memattr(mattr: int) -> str:
    """The memory type a stage-2 MemAttr value gives, in the architecture's words."""
    outer, inner = mattr >> 2, mattr & 3
    if outer == 0:
        return f"Device-{_DEVICE_KINDS[inner]}"
    if inner == 0:
        return "reserved (Normal with inner 0b00)"
    return f"Normal outer-{_CACHE_KINDS[outer]} inner-{_CACHE_KINDS[inner]}"


class S2Problem(IntEnum):
    """Why the hardware refuses a present descriptor, and which fault it raises for it."""

    NONE = 0
    RESERVED_ENCODING = 1  # translation fault
    LEVEL0_BLOCK = 2  # translation fault
    RES0_SET = 3  # translation fault (the model's choice for RES0 bits set)
    MISALIGNED_BLOCK = 4  # translation fault (the model's choice for RES0 low output-address bits)
    ADDRESS_SIZE = 5  # address size fault: output or table address bits beyond 48

    @property
    def is_address_size(self) -> bool:
        return self == S2Problem.ADDRESS_SIZE


_PROBLEM_TEXT = {
    S2Problem.RESERVED_ENCODING: "reserved descriptor encoding 0b01 at lookup level 3",
    S2Problem.LEVEL0_BLOCK: "block descriptor at lookup level 0 (not allowed with a 4 KiB granule)",
    S2Problem.RES0_SET: "RES0 bits set",
    S2Problem.MISALIGNED_BLOCK: "block output address has bits set below the block size",
    S2Problem.ADDRESS_SIZE: "address bits 51:48 set beyond the 48-bit output address",
}


@dataclass(frozen=True, slots=True)
class S2Geometry:
    """Where a stage-2 walk starts: the input size, the initial lookup level and the concatenated tables."""

    ipa_bits: int
    start_level: int  # ARM lookup level of the root
    root_pages: int  # concatenated root tables (1, 2, 4, 8 or 16)

    @property
    def levels(self) -> int:
        """Our level number of the root (what ``RadixTable`` and ``walk`` call ``levels``)."""
        return our_level(self.start_level)

    @property
    def ipa_limit(self) -> int:
        return 1 << self.ipa_bits


def _geometry(ipa_bits: int, start_level: int) -> S2Geometry | None:
    # bits the initial lookup resolves: 1..9 in one table, 10..13 with 2..16 concatenated tables
    bits = ipa_bits - (12 + 9 * (3 - start_level))
    if not 1 <= bits <= 13 or (start_level == 0 and bits > 9):
        return None
    return S2Geometry(ipa_bits, start_level, 1 << max(0, bits - 9))


def s2_geometry_aarch64(t0sz: int, sl0: int) -> S2Geometry | None:
    """The walk a VTCR_EL2-style T0SZ/SL0 pair describes with a 4 KiB granule, or None if inconsistent.

    SL0 = 0, 1, 2 start at lookup level 2, 1, 0 (3 is reserved); the input size is 64 - T0SZ.
    """
    start = {0: 2, 1: 1, 2: 0}.get(sl0)
    if start is None or not 0 <= t0sz <= 63:
        return None
    return _geometry(64 - t0sz, start)


def s2_geometry_aarch32(t0sz: int, s: int, sl0: int) -> S2Geometry | None:
    """The walk an AArch32 (LPAE) VTCR describes: T0SZ is a signed 4-bit field and S must equal T0SZ[3]."""
    if s != (t0sz >> 3) & 1:
        return None
    start = {0: 2, 1: 1}.get(sl0)
    if start is None:
        return None
    signed = t0sz - 16 if t0sz & 8 else t0sz
    return _geometry(32 - signed, start)


def _u64(x: int) -> np.uint64:
    return np.uint64(x)


class ArmS2Format(PageTableFormat):
    """The stage-2 descriptor codec (our level numbering; see the module docstring)."""

    name = "arm-s2"
    addr_mask = OA_MASK
    present_mask = VALID
    leaf_levels = frozenset({1, 2, 3})
    hierarchical_perms = False  # stage 2 has no hierarchical permission bits in table descriptors

    # -- encoding --------------------------------------------------------------------------------------

    def table_entry(self, table_maddr: int, level: int) -> int:
        """A table descriptor as Xen writes it (its p2m_invalid template; the extra bits are ignored)."""
        if not 2 <= level <= 4:
            raise InvalidArgument(f"no table descriptor at our level {level} (ARM level {arm_level(level)})")
        if table_maddr & ~OA_MASK:
            raise InvalidArgument(f"table address {table_maddr:#x} is not a 4 KiB-aligned 48-bit address")
        return (
            table_maddr
            | VALID
            | TABLE_BIT
            | (MATTR_MEM << MEMATTR_SHIFT)
            | S2AP_R
            | (Shareability.INNER << SH_SHIFT)
            | AF
            | XN
        )

    def leaf_bits(self, perms: Perm, level: int, attrs: object | None = None) -> int:
        """A block (levels 2-3) or page (level 1) descriptor without its output address."""
        if level not in self.leaf_levels:
            raise InvalidArgument(f"no block or page descriptor at our level {level} (ARM level {arm_level(level)})")
        if attrs is None:
            attrs = S2Attrs()
        if not isinstance(attrs, S2Attrs):
            raise TypeError(f"stage-2 leaf attributes are S2Attrs, not {type(attrs).__name__}")
        bits = VALID | (TABLE_BIT if level == 1 else 0)
        bits |= attrs.mattr << MEMATTR_SHIFT
        bits |= (S2AP_R if perms & Perm.R else 0) | (S2AP_W if perms & Perm.W else 0)
        bits |= int(attrs.sh) << SH_SHIFT
        bits |= AF if attrs.af else 0
        bits |= CONTIG if attrs.contiguous else 0
        bits |= XN if attrs.xn else 0
        bits |= attrs.sw << SW_SHIFT
        return bits

    def split_leaf_bits(self, raw: int, level: int) -> int:
        """Children of a split block keep every attribute; only bit 1 changes (page at level 1, block above)."""
        keep = raw & ~OA_MASK & ~TABLE_BIT
        return keep | (TABLE_BIT if level - 1 == 1 else 0)

    # -- decoding ---------------------------------------------------------------------------------------

    def problem(self, raw: int, level: int) -> S2Problem:
        """What, if anything, makes a valid descriptor unusable at ``level``."""
        if not raw & VALID:
            return S2Problem.NONE
        if raw & TABLE_BIT and level > 1:
            if raw & OA_HIGH_MASK:
                return S2Problem.ADDRESS_SIZE
            if raw & TABLE_RES0:
                return S2Problem.RES0_SET
            return S2Problem.NONE
        if level == 1 and not raw & TABLE_BIT:
            return S2Problem.RESERVED_ENCODING
        if level == 4:
            return S2Problem.LEVEL0_BLOCK
        if raw & OA_HIGH_MASK:
            return S2Problem.ADDRESS_SIZE
        if raw & LEAF_RES0:
            return S2Problem.RES0_SET
        if raw & OA_MASK & ((1 << level_shift(level)) - 1):
            return S2Problem.MISALIGNED_BLOCK
        return S2Problem.NONE

    def decode(self, raw: int, level: int) -> Decoded:
        if not 1 <= level <= 4:
            raise InvalidArgument(f"stage-2 tables have our levels 1-4, not {level}")
        if not raw & VALID:
            return Decoded(EntryKind.EMPTY, raw, level)
        problem = self.problem(raw, level)
        if problem != S2Problem.NONE:
            return Decoded(
                EntryKind.MALFORMED, raw, level, problem=f"{_PROBLEM_TEXT[problem]} (ARM level {arm_level(level)})"
            )
        addr = raw & OA_MASK
        if raw & TABLE_BIT and level > 1:
            return Decoded(EntryKind.TABLE, raw, level, addr, Perm.RW, next_level=level - 1)
        perms = Perm((raw >> 6) & 3)
        return Decoded(EntryKind.LEAF, raw, level, addr, perms, page_shift=level_shift(level))

    def is_table(self, raw: int, level: int) -> bool:
        """``decode`` gives TABLE: a valid table descriptor above level 1 with no high or RES0 bits set."""
        return (
            level > 1
            and raw & (VALID | TABLE_BIT) == VALID | TABLE_BIT
            and not raw & (OA_HIGH_MASK | TABLE_RES0)
            and 1 <= level <= 4
        )

    # -- vectorised views -------------------------------------------------------------------------------

    def table_entry_array(self, table_maddrs: U64Array, level: int) -> U64Array:
        fixed = self.table_entry(0, level)  # the address is ORed in: checks the level once
        if (table_maddrs & _u64(~OA_MASK & ((1 << 64) - 1))).any():
            raise InvalidArgument("a table address is not a 4 KiB-aligned 48-bit address")
        out: U64Array = table_maddrs | _u64(fixed)
        return out

    def table_array(self, words: U64Array, level: int) -> npt.NDArray[np.bool_]:
        """Usable table descriptors (a table descriptor with RES0 or out-of-range bits is malformed)."""
        if level == 1:
            return np.zeros(words.shape, dtype=bool)
        table = (words & _u64(VALID | TABLE_BIT)) == _u64(VALID | TABLE_BIT)
        out: npt.NDArray[np.bool_] = table & ((words & _u64(OA_HIGH_MASK | TABLE_RES0)) == 0)
        return out

    def malformed_array(self, words: U64Array, level: int) -> npt.NDArray[np.bool_]:
        valid = (words & _u64(VALID)) != 0
        table_bit = (words & _u64(TABLE_BIT)) != 0
        if level == 1:
            bad = ~table_bit | ((words & _u64(OA_HIGH_MASK | LEAF_RES0)) != 0)
        else:
            table = table_bit
            table_bad = (words & _u64(OA_HIGH_MASK | TABLE_RES0)) != 0
            if level == 4:
                leaf_bad = np.ones(words.shape, dtype=bool)
            else:
                low = _u64(OA_MASK & ((1 << level_shift(level)) - 1))
                leaf_bad = ((words & _u64(OA_HIGH_MASK | LEAF_RES0)) != 0) | ((words & low) != 0)
            bad = np.where(table, table_bad, leaf_bad)
        out: npt.NDArray[np.bool_] = valid & bad
        return out

    def perms_array(self, words: U64Array, level: int) -> npt.NDArray[np.uint8]:
        return ((words >> _u64(6)) & _u64(3)).astype(np.uint8)

    def sw_array(self, words: U64Array) -> npt.NDArray[np.uint8]:
        """The software bits (Xen's p2m type) of every entry."""
        return ((words >> _u64(SW_SHIFT)) & _u64(0xF)).astype(np.uint8)
