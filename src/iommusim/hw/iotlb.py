"""Translation caches as hardware keeps them: bounded, least-recently-used, tagged by domain.

An IOTLB entry remembers one translation of one page (of whatever size the walk found) under a tag: the
domain id on VT-d and AMD, the VMID on the SMMU.  It is dropped only by eviction or by an invalidation that
covers it; an invalidation removes every entry whose page overlaps the invalidated range and nothing else,
so an entry that no invalidation covered keeps translating, stale or not.  That is what makes a missing
flush observable.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, NamedTuple, TypeVar

from iommusim.errors import InvalidArgument
from iommusim.perms import Perm

__all__ = ["Iotlb", "IotlbEntry", "LruCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """A bounded map that forgets its least recently used entry first."""

    def __init__(self, capacity: int, counters: Counter[str] | None = None, prefix: str = "cache") -> None:
        if capacity < 1:
            raise InvalidArgument("a cache holds at least one entry")
        self.capacity = capacity
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.prefix = prefix
        self._d: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        v = self._d.get(key)
        if v is None:
            self.counters[f"{self.prefix}_misses"] += 1
            return None
        self._d.move_to_end(key)
        self.counters[f"{self.prefix}_hits"] += 1
        return v

    def peek(self, key: K) -> V | None:
        return self._d.get(key)

    def put(self, key: K, value: V) -> None:
        if key in self._d:
            self._d.move_to_end(key)
        elif len(self._d) >= self.capacity:
            self._d.popitem(last=False)
            self.counters[f"{self.prefix}_evictions"] += 1
        self._d[key] = value
        self.counters[f"{self.prefix}_fills"] += 1

    def pop(self, key: K) -> V | None:
        return self._d.pop(key, None)

    def clear(self) -> int:
        n = len(self._d)
        self._d.clear()
        return n

    def keys(self) -> list[K]:
        return list(self._d)

    def items(self) -> list[tuple[K, V]]:
        """Least recently used first."""
        return list(self._d.items())

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: object) -> bool:
        return key in self._d


class IotlbEntry(NamedTuple):
    """One cached translation (immutable; a named tuple because a batch creates one per IOTLB miss and a
    tuple is built several times faster than a frozen dataclass)."""

    tag: int  # domain id / VMID the entry belongs to
    page: int  # input address >> page_shift
    page_shift: int
    out: int  # output (machine) address of the page
    perms: Perm
    negative: bool = False  # a cached "not present" result (VT-d caching mode)

    @property
    def daddr(self) -> int:
        return self.page << self.page_shift

    @property
    def size(self) -> int:
        return 1 << self.page_shift

    def translate(self, daddr: int) -> int:
        return self.out | (daddr & (self.size - 1))


_Key = tuple[int, int, int]


class Iotlb:
    """An IOTLB with LRU replacement, tagged by domain, caching pages of several sizes."""

    def __init__(
        self,
        capacity: int = 1024,
        *,
        page_shifts: tuple[int, ...] = (12, 21, 30),
        counters: Counter[str] | None = None,
        record: bool = False,
    ) -> None:
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.page_shifts = tuple(sorted(set(page_shifts)))
        self._cache: LruCache[_Key, IotlbEntry] = LruCache(capacity, self.counters, "iotlb")
        self._by_tag: dict[int, dict[_Key, None]] = {}
        #: How many entries of each page size are cached, and the sizes with any (a lookup tries only those:
        #: an AMD unit allows 41 sizes but holds one or two).
        self._shift_count: dict[int, int] = {}
        self._live_shifts: tuple[int, ...] = ()
        #: With ``record``, every hit, miss, fill, eviction and invalidation as (event, tag, address).
        self.events: list[tuple[str, int, int]] | None = [] if record else None

    @property
    def capacity(self) -> int:
        return self._cache.capacity

    def __len__(self) -> int:
        return len(self._cache)

    def _event(self, kind: str, tag: int, addr: int) -> None:
        if self.events is not None:
            self.events.append((kind, tag, addr))

    def _count_shift(self, shift: int, delta: int) -> None:
        n = self._shift_count.get(shift, 0) + delta
        if n:
            self._shift_count[shift] = n
        else:
            self._shift_count.pop(shift, None)
        if (n == 0) != (n - delta == 0):
            self._live_shifts = tuple(sorted(self._shift_count))

    def probe(self, tag: int, daddr: int) -> tuple[_Key, IotlbEntry] | None:
        """The entry a lookup would hit, and its key, without counting or touching anything."""
        d = self._cache._d
        for shift in self._live_shifts:
            key = (tag, daddr >> shift, shift)
            e = d.get(key)
            if e is not None:
                return key, e
        return None

    def touch(self, key: _Key, daddr: int, count: bool = True) -> None:
        """What a hit on ``key`` does besides answering: it becomes most recently used (and is counted)."""
        self._cache._d.move_to_end(key)
        if count:
            self.counters["iotlb_hits"] += 1
        self._event("hit", key[0], daddr)

    def lookup(self, tag: int, daddr: int) -> IotlbEntry | None:
        d = self._cache._d
        for shift in self._live_shifts:
            key = (tag, daddr >> shift, shift)
            e = d.get(key)
            if e is not None:
                d.move_to_end(key)
                self.counters["iotlb_hits"] += 1
                self._event("hit", tag, daddr)
                return e
        self.counters["iotlb_misses"] += 1
        self._event("miss", tag, daddr)
        return None

    def insert(self, entry: IotlbEntry) -> int:
        """Cache ``entry``; returns how many entries it pushed out (0 or 1)."""
        if entry.page_shift not in self.page_shifts:
            raise InvalidArgument(f"this IOTLB does not hold {1 << entry.page_shift:#x}-byte pages")
        key = (entry.tag, entry.page, entry.page_shift)
        d = self._cache._d
        evicted = 0
        if key not in d:
            if len(d) >= self._cache.capacity:
                old_key, _ = d.popitem(last=False)
                self._untag(old_key)
                self._count_shift(old_key[2], -1)
                self.counters["iotlb_evictions"] += 1
                self._event("evict", old_key[0], old_key[1] << old_key[2])
                evicted = 1
            self._count_shift(entry.page_shift, 1)
        d[key] = entry
        d.move_to_end(key)
        self._by_tag.setdefault(entry.tag, {})[key] = None
        self.counters["iotlb_fills"] += 1
        self._event("fill", entry.tag, entry.daddr)
        return evicted

    def _untag(self, key: _Key) -> None:
        keys = self._by_tag.get(key[0])
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._by_tag[key[0]]

    def _drop(self, key: _Key) -> None:
        if self._cache._d.pop(key, None) is not None:
            self._count_shift(key[2], -1)
        self._untag(key)

    # -- invalidation ---------------------------------------------------------------------------------

    def invalidate_all(self) -> int:
        n = len(self._cache)
        self._cache.clear()
        self._by_tag.clear()
        self._shift_count.clear()
        self._live_shifts = ()
        self.counters["iotlb_inv_global"] += 1
        self.counters["iotlb_inv_entries"] += n
        self._event("inv-all", -1, 0)
        return n

    def invalidate_tag(self, tag: int) -> int:
        keys = list(self._by_tag.get(tag, {}))
        for key in keys:
            self._drop(key)
        self.counters["iotlb_inv_domain"] += 1
        self.counters["iotlb_inv_entries"] += len(keys)
        self._event("inv-domain", tag, 0)
        return len(keys)

    def invalidate_range(self, tag: int, daddr: int, size: int) -> int:
        """Drop every entry of ``tag`` whose page overlaps ``[daddr, daddr + size)``."""
        if size <= 0:
            raise InvalidArgument("an invalidation covers at least one byte")
        end = daddr + size
        victims: list[_Key] = []
        tagged = self._by_tag.get(tag)
        if tagged:
            if size >> 12 <= 16:
                for shift in self.page_shifts:
                    for page in range(daddr >> shift, ((end - 1) >> shift) + 1):
                        if (tag, page, shift) in tagged:
                            victims.append((tag, page, shift))
            else:
                victims = [k for k in tagged if (k[1] << k[2]) < end and ((k[1] + 1) << k[2]) > daddr]
        for key in victims:
            self._drop(key)
        self.counters["iotlb_inv_page"] += 1
        self.counters["iotlb_inv_entries"] += len(victims)
        self._event("inv-page", tag, daddr)
        return len(victims)

    def entries(self) -> Iterator[IotlbEntry]:
        """Least recently used first."""
        return iter(list(self._cache._d.values()))
