"""The AMD I/O page-table format, version 1 (host translation): one 64-bit entry, decoded as the IOMMU does.

Both halves use this module: the driver to write entries, the hardware model to read them back.  The
layout (AMD IOMMU specification, "I/O Page Tables for Host Translations"):

====  =========  =======================================================================================
bits  name       meaning
====  =========  =======================================================================================
0     PR         present
8:1   (ignored)  free for software: the seed-era Xen kept bits 7:0 of its merge counter here
11:9  NextLevel  1..6: level of the table this entry points to (a PDE); 0: a leaf of the level's own
                 size; 7: a leaf whose size is encoded in the low address bits (see below)
51:12 Address    the next table, or the page
58:52 reserved   (60:52 in a PDE, which has no U or FC)
59    U          untranslated access only (leaf)
60    FC         force coherent (leaf); Xen sets it on every leaf
61    IR         read permission
62    IW         write permission
63    (ignored)  the seed-era Xen kept bit 8 of its merge counter here
====  =========  =======================================================================================

Rules the hardware applies and this module encodes:

* permissions are ANDed over the whole walk, device-table entry included (``hierarchical_perms``);
* a PDE may skip levels (NextLevel below ``level - 1``); the address bits the skipped levels would have
  indexed must then be zero, or the access faults (``skipped_bits_mask``);
* a NextLevel-7 leaf maps 2**(13 + n) bytes, where n is the number of consecutive one bits in the
  address field counting up from bit 12 (the first zero bit marks the size); the size must lie strictly
  between the default size of the entry's own level and that of the level above, and the entry is
  replicated in every slot the page covers;
* leaves are legal at levels 1 to 5: the sixth level only ever holds pointers.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import numpy.typing as npt

from iommusim.pagetable.format import Decoded, EntryKind, PageTableFormat, U64Array, level_shift
from iommusim.perms import Perm

__all__ = [
    "ADDR_MASK",
    "FC",
    "IR",
    "IW",
    "MAX_LEVELS",
    "NEXT_LEVEL_MASK",
    "NEXT_LEVEL_SHIFT",
    "NL_LEAF",
    "NL_SIZED",
    "PDE_RESERVED",
    "PR",
    "PTE_RESERVED",
    "AmdV1Format",
    "EntryProblem",
    "U",
    "beyond_reach_mask",
    "entry_problem",
    "next_level_of",
    "pde_counter",
    "sized_leaf_address",
    "sized_page_shift",
    "skipped_bits_mask",
    "with_pde_counter",
]

PR = 1 << 0
NEXT_LEVEL_SHIFT = 9
NEXT_LEVEL_MASK = 7 << NEXT_LEVEL_SHIFT
ADDR_MASK = ((1 << 52) - 1) & ~0xFFF
U = 1 << 59
FC = 1 << 60
IR = 1 << 61
IW = 1 << 62
PTE_RESERVED = ((1 << 59) - 1) & ~((1 << 52) - 1)  # bits 58:52
PDE_RESERVED = ((1 << 61) - 1) & ~((1 << 52) - 1)  # bits 60:52
NL_LEAF = 0
NL_SIZED = 7
MAX_LEVELS = 6
#: Levels whose entries may be leaves (the sixth level holds only pointers).
LEAF_LEVELS = frozenset(range(1, 6))

_COUNTER_LOW = 0xFF << 1  # ignored bits 8:1 hold counter bits 7:0
_COUNTER_HIGH = 1 << 63  # ignored bit 63 holds counter bit 8
_ADDR_BITS = 40  # width of the address field (bits 51:12)


class EntryProblem(Enum):
    """Why the hardware refuses a present entry (the IO_PAGE_FAULT flags tell these apart)."""

    RESERVED = "reserved bits set"  # RZ=1 in the fault record
    LEVEL_ENCODING = "invalid next-level encoding"  # RZ=0: a level that cannot follow this one
    PAGE_SIZE = "invalid page size"  # a NextLevel-7 size outside the level's range


def next_level_of(raw: int) -> int:
    return (raw >> NEXT_LEVEL_SHIFT) & 7


def sized_page_shift(raw: int) -> int:
    """log2 of the size a NextLevel-7 leaf maps: 13 plus the run of one bits from address bit 12 up."""
    field = (raw & ADDR_MASK) >> 12
    ones = (~field & (field + 1)).bit_length() - 1  # index of the lowest zero bit = length of the run
    return 13 + min(ones, _ADDR_BITS)


def sized_leaf_address(maddr: int, page_shift: int) -> int:
    """The address field of a NextLevel-7 leaf for a page of 2**page_shift bytes at ``maddr``.

    Bits 12 .. page_shift-2 are set and bit page_shift-1 is clear: a 16 KiB page (shift 14) sets bit 12
    only, a 4 MiB page (shift 22) sets bits 20:12.
    """
    if page_shift < 13 or maddr & ((1 << page_shift) - 1):
        raise ValueError(f"{maddr:#x} is not a {1 << page_shift:#x}-aligned page of at least 8 KiB")
    return maddr | (((1 << (page_shift - 1)) - 1) & ~0xFFF)


def _leaf_size_ok(shift: int, level: int) -> bool:
    return level_shift(level) < shift < level_shift(level + 1) and shift <= 52


def entry_problem(raw: int, level: int) -> EntryProblem | None:
    """What makes a present entry at ``level`` unusable, in the order the hardware checks it; None if fine."""
    nl = next_level_of(raw)
    leafish = nl in (NL_LEAF, NL_SIZED)
    if raw & (PTE_RESERVED if leafish else PDE_RESERVED):
        return EntryProblem.RESERVED
    if leafish:
        if level not in LEAF_LEVELS:
            return EntryProblem.LEVEL_ENCODING
        if nl == NL_SIZED and not _leaf_size_ok(sized_page_shift(raw), level):
            return EntryProblem.PAGE_SIZE
        return None
    if nl >= level:
        return EntryProblem.LEVEL_ENCODING
    return None


def skipped_bits_mask(level: int, next_level: int) -> int:
    """DVA bits that a PDE at ``level`` pointing to a ``next_level`` table skips: they must be zero.

    A level-4 PDE pointing straight at a level-2 table skips level 3, whose index is DVA bits 38:30.
    """
    if next_level >= level - 1:
        return 0
    return ((1 << level_shift(level)) - 1) & ~((1 << level_shift(next_level + 1)) - 1)


def beyond_reach_mask(mode: int) -> int:
    """DVA bits above what a ``mode``-level table translates (none for six levels: all 64 bits are used)."""
    if mode >= MAX_LEVELS:
        return 0
    return ((1 << 64) - 1) & ~((1 << level_shift(mode + 1)) - 1)


def pde_counter(raw: int) -> int:
    """The seed-era merge counter kept in a PDE's ignored bits (8:1 hold bits 7:0, bit 63 holds bit 8)."""
    return ((raw & _COUNTER_HIGH) >> 55) | ((raw & _COUNTER_LOW) >> 1)


