"""Per-frame ownership and type, as Xen's ``struct page_info`` records them, and the E820 memory map.

Hardware-domain IOMMU set-up decides from these what to map and how: a page the hardware domain owns is
mapped writable only if its type is writable (or it has no type reference at all), and the E820 type of a
frame decides whether the identity map covers it.  The table is dense over installed RAM (numpy arrays), so
"every page this domain owns" is one vectorised query.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from iommusim.errors import InvalidArgument

__all__ = [
    "DOMID_INVALID",
    "DOMID_IO",
    "DOMID_XEN",
    "E820Entry",
    "E820Map",
    "E820Type",
    "PageTable",
    "PageType",
]

DOMID_XEN = 0x7FF2  # pages owned by the hypervisor itself
DOMID_IO = 0x7FF1
DOMID_INVALID = 0x7FF4  # a free page
_NO_GFN = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


class PageType(IntEnum):
    """The type a page is validated as (Xen's PGT_*); only writable pages are device-writable."""

    NONE = 0
    L1_PAGE_TABLE = 1
    L2_PAGE_TABLE = 2
    L3_PAGE_TABLE = 3
    L4_PAGE_TABLE = 4
    SEG_DESC = 5
    SHARED = 6
    WRITABLE = 7


class E820Type(IntEnum):
    RAM = 1  # conventional memory
    RESERVED = 2
    ACPI = 3
    NVS = 4
    UNUSABLE = 5


@dataclass(frozen=True, slots=True)
class E820Entry:
    start_pfn: int
    count: int
    type: E820Type

    @property
    def end_pfn(self) -> int:
        return self.start_pfn + self.count


class E820Map:
    """Firmware's memory map: sorted, non-overlapping ranges; frames outside every range are holes."""

    def __init__(self, entries: list[E820Entry]) -> None:
        ordered = sorted(entries, key=lambda e: e.start_pfn)
        for a, b in itertools.pairwise(ordered):
            if a.end_pfn > b.start_pfn:
                raise InvalidArgument(f"E820 ranges overlap at pfn {b.start_pfn:#x}")
        self.entries = ordered

    def type_of(self, pfn: int) -> E820Type | None:
        for e in self.entries:
            if e.start_pfn <= pfn < e.end_pfn:
                return e.type
        return None

    def types_of(self, pfns: npt.NDArray[np.int64]) -> npt.NDArray[np.int8]:
        """Vectorised ``type_of``: 0 where a frame is in a hole."""
        out = np.zeros(pfns.shape, dtype=np.int8)
        for e in self.entries:
            out[(pfns >= e.start_pfn) & (pfns < e.end_pfn)] = int(e.type)
        return out

    def ram_end_pfn(self) -> int:
        ends = [e.end_pfn for e in self.entries if e.type == E820Type.RAM]
        return max(ends, default=0)


class PageTable:
    """Ownership, type and M2P entry of every installed RAM frame."""

    def __init__(self, frames: int) -> None:
        self.frames = frames
        self.owner: npt.NDArray[np.int32] = np.full(frames, DOMID_INVALID, dtype=np.int32)
        self.ptype: npt.NDArray[np.uint8] = np.zeros(frames, dtype=np.uint8)
        self.type_count: npt.NDArray[np.uint32] = np.zeros(frames, dtype=np.uint32)
        #: machine-to-phys: the guest frame a PV guest gave each page (all ones where none).
        self.m2p: npt.NDArray[np.uint64] = np.full(frames, _NO_GFN, dtype=np.uint64)

    def _check(self, mfn: int, count: int = 1) -> None:
        if mfn < 0 or mfn + count > self.frames:
            raise InvalidArgument(f"frames {mfn:#x}+{count} are not installed RAM")

    def set_owner(self, mfn: int, count: int, domid: int) -> None:
        self._check(mfn, count)
        self.owner[mfn : mfn + count] = domid

    def set_type(self, mfn: int, ptype: PageType, count: int = 1, type_count: int = 1) -> None:
        self._check(mfn, count)
        self.ptype[mfn : mfn + count] = int(ptype)
        self.type_count[mfn : mfn + count] = type_count if ptype != PageType.NONE else 0

    def owned_by(self, domid: int) -> npt.NDArray[np.int64]:
        """Every frame the domain owns, ascending (its page list)."""
        return np.nonzero(self.owner == domid)[0].astype(np.int64)

    def device_writable(self, mfns: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Xen's rule: writable if the page has no type reference or is of writable type."""
        out: npt.NDArray[np.bool_] = (self.type_count[mfns] == 0) | (self.ptype[mfns] == PageType.WRITABLE)
        return out
