"""The unit's caches besides the IOTLB: context cache, paging-structure cache, not-present cache, device TLBs.

All of them are bounded LRU caches (``hw.iotlb.LruCache``) and forget only what an invalidation covers or
what capacity evicts.  Not-present entries are cached only by units reporting caching mode (CAP.CM=1);
those entries are dropped by invalidations naming domain id 0, the id the specification reserves for them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from iommusim.hw.iotlb import LruCache
from iommusim.perms import Perm

__all__ = ["ContextCache", "CtxInfo", "DeviceTlb", "NegativeCache", "PagingStructureCache"]


@dataclass(frozen=True, slots=True)
class CtxInfo:
    """A decoded, valid context entry (or, with ``present`` false, a cached not-present one)."""

    present: bool
    did: int = 0
    t: int = 0
    slptptr: int = 0
    levels: int = 0
    width: int = 0  # input address bits this context translates (min of MGAW and its AGAW)
    fpd: bool = False


def _sid_mask(fm: int) -> int:
    """Function mask FM: 0 compares every SID bit, 1..3 ignore the top 1..3 bits of the function number."""
    return 0xFFFF & ~({0: 0, 1: 0b100, 2: 0b110, 3: 0b111}[fm & 3])


class ContextCache:
    """Decoded context entries by source id, tagged with their domain id."""

    def __init__(self, capacity: int, counters: Counter[str]) -> None:
        self._c: LruCache[int, CtxInfo] = LruCache(capacity, counters, "ctx")

    def get(self, sid: int) -> CtxInfo | None:
        return self._c.get(sid)

    def put(self, sid: int, info: CtxInfo) -> None:
        self._c.put(sid, info)

    def invalidate_all(self) -> int:
        return self._c.clear()

    def invalidate_domain(self, did: int) -> int:
        victims = [sid for sid, info in self._c.items() if info.did == did]
        for sid in victims:
            self._c.pop(sid)
        return len(victims)

    def invalidate_device(self, did: int, sid: int, fm: int) -> int:
        mask = _sid_mask(fm)
        victims = [s for s, info in self._c.items() if info.did == did and (s & mask) == (sid & mask)]
        for s in victims:
            self._c.pop(s)
        return len(victims)

    def entries(self) -> list[tuple[int, CtxInfo]]:
        """Every cached context as (source id, context), least recently used first; for inspection tools."""
        return self._c.items()

    def __len__(self) -> int:
        return len(self._c)


@dataclass(frozen=True, slots=True)
class PdeEntry:
    table: int  # frame of the level-1 table
    perms: Perm  # permissions ANDed over the levels above it


class PagingStructureCache:
    """Level-2 (PDE) entries that point to level-1 tables, by (domain id, address >> 21).

    A hit lets the walk start at level 1.  A page-selective invalidation with IH=1 keeps these entries:
    software promises it changed only leaves.
    """

    def __init__(self, capacity: int, counters: Counter[str]) -> None:
        self._c: LruCache[tuple[int, int], PdeEntry] = LruCache(capacity, counters, "pde")

    def get(self, did: int, daddr: int) -> PdeEntry | None:
        return self._c.get((did, daddr >> 21))

    def put(self, did: int, daddr: int, entry: PdeEntry) -> None:
        self._c.put((did, daddr >> 21), entry)

    def invalidate_all(self) -> int:
        return self._c.clear()

    def invalidate_domain(self, did: int) -> int:
        victims = [k for k, _ in self._c.items() if k[0] == did]
        for k in victims:
            self._c.pop(k)
        return len(victims)

    def invalidate_range(self, did: int, base: int, size: int) -> int:
        first, last = base >> 21, (base + size - 1) >> 21
        victims = [k for k, _ in self._c.items() if k[0] == did and first <= k[1] <= last]
        for k in victims:
            self._c.pop(k)
        return len(victims)

    def __len__(self) -> int:
        return len(self._c)


class NegativeCache:
    """Not-present translations (caching mode only), by (domain id of the context, 4 KiB page)."""

    def __init__(self, capacity: int, counters: Counter[str]) -> None:
        self._c: LruCache[tuple[int, int], bool] = LruCache(capacity, counters, "negative")

    def hit(self, did: int, daddr: int) -> bool:
        return self._c.get((did, daddr >> 12)) is not None

    def put(self, did: int, daddr: int) -> None:
        self._c.put((did, daddr >> 12), True)

    def invalidate_all(self) -> int:
        return self._c.clear()

    def invalidate(self, did: int, base: int = 0, size: int | None = None) -> int:
        """Drop the entries of ``did`` (of every domain when ``did`` is 0) in the range (or everywhere)."""
        first = base >> 12
        last = None if size is None else (base + size - 1) >> 12
        victims = [
            k
            for k, _ in self._c.items()
            if (did == 0 or k[0] == did) and k[1] >= first and (last is None or k[1] <= last)
        ]
        for k in victims:
            self._c.pop(k)
        return len(victims)

    def __len__(self) -> int:
        return len(self._c)


@dataclass(frozen=True, slots=True)
class AtsEntry:
    out: int
    page_shift: int
    perms: Perm


class DeviceTlb:
    """The translations devices fetched with ATS translation requests (their address translation caches)."""

    def __init__(self, capacity: int, counters: Counter[str]) -> None:
        self.capacity = capacity
        self.counters = counters
        self._by_sid: dict[int, LruCache[tuple[int, int], AtsEntry]] = {}

    def put(self, sid: int, daddr: int, entry: AtsEntry) -> None:
        cache = self._by_sid.setdefault(sid, LruCache(self.capacity, self.counters, "devtlb"))
        cache.put((daddr >> entry.page_shift, entry.page_shift), entry)

    def lookup(self, sid: int, daddr: int) -> AtsEntry | None:
        cache = self._by_sid.get(sid)
        if cache is None:
            return None
        for key, e in cache.items():
            if key[0] == daddr >> key[1]:
                return e
        return None

    def invalidate(self, sid: int, base: int, size: int) -> int:
        cache = self._by_sid.get(sid)
        if cache is None:
            return 0
        victims = [k for k, _ in cache.items() if (k[0] << k[1]) < base + size and ((k[0] + 1) << k[1]) > base]
        for k in victims:
            cache.pop(k)
        return len(victims)

    def invalidate_all(self) -> int:
        n = sum(len(c) for c in self._by_sid.values())
        self._by_sid.clear()
        return n

    def entries(self) -> list[tuple[int, int, AtsEntry]]:
        """Every cached translation as (source id, input address of its page, entry), for inspection tools."""
        return [(sid, page << shift, e) for sid, c in sorted(self._by_sid.items()) for (page, shift), e in c.items()]
