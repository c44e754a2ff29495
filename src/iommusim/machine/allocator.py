"""The page allocator: hypervisor pages (tables, queues, device tables) and domain memory.

Hypervisor pages come from the top of RAM downwards, domain memory from the bottom upwards, so that the
two never interleave and runs stay deterministic.  Every hypervisor allocation is accounted to an owner
string (``"d1:iommu-pt"``, ``"vtd0:qi"``...), which is how tests prove that teardown gave everything back,
and every one of them passes through the failure-injection hook that "fails the Nth allocation".
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from iommusim.errors import InvalidArgument, OutOfMemory
from iommusim.frames import Mfn
from iommusim.machine.memory import MachineMemory
from iommusim.machine.pages import DOMID_INVALID, DOMID_XEN, PageTable, PageType

__all__ = ["AllocationFailurePlan", "PageAllocator"]


@dataclass
class AllocationFailurePlan:
    """Which future hypervisor allocations fail: the ``nth`` one from now (1-based), or every one."""

    nth: int | None = None
    every: bool = False
    owner_prefix: str | None = None  # only count allocations whose owner starts with this
    seen: int = 0
    fired: list[str] = field(default_factory=list)

    def should_fail(self, owner: str) -> bool:
        if self.owner_prefix is not None and not owner.startswith(self.owner_prefix):
            return False
        if self.every:
            self.fired.append(owner)
            return True
        if self.nth is None:
            return False
        self.seen += 1
        if self.seen == self.nth:
            self.fired.append(owner)
            return True
        return False


class PageAllocator:
    """Allocates frames of installed RAM ``[0, ram_frames)`` and records who holds them."""

    def __init__(self, memory: MachineMemory, pages: PageTable, *, reserved_low_frames: int = 256) -> None:
        if pages.frames - 1 > memory.max_mfn:
            raise InvalidArgument("installed RAM does not fit in the physical address width")
        self.memory = memory
        self.pages = pages
        self._lock = threading.Lock()
        self._low = reserved_low_frames  # frames below this are firmware's: never handed out
        self._high = pages.frames  # hypervisor pages come from below this mark
        self._xen_free: list[int] = []  # freed single hypervisor frames, reused LIFO
        self._domain_free: list[tuple[int, int]] = []  # freed domain extents (start, count)
        self._domain_extents: dict[int, list[tuple[int, int]]] = {}  # extents each domid was given
        self._owner_of: dict[int, str] = {}
        self.in_use: Counter[str] = Counter()
        self.allocations = 0  # hypervisor allocations attempted, including injected failures
        self.frees = 0
        self.failure: AllocationFailurePlan | None = None

    # -- failure injection ------------------------------------------------------------------------

    def fail_nth(self, n: int, *, owner_prefix: str | None = None) -> AllocationFailurePlan:
        """Make the n-th hypervisor allocation from now fail with ENOMEM (once)."""
        if n < 1:
            raise InvalidArgument("allocations are counted from 1")
        self.failure = AllocationFailurePlan(nth=n, owner_prefix=owner_prefix)
        return self.failure

    def fail_all(self, *, owner_prefix: str | None = None) -> AllocationFailurePlan:
        self.failure = AllocationFailurePlan(every=True, owner_prefix=owner_prefix)
        return self.failure

    def clear_failures(self) -> None:
        self.failure = None

    # -- hypervisor pages -----------------------------------------------------------------------------

    def alloc(self, owner: str, count: int = 1, *, align_order: int = 0) -> Mfn:
        """Zeroed, contiguous, naturally aligned hypervisor frames; raises OutOfMemory (ENOMEM)."""
        with self._lock:
            self.allocations += 1
            if self.failure is not None and self.failure.should_fail(owner):
                raise OutOfMemory(f"injected failure of allocation #{self.allocations} for {owner}")
            if count == 1 and align_order == 0 and self._xen_free:
                mfn = self._xen_free.pop()
            else:
                align = 1 << align_order
                start = (self._high - count) & ~(align - 1)
                if start < self._low:
                    raise OutOfMemory(f"no room for {count} hypervisor frame(s) for {owner}")
                mfn = start
                self._high = start
            for f in range(mfn, mfn + count):
                self._owner_of[f] = owner
                self.memory.back(f)
            self.pages.set_owner(mfn, count, DOMID_XEN)
            self.in_use[owner] += count
            return Mfn(mfn)

    def alloc_frames(self, owner: str, count: int, out: list[int]) -> None:
        """``count`` single zeroed hypervisor frames, exactly as ``count`` calls of ``alloc(owner)`` would give.

        Each frame is appended to ``out`` as it is taken, so that when an injected or real ENOMEM stops the
        run part way the caller knows (and can undo) what it already holds.  Same frames, same order, same
        counters and failure points as the one-by-one calls; only the bookkeeping is done in bulk.
        """
        if count <= 0:
            return
        start = len(out)
        with self._lock:
            try:
                for _ in range(count):
                    self.allocations += 1
                    if self.failure is not None and self.failure.should_fail(owner):
                        raise OutOfMemory(f"injected failure of allocation #{self.allocations} for {owner}")
                    if self._xen_free:
                        out.append(self._xen_free.pop())
                        continue
                    mfn = self._high - 1
                    if mfn < self._low:
                        raise OutOfMemory(f"no room for 1 hypervisor frame(s) for {owner}")
                    self._high = mfn
                    out.append(mfn)
            finally:
                got = out[start:]
                if got:
                    self._owner_of.update(dict.fromkeys(got, owner))
                    self.memory.back_many(got)
                    self.pages.owner[np.asarray(got, dtype=np.int64)] = DOMID_XEN
                    self.in_use[owner] += len(got)

    def free(self, mfn: Mfn, count: int = 1) -> None:
        """Return hypervisor frames; their contents are scrubbed."""
        with self._lock:
            base = int(mfn)
            for f in range(base, base + count):
                owner = self._owner_of.pop(f, None)
                if owner is None:
                    raise InvalidArgument(f"frame {f:#x} is not an allocated hypervisor page")
                self.in_use[owner] -= 1
                if not self.in_use[owner]:
                    del self.in_use[owner]
                self.memory.release(f)
                self._xen_free.append(f)
            self.pages.set_owner(base, count, DOMID_INVALID)
            self.frees += count

    def owner_of(self, mfn: Mfn) -> str | None:
        return self._owner_of.get(int(mfn))

    def owned(self, owner_prefix: str) -> int:
        """Frames held by every owner whose name starts with the prefix."""
        return sum(n for o, n in self.in_use.items() if o.startswith(owner_prefix))

    def frames_of(self, owner_prefix: str) -> list[Mfn]:
        return sorted(Mfn(f) for f, o in self._owner_of.items() if o.startswith(owner_prefix))

    @property
    def total_in_use(self) -> int:
        return sum(self.in_use.values())

    # -- domain memory --------------------------------------------------------------------------------

    def alloc_domain(self, domid: int, count: int, *, align_order: int = 0) -> Mfn:
        """A contiguous extent of RAM for a domain (not subject to failure injection)."""
        with self._lock:
            align = 1 << align_order
            for i, (start, n) in enumerate(self._domain_free):
                s = (start + align - 1) & ~(align - 1)
                if s + count <= start + n:
                    rest = []
                    if s > start:
                        rest.append((start, s - start))
                    if s + count < start + n:
                        rest.append((s + count, start + n - s - count))
                    self._domain_free[i : i + 1] = rest
                    break
            else:
                s = (self._low + align - 1) & ~(align - 1)
                if s + count > self._high:
                    raise OutOfMemory(f"no room for {count} frames of domain memory for d{domid}")
                if s > self._low:
                    self._domain_free.append((self._low, s - self._low))
                self._low = s + count
            self.pages.set_owner(s, count, domid)
            self.pages.set_type(s, PageType.NONE, count)
            if count:
                self._domain_extents.setdefault(domid, []).append((s, count))
            return Mfn(s)

    def free_domain(self, mfn: Mfn, count: int) -> None:
        with self._lock:
            base = int(mfn)
            self.pages.set_owner(base, count, DOMID_INVALID)
            self.pages.set_type(base, PageType.NONE, count)
            self.pages.m2p[base : base + count] = 0xFFFF_FFFF_FFFF_FFFF
            for f in range(base, base + count):
                self.memory.release(f)
            self._domain_free.append((base, count))
            end = base + count
            for domid, exts in list(self._domain_extents.items()):
                kept = [(s, n) for s, n in exts if s + n <= base or s >= end]
                for s, n in exts:
                    if s + n > base and s < end:  # keep what lies outside the freed range
                        kept.extend((a, b - a) for a, b in ((s, base), (end, s + n)) if max(a, s) < min(b, s + n))
                if kept:
                    self._domain_extents[domid] = kept
                else:
                    del self._domain_extents[domid]

    def domain_extents(self, domid: int) -> list[tuple[int, int]]:
        """The (first frame, count) runs ``alloc_domain`` gave ``domid`` and that were not freed, ascending.

        A superset of the frames the domain owns as long as ownership changes go through this allocator;
        callers that need certainty check ``pages.owner`` over these runs (cheap: no scan of all RAM).
        """
        return sorted(self._domain_extents.get(domid, []))
