"""The Python baselines: a plain-Python radix-table model, and a numpy fill of as many entries.

``PyRadix`` is what someone would write in an afternoon: four levels of 512-slot Python lists, a table
made on first use, one method call per page inserted and per address walked.  Its insert is the yardstick
of the per-page map through the whole stack (driver, hardware flush, generic layer).  ``numpy_fill`` writes
as many 64-bit leaves as a bulk map of the same number of pages, with ``np.arange`` arithmetic into an
array allocated beforehand: the floor for any bulk path that produces its entries with numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from iommusim.bench.workloads import LEAF_BITS, MFN_BASE

__all__ = ["PyRadix", "numpy_fill", "py_insert_pages"]

LEVELS = 4
_PRESENT = 0x3
_ADDR_MASK = 0x000F_FFFF_FFFF_F000
_U64 = (1 << 64) - 1
_Table = list[Any]  # 512 slots: child tables above level 1, integer leaves (0 = absent) at level 1


class PyRadix:
    """A 4-level radix tree of 512-entry Python lists mapping device frames to leaf entries."""

    __slots__ = ("root", "tables")

    def __init__(self) -> None:
        self.root: _Table = [None] * 512
        self.tables = 1

    def insert(self, dfn: int, entry: int) -> None:
        """Write the 4 KiB leaf of ``dfn``, making the tables on the way that do not exist yet."""
        t = self.root
        for shift in (27, 18):
            i = (dfn >> shift) & 511
            nxt = t[i]
            if nxt is None:
                nxt = t[i] = [None] * 512
                self.tables += 1
            t = nxt
        i = (dfn >> 9) & 511
        nxt = t[i]
        if nxt is None:
            nxt = t[i] = [0] * 512
            self.tables += 1
        nxt[dfn & 511] = entry

    def walk(self, daddr: int) -> int | None:
        """The machine address ``daddr`` reaches, or None where an entry on the way is absent."""
        dfn = daddr >> 12
        t = self.root[(dfn >> 27) & 511]
        if t is None:
            return None
        t = t[(dfn >> 18) & 511]
        if t is None:
            return None
        t = t[(dfn >> 9) & 511]
        if t is None:
            return None
        e: int = t[dfn & 511]
        if not e & _PRESENT:
            return None
        return (e & _ADDR_MASK) | (daddr & 0xFFF)

    def walk_checksum(self, daddrs: list[int]) -> tuple[int, int]:
        """(sum of the machine addresses modulo 2**64, faults) over ``daddrs``, as the C program counts."""
        total = 0
        faults = 0
        walk = self.walk
        for a in daddrs:
            m = walk(a)
            if m is None:
                faults += 1
            else:
                total += m
        return total & _U64, faults

    def leaves(self) -> npt.NDArray[np.uint64]:
        """Every level-1 slot of the tree in device-frame order (absent tables skipped)."""
        out: list[int] = []
        for l3 in self.root:
            if l3 is None:
                continue
            for l2 in l3:
                if l2 is None:
                    continue
                for l1 in l2:
                    if l1 is not None:
                        out.extend(l1)
        return np.asarray(out, dtype=np.uint64)

    def leaf_sum(self) -> int:
        return int(self.leaves().sum(dtype=np.uint64))


def py_insert_pages(tree: PyRadix, pages: int, mfn_base: int = MFN_BASE) -> None:
    """Insert device frames ``0 .. pages-1`` one call at a time (the timed body of the Python baseline)."""
    insert = tree.insert
    for dfn in range(pages):
        insert(dfn, ((mfn_base + dfn) << 12) | LEAF_BITS)


def numpy_fill(out: npt.NDArray[np.uint64], mfn_base: int = MFN_BASE, leaf_bits: int = LEAF_BITS) -> None:
    """Fill ``out`` with the leaves of device frames ``0 .. len(out)-1`` (the bulk-map floor).

    One ``np.arange`` stepping a page at a time from the first leaf gives every leaf (the flag bits do not
    overlap the address, so adding them is OR-ing them), and one copy puts it in place.
    """
    first = (mfn_base << 12) + leaf_bits
    np.copyto(out, np.arange(first, first + (out.size << 12), 1 << 12, dtype=np.uint64))
