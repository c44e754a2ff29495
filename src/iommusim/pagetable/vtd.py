"""Intel VT-d second-level paging entries (legacy mode): the one codec both the driver and the unit use.

An entry is 64 bits.  Bit 0 grants read, bit 1 write, and an entry is present exactly when one of them is
set (an empty entry is zero; there is no separate present bit).  Bit 7 (SP) turns an entry above level 1
into a leaf mapping a 2 MiB (level 2) or 1 GiB (level 3) page; bit 11 (SNP) asks for snooped accesses;
bit 62 (TM) marks a transient mapping for device TLBs; bits 51:12 hold the address.

What counts as reserved depends on the unit, so a format object is made for one unit:

* address bits at and above the host address width (HAW) are reserved in every present entry;
* bits 6:2 are reserved (this model's units report no second-level execute, memory-type or A/D support);
* SP is reserved at a level whose page size the unit does not list in CAP.SLLPS (always at levels 4, 5);
* in a superpage leaf the address bits below the page size are reserved;
* SNP and TM are reserved in non-leaf entries, SNP also in leaves when ECAP.SC is 0 and TM when ECAP.DT
  is 0;
* bit 7 of a level-1 entry and bits 10:8, 61:52 and 63 are ignored.

Permissions are ANDed over the walk: a table entry without W makes everything below it read-only.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from iommusim.errors import InvalidArgument
from iommusim.pagetable.format import Decoded, EntryKind, PageTableFormat, U64Array, level_shift
from iommusim.perms import Perm

__all__ = ["VTD_R", "VTD_SNP", "VTD_SP", "VTD_TM", "VTD_W", "VtdSecondLevelFormat"]

VTD_R: Final = 1 << 0
VTD_W: Final = 1 << 1
VTD_SP: Final = 1 << 7
VTD_SNP: Final = 1 << 11
VTD_TM: Final = 1 << 62
_RW: Final = VTD_R | VTD_W
_BITS_6_2: Final = 0x7C
_ADDR_FIELD: Final = ((1 << 52) - 1) & ~0xFFF
_MAX_LEVELS: Final = 5


class VtdSecondLevelFormat(PageTableFormat):
    """Second-level entries as one unit decodes them (its HAW, superpage sizes, SC and DT capabilities)."""

    name = "vtd-sl"
    present_mask = _RW
    addr_mask = _ADDR_FIELD
    hierarchical_perms = True

    def __init__(
        self,
        *,
        haw: int = 46,
        superpage_levels: frozenset[int] | set[int] = frozenset({2, 3}),
        snoop_control: bool = True,
        device_tlb: bool = True,
    ) -> None:
        if not 32 <= haw <= 52:
            raise InvalidArgument(f"host address width {haw} is outside 32..52 bits")
        bad = set(superpage_levels) - {2, 3}
        if bad:
            raise InvalidArgument(f"VT-d superpages exist at levels 2 (2 MiB) and 3 (1 GiB) only, not {sorted(bad)}")
        self.haw = haw
        self.superpage_levels = frozenset(superpage_levels)
        self.snoop_control = snoop_control
        self.device_tlb = device_tlb
        self.leaf_levels = frozenset({1}) | self.superpage_levels
        above_haw = _ADDR_FIELD & ~((1 << haw) - 1)
        common = above_haw | _BITS_6_2
        leaf_extra = (0 if snoop_control else VTD_SNP) | (0 if device_tlb else VTD_TM)
        #: reserved bits of a table (non-leaf) entry, and of a leaf, per level
        self._table_rsvd = common | VTD_SNP | VTD_TM
        self._leaf_rsvd = {1: common | leaf_extra}
        for lv in (2, 3):
            self._leaf_rsvd[lv] = common | leaf_extra | (((1 << level_shift(lv)) - 1) & ~0xFFF)

    def __repr__(self) -> str:
        sizes = "/".join(f"{1 << (level_shift(lv) - 20)}M" for lv in sorted(self.superpage_levels)) or "none"
        return (
            f"VtdSecondLevelFormat(haw={self.haw}, superpages={sizes}, "
            f"snoop_control={self.snoop_control}, device_tlb={self.device_tlb})"
        )

    # -- encoding ---------------------------------------------------------------------------------

    def table_entry(self, table_maddr: int, level: int) -> int:
        """Xen writes intermediate entries with R=W=1: the leaf decides the real permission."""
        return (table_maddr & _ADDR_FIELD) | _RW

    def leaf_bits(self, perms: Perm, level: int, attrs: object | None = None) -> int:
        """R/W from ``perms``, SP above level 1, SNP when ``attrs`` is true (Xen's iommu_snoop)."""
        if level != 1 and level not in self.superpage_levels:
            raise InvalidArgument(f"this unit has no superpages at level {level}")
        bits = (VTD_R if perms & Perm.R else 0) | (VTD_W if perms & Perm.W else 0)
        if level > 1:
            bits |= VTD_SP
        if attrs:
            bits |= VTD_SNP
        return bits

    def split_leaf_bits(self, raw: int, level: int) -> int:
        """Children of a split superpage keep R, W, SNP and TM; SP stays only if they are superpages too."""
        bits = raw & (_RW | VTD_SNP | VTD_TM)
        return bits | (VTD_SP if level - 1 > 1 else 0)

    # -- decoding ---------------------------------------------------------------------------------

    def decode(self, raw: int, level: int) -> Decoded:
        if not 1 <= level <= _MAX_LEVELS:
            raise InvalidArgument(f"VT-d second-level tables have levels 1 to {_MAX_LEVELS}, not {level}")
        if not raw & _RW:
            return Decoded(EntryKind.EMPTY, raw, level)
        perms = Perm(raw & _RW)
        addr = raw & _ADDR_FIELD
        if level == 1 or raw & VTD_SP:
            if level != 1 and level not in self.superpage_levels:
                return Decoded(
                    EntryKind.MALFORMED,
                    raw,
                    level,
                    problem=f"SP set at level {level}, a page size CAP.SLLPS does not report (reserved)",
                )
            bad = raw & self._leaf_rsvd[level]
            if bad:
                return Decoded(EntryKind.MALFORMED, raw, level, problem=f"reserved bits {bad:#x} set in a leaf")
            return Decoded(EntryKind.LEAF, raw, level, addr, perms, page_shift=level_shift(level))
        bad = raw & self._table_rsvd
        if bad:
            return Decoded(EntryKind.MALFORMED, raw, level, problem=f"reserved bits {bad:#x} set in a table entry")
        return Decoded(EntryKind.TABLE, raw, level, addr, perms, next_level=level - 1)

    def is_table(self, raw: int, level: int) -> bool:
        """A present, well-formed entry above level 1 without SP (the software walk's fast path)."""
        return level > 1 and bool(raw & _RW) and not raw & VTD_SP and not raw & self._table_rsvd

    # -- vectorised forms -------------------------------------------------------------------------

    def present_array(self, words: U64Array) -> npt.NDArray[np.bool_]:
        out: npt.NDArray[np.bool_] = (words & np.uint64(_RW)) != 0
        return out

    def table_entry_array(self, table_maddrs: U64Array, level: int) -> U64Array:
        out: U64Array = (table_maddrs & np.uint64(_ADDR_FIELD)) | np.uint64(_RW)
        return out

    def table_array(self, words: U64Array, level: int) -> npt.NDArray[np.bool_]:
        if level == 1:
            return np.zeros(words.shape, dtype=bool)
        out: npt.NDArray[np.bool_] = ((words & np.uint64(_RW)) != 0) & ((words & np.uint64(VTD_SP)) == 0)
        return out

    def malformed_array(self, words: U64Array, level: int) -> npt.NDArray[np.bool_]:
        present = (words & np.uint64(_RW)) != 0
        if level == 1:
            bad = (words & np.uint64(self._leaf_rsvd[1])) != 0
        else:
            sp = (words & np.uint64(VTD_SP)) != 0
            if level in self.superpage_levels:
                leaf_bad = (words & np.uint64(self._leaf_rsvd[level])) != 0
            else:
                leaf_bad = np.ones(words.shape, dtype=bool)
            table_bad = (words & np.uint64(self._table_rsvd)) != 0
            bad = np.where(sp, leaf_bad, table_bad)
        out: npt.NDArray[np.bool_] = present & bad
        return out

    def perms_array(self, words: U64Array, level: int) -> npt.NDArray[np.uint8]:
        return (words & np.uint64(_RW)).astype(np.uint8)
