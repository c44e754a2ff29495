"""VT-d's side of the fast batch engine: the second-level walk over arrays and what a translation does.

A plan exists while the device's context sits in the context cache (present, not pass-through): that is
what ``translate`` would use, so the batch never reads the context tables itself; otherwise the engine
asks ``translate`` for the next address, which loads the context cache exactly as the sequence would.
A miss filled from the arrays consults the not-present cache (caching mode) and the paging-structure
cache as ``translate`` does, and gives the address back to ``translate`` when that cache holds a level-2
entry that disagrees with memory (a stale entry is what the walk would start from).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from iommusim.hw.fastbatch import PERMS, BatchPlan, BoolArray, U8Array, U64Array, bump, swap_attrs
from iommusim.hw.fastwalk import LEAF, POINTER, STOP, Step, VecWalk, WalkRoot, walk_many
from iommusim.hw.iotlb import Iotlb
from iommusim.hw.vtd.caches import CtxInfo, NegativeCache, PagingStructureCache, PdeEntry
from iommusim.pagetable.format import level_shift
from iommusim.pagetable.vtd import VTD_SP, VtdSecondLevelFormat

if TYPE_CHECKING:
    from iommusim.hw.vtd.unit import VtdUnit

__all__ = ["VtdDecoder", "VtdPlan", "bypassing_caches"]

_ADDR = np.uint64(((1 << 52) - 1) & ~0xFFF)
_RW = np.uint64(3)


class VtdDecoder:
    """Second-level entries as one unit's ``VtdSecondLevelFormat`` decodes them, over arrays."""

    def __init__(self, fmt: VtdSecondLevelFormat, dram_limit: int) -> None:
        self.fmt = fmt
        self.dram_limit = dram_limit
        self.table_rsvd = np.uint64(fmt._table_rsvd)
        self.leaf_rsvd = {lv: np.uint64(m) for lv, m in fmt._leaf_rsvd.items()}

    def readable(self, mfns: U64Array) -> BoolArray:
        """The unit refuses (NEXT_TABLE_INVALID) a table not wholly inside DRAM."""
        out: BoolArray = mfns < np.uint64(max(0, self.dram_limit >> 12))
        return out

    def leaf1(self, raw: U64Array, need: int) -> tuple[BoolArray, U64Array, U8Array | None]:
        base = raw & _ADDR
        if need:
            good: BoolArray = (raw & np.uint64(int(self.leaf_rsvd[1]) | need)) == np.uint64(need)
            return good, base, None
        perms = (raw & _RW).astype(np.uint8)
        good = (perms != 0) & ((raw & self.leaf_rsvd[1]) == 0)
        return good, base, perms

    def step(self, raw: U64Array, level: int) -> Step:
        n = raw.size
        present = (raw & _RW) != 0
        perms = (raw & _RW).astype(np.uint8)
        addr = raw & _ADDR
        kind = np.full(n, STOP, dtype=np.int8)
        shift = np.full(n, level_shift(level), dtype=np.uint8)
        if level == 1:
            kind[present & ((raw & self.leaf_rsvd[1]) == 0)] = LEAF
            return Step(kind, addr, kind, perms, addr, shift)  # no pointers at level 1
        sp = (raw & np.uint64(VTD_SP)) != 0
        if level in self.fmt.superpage_levels:
            kind[present & sp & ((raw & self.leaf_rsvd[level]) == 0)] = LEAF
        kind[present & ~sp & ((raw & self.table_rsvd) == 0)] = POINTER
        nxt = np.full(n, level - 1, dtype=np.int8)
        return Step(kind, addr >> np.uint64(12), nxt, perms, addr, shift)


class VtdPlan(BatchPlan):
    fill_hook = True
    counts_reads = False

    def __init__(self, unit: VtdUnit, sid: int, ctx: CtxInfo) -> None:
        self.unit = unit
        self.sid = sid
        self.ctx = ctx
        self.tag = ctx.did
        self.iotlb = unit.iotlb
        self.counters = unit.counters_
        self.volatile = unit.fault_irq.handler is not None
        self.cm = bool(unit.cap.cm)
        self.multi = ctx.levels > 1
        self.pde_d = unit.pde_cache._c._d
        self.pde_cap = unit.pde_cache._c.capacity
        self.neg_d = unit.negative._c._d
        # what ``before_fill`` did to the other caches' counters, added up by ``account``
        self.tally = {"negative_misses": 0, "pde_hits": 0, "pde_misses": 0, "pde_fills": 0, "pde_evictions": 0}

    def exceptional(self, addrs: U64Array, accs: U8Array) -> BoolArray:
        if self.ctx.width >= 64:
            return np.zeros(addrs.shape, dtype=bool)
        out: BoolArray = addrs >= np.uint64(1 << self.ctx.width)
        return out

    def walk(self, addrs: U64Array, skip: BoolArray, need: int = 0) -> VecWalk:
        u = self.unit
        root = WalkRoot(self.ctx.slptptr >> 12, self.ctx.levels)
        return walk_many(u.memory, VtdDecoder(u.fmt, u.dram_limit), root, addrs, skip, need)

    def account(self, n: int, walks: int, reads: int) -> None:
        if n:
            bump(self.counters, "ctx_hits", n)
            d = self.unit.context_cache._c._d
            if self.sid in d:
                d.move_to_end(self.sid)
        bump(self.counters, "walks", walks)
        for name, k in self.tally.items():
            bump(self.counters, name, k)
            self.tally[name] = 0

    def before_fill(self, daddr: int, l1_mfn: int, l1_perms: int) -> bool:
        """The not-present cache (caching mode) and the paging-structure cache, as ``translate`` uses them
        on an IOTLB miss (the LRU cache operations written out: they run once per miss)."""
        did = self.tag
        if self.cm and (did, daddr >> 12) in self.neg_d:
            return False
        pde_d = self.pde_d
        key = (did, daddr >> 21)
        pde = pde_d.get(key) if self.multi else None
        if pde is not None and (pde.table != l1_mfn or pde.perms._value_ != l1_perms):
            return False  # the walk would start from a level-1 table memory no longer points to
        t = self.tally
        if self.cm:
            t["negative_misses"] += 1
        if self.multi:
            if pde is not None:
                pde_d.move_to_end(key)
                t["pde_hits"] += 1
            else:
                t["pde_misses"] += 1
                if l1_mfn >> 63 == 0:
                    if len(pde_d) >= self.pde_cap:
                        pde_d.popitem(last=False)
                        t["pde_evictions"] += 1
                    pde_d[key] = PdeEntry(l1_mfn, PERMS[l1_perms])
                    t["pde_fills"] += 1
        return True


@contextmanager
def bypassing_caches(unit: VtdUnit) -> Iterator[None]:
    """The IOTLB, paging-structure and not-present caches replaced by empty ones counting elsewhere."""
    iotlb, pde, neg = unit.iotlb, unit.pde_cache, unit.negative
    yield from swap_attrs(
        unit,
        {
            "iotlb": lambda: Iotlb(iotlb.capacity, page_shifts=iotlb.page_shifts, counters=Counter()),
            "pde_cache": lambda: PagingStructureCache(pde._c.capacity, Counter()),
            "negative": lambda: NegativeCache(neg._c.capacity, Counter()),
        },
    )
