"""AMD-Vi's side of the fast batch engine: the v1 walk over arrays (skipped levels, NextLevel 0 and 7).

A plan exists while the device's DTE sits in the DTE cache and describes a walk (V=1, TV=1, no reserved
bits, paging mode 1..the unit's levels) without a device-side IOTLB (DTE.I, whose ATC the engine does not
model); addresses in the exclusion range, beyond the mode's reach, or asking for rights the DTE denies are
answered by ``translate``, as is everything the walk refuses.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from iommusim.hw.amd import regs
from iommusim.hw.amd.structs import Dte
from iommusim.hw.fastbatch import BatchPlan, BoolArray, U8Array, U64Array, bump, swap_attrs
from iommusim.hw.fastwalk import LEAF, POINTER, STOP, Step, VecWalk, WalkRoot, walk_many
from iommusim.hw.iotlb import Iotlb
from iommusim.machine.memory import MachineMemory
from iommusim.pagetable.amd import (
    LEAF_LEVELS,
    NL_LEAF,
    NL_SIZED,
    PDE_RESERVED,
    PR,
    PTE_RESERVED,
    AmdV1Format,
    beyond_reach_mask,
)
from iommusim.pagetable.format import level_shift

if TYPE_CHECKING:
    from iommusim.hw.amd.unit import AmdIommu

__all__ = ["AmdDecoder", "AmdPlan", "bypassing_caches", "excluded"]

_LOW52 = np.uint64((1 << 52) - 1)
_ONE = np.uint64(1)


class AmdDecoder:
    """v1 entries as ``walk_v1`` reads them, over arrays."""

    def __init__(self, memory: MachineMemory, max_levels: int) -> None:
        self.max_mfn = np.uint64(memory.max_mfn)
        self.max_levels = max_levels

    def readable(self, mfns: U64Array) -> BoolArray:
        out: BoolArray = mfns <= self.max_mfn
        return out

    def leaf1(self, raw: U64Array, need: int) -> tuple[BoolArray, U64Array, U8Array | None]:
        """A present NextLevel-0 leaf without reserved bits (NextLevel-7 pages go to ``step``)."""
        base = raw & _LOW52 & ~np.uint64(0xFFF)
        mask = PR | (7 << 9) | PTE_RESERVED
        if need:
            good: BoolArray = (raw & np.uint64(mask | need << 61)) == np.uint64(PR | need << 61)
            return good, base, None
        good = (raw & np.uint64(mask)) == np.uint64(PR)
        return good, base, ((raw >> np.uint64(61)) & np.uint64(3)).astype(np.uint8)

    def step(self, raw: U64Array, level: int) -> Step:
        n = raw.size
        present = (raw & np.uint64(PR)) != 0
        nl = ((raw >> np.uint64(9)) & np.uint64(7)).astype(np.int8)
        perms = ((raw >> np.uint64(61)) & np.uint64(3)).astype(np.uint8)
        kind = np.full(n, STOP, dtype=np.int8)
        shift = np.full(n, level_shift(level), dtype=np.uint8)
        ptr = present & (nl != NL_LEAF) & (nl != NL_SIZED) & (nl < level) & (nl <= self.max_levels)
        ptr &= (raw & np.uint64(PDE_RESERVED)) == 0
        kind[ptr] = POINTER
        if level in LEAF_LEVELS:
            leafish = present & ((raw & np.uint64(PTE_RESERVED)) == 0)
            kind[leafish & (nl == NL_LEAF)] = LEAF
            sized = leafish & (nl == NL_SIZED)
            if sized.any():
                s = AmdV1Format._sized_shift_array(raw[sized])
                good = (s > level_shift(level)) & (s < level_shift(level + 1)) & (s <= 52)
                idx = np.flatnonzero(sized)
                kind[idx[good]] = LEAF
                shift[idx] = s.astype(np.uint8)
        low = (_ONE << shift.astype(np.uint64)) - _ONE
        base = raw & _LOW52 & ~low
        nxt_mfn = (raw & _LOW52) >> np.uint64(12)
        return Step(kind, nxt_mfn, nl, perms, base, shift)


class AmdPlan(BatchPlan):
    def __init__(self, unit: AmdIommu, devid: int, dte: Dte) -> None:
        self.unit = unit
        self.devid = devid
        self.dte = dte
        self.tag = dte.domain_id
        self.iotlb = unit.iotlb
        self.counters = unit.stats
        self.volatile = unit.irq_handler is not None
        self.dte_perms = int(dte.ir) | (int(dte.iw) << 1)

    def exceptional(self, addrs: U64Array, accs: U8Array) -> BoolArray:
        denied = ~self.dte_perms & 3
        out: BoolArray = (accs & np.uint8(denied)) != 0 if denied else np.zeros(addrs.shape, dtype=bool)
        if beyond_reach_mask(self.dte.mode):  # the mode translates fewer than 64 bits
            out |= addrs >= np.uint64(1 << (12 + 9 * self.dte.mode))
        ex = excluded(self.unit, self.dte, addrs)
        return out if ex is None else out | ex

    def walk(self, addrs: U64Array, skip: BoolArray, need: int = 0) -> VecWalk:
        u = self.unit
        root = WalkRoot(self.dte.root >> 12, self.dte.mode, perms=self.dte_perms, skips=True)
        return walk_many(u.memory, AmdDecoder(u.memory, u.paging_levels), root, addrs, skip, need)

    def account(self, n: int, walks: int, reads: int) -> None:
        s = self.counters
        if n:
            bump(s, "translations", n)
            bump(s, "dte_cache_hits", n)
            d = self.unit.dte_cache._d
            if self.devid in d:
                d.move_to_end(self.devid)
            self.unit._atc.pop(self.devid, None)
        bump(s, "walks", walks)
        bump(s, "walk_reads", reads)


def excluded(unit: AmdIommu, dte: Dte, addrs: U64Array) -> BoolArray | None:
    """Addresses in the exclusion range (they pass untranslated), or None when it does not apply."""
    ex = unit._exbase.value
    if ex & regs.EXCL_ENABLE and (ex & regs.EXCL_ALLOW or dte.allow_exclusion):
        lo, hi = ex & regs.BASE_ADDR_MASK, unit._exlimit.value | 0xFFF
        out: BoolArray = (addrs >= np.uint64(lo)) & (addrs <= np.uint64(hi))
        return out
    return None


@contextmanager
def bypassing_caches(unit: AmdIommu) -> Iterator[None]:
    """The IOTLB and the devices' remote IOTLBs replaced by empty ones counting elsewhere."""
    iotlb = unit.iotlb
    yield from swap_attrs(
        unit,
        {
            "iotlb": lambda: Iotlb(iotlb.capacity, page_shifts=iotlb.page_shifts, counters=Counter()),
            "_atc": dict,
        },
    )