def with_pde_counter(raw: int, count: int) -> int:
    count &= 0x1FF
    return (raw & ~(_COUNTER_HIGH | _COUNTER_LOW)) | ((count & 0x100) << 55) | ((count & 0xFF) << 1)


_PERMS = (Perm.NONE, Perm.R, Perm.W, Perm.RW)


def _perms(raw: int) -> Perm:
    return _PERMS[(raw >> 61) & 3]


class AmdV1Format(PageTableFormat):
    """AMD I/O page tables v1.

    ``split_children_rw`` brings back the seed-era split that gave every child of a split superpage read
    and write permission (quirk ``amd-split-rw-children``); only the driver's engine uses it.
    """

    name = "amd-v1"
    addr_mask = ADDR_MASK
    present_mask = PR
    leaf_levels = LEAF_LEVELS
    hierarchical_perms = True

    def __init__(self, *, split_children_rw: bool = False) -> None:
        self.split_children_rw = split_children_rw

    # -- encoding (driver side) ----------------------------------------------------------------------

    def table_entry(self, table_maddr: int, level: int) -> int:
        """A PDE at ``level`` pointing at a ``level - 1`` table; IR and IW set so the leaf decides."""
        return PR | ((level - 1) << NEXT_LEVEL_SHIFT) | (table_maddr & ADDR_MASK) | IR | IW

    def pointer_entry(self, table_maddr: int, next_level: int) -> int:
        """A PDE pointing at a table of any lower level (a skip when ``next_level`` < level - 1)."""
        return PR | (next_level << NEXT_LEVEL_SHIFT) | (table_maddr & ADDR_MASK) | IR | IW

    def leaf_bits(self, perms: Perm, level: int, attrs: object | None = None) -> int:
        """A default-size leaf (NextLevel 0) with FC set, as Xen writes every leaf."""
        return PR | FC | ((int(perms) & 3) << 61)

    def sized_leaf(self, maddr: int, page_shift: int, perms: Perm, *, fc: bool = True) -> int:
        """A NextLevel-7 leaf for a page of 2**page_shift bytes (Xen never writes these; Linux does)."""
        bits = PR | (NL_SIZED << NEXT_LEVEL_SHIFT) | (IR if perms & Perm.R else 0) | (IW if perms & Perm.W else 0)
        return sized_leaf_address(maddr, page_shift) | bits | (FC if fc else 0)

    def split_leaf_bits(self, raw: int, level: int) -> int:
        if self.split_children_rw:
            return self.leaf_bits(Perm.RW, level - 1)
        return (raw & (FC | U | IR | IW)) | PR

    # -- decoding (hardware side) ------------------------------------------------------------------

    def decode(self, raw: int, level: int) -> Decoded:
        if not raw & PR:
            return Decoded(EntryKind.EMPTY, raw, level)
        nl = (raw >> NEXT_LEVEL_SHIFT) & 7
        perms = _PERMS[(raw >> 61) & 3]
        if NL_LEAF < nl < NL_SIZED and nl < level and not raw & PDE_RESERVED:  # the common pointer, first
            return Decoded(EntryKind.TABLE, raw, level, raw & ADDR_MASK, perms, next_level=nl)
        problem = entry_problem(raw, level)
        if problem is not None:
            return Decoded(EntryKind.MALFORMED, raw, level, perms=perms, problem=problem.value)
        if nl == NL_LEAF:
            return Decoded(EntryKind.LEAF, raw, level, raw & ADDR_MASK, perms, page_shift=level_shift(level))
        shift = sized_page_shift(raw)
        base = raw & ADDR_MASK & ~((1 << shift) - 1)
        return Decoded(EntryKind.LEAF, raw, level, base, perms, page_shift=shift)

    def is_table(self, raw: int, level: int) -> bool:
        """The first case of ``decode`` (the common pointer) as a bit test, for the software walk."""
        nl = (raw >> NEXT_LEVEL_SHIFT) & 7
        return bool(raw & PR) and NL_LEAF < nl < NL_SIZED and nl < level and not raw & PDE_RESERVED

    # -- vectorised views -------------------------------------------------------------------------

    @staticmethod
    def _nl(words: U64Array) -> npt.NDArray[np.uint64]:
        out: npt.NDArray[np.uint64] = (words >> np.uint64(NEXT_LEVEL_SHIFT)) & np.uint64(7)
        return out

    @staticmethod
    def _sized_shift_array(words: U64Array) -> npt.NDArray[np.int64]:
        field = (words & np.uint64(ADDR_MASK)) >> np.uint64(12)
        lowest_zero = ~field & (field + np.uint64(1))  # isolates the first zero bit (0 if all 40 are ones)
        ones = np.full(words.shape, _ADDR_BITS, dtype=np.int64)
        nz = lowest_zero != 0
        ones[nz] = np.log2(lowest_zero[nz].astype(np.float64)).astype(np.int64)
        return np.minimum(ones, _ADDR_BITS) + 13

    def table_entry_array(self, table_maddrs: U64Array, level: int) -> U64Array:
        fixed = PR | ((level - 1) << NEXT_LEVEL_SHIFT) | IR | IW
        out: U64Array = (table_maddrs & np.uint64(ADDR_MASK)) | np.uint64(fixed)
        return out

    def table_array(self, words: U64Array, level: int) -> npt.NDArray[np.bool_]:
        words = np.asarray(words, dtype=np.uint64)
        nl = self._nl(words)
        out: npt.NDArray[np.bool_] = (
            ((words & np.uint64(PR)) != 0)
            & (nl != np.uint64(NL_LEAF))
            & (nl != np.uint64(NL_SIZED))
            & (nl < np.uint64(level))
            & ((words & np.uint64(PDE_RESERVED)) == 0)
        )
        return out

    def malformed_array(self, words: U64Array, level: int) -> npt.NDArray[np.bool_]:
        words = np.asarray(words, dtype=np.uint64)
        nl = self._nl(words)
        leafish = (nl == np.uint64(NL_LEAF)) | (nl == np.uint64(NL_SIZED))
        reserved = np.where(leafish, words & np.uint64(PTE_RESERVED), words & np.uint64(PDE_RESERVED)) != 0
        bad = reserved.copy()
        if level in LEAF_LEVELS:
            sized = nl == np.uint64(NL_SIZED)
            if sized.any():
                shifts = self._sized_shift_array(words)
                size_ok = (shifts > level_shift(level)) & (shifts < level_shift(level + 1)) & (shifts <= 52)
                bad |= sized & ~size_ok
        else:
            bad |= leafish
        bad |= ~leafish & (nl >= np.uint64(level))
        out: npt.NDArray[np.bool_] = bad & ((words & np.uint64(PR)) != 0)
        return out

    def leaf_shift_array(self, words: U64Array, level: int) -> npt.NDArray[np.int64]:
        words = np.asarray(words, dtype=np.uint64)
        out = np.full(words.shape, level_shift(level), dtype=np.int64)
        sized = self._nl(words) == np.uint64(NL_SIZED)
        if sized.any():
            out[sized] = self._sized_shift_array(words[sized])
        return out

    def perms_array(self, words: U64Array, level: int) -> npt.NDArray[np.uint8]:
        words = np.asarray(words, dtype=np.uint64)
        out: npt.NDArray[np.uint8] = ((words >> np.uint64(61)) & np.uint64(3)).astype(np.uint8)
        return out
