"""The fast batch engine every hardware model shares: vectorised walks, a tight IOTLB loop, scalar fallback.

A unit that offers ``translate_batch``/``replay`` gives this engine a ``BatchPlan`` for a device: what it
resolved from its context caches without side effects (the tag, the walk's root, which addresses it would
refuse before the IOTLB), how to walk many addresses at once (``hw.fastwalk``), and what a translation on
the fast path does to its counters and other caches.  The engine then

* walks every address from memory over numpy arrays;
* with the IOTLB bypassed, answers every address whose walk succeeds from the arrays, and hands every other
  address, in order, to the unit's own ``translate`` with its translation caches swapped for empty ones
  (so faults are classified and recorded by the scalar code, in the order the sequence would make them);
* through the IOTLB, runs the addresses in order in a tight loop: a hit is answered from the entry, a miss
  whose walk succeeded fills the IOTLB from the arrays, and anything else (a miss the walk refuses, a hit
  that refuses the access, a stale paging-structure cache entry) is one call of ``translate``.

A device whose DMA the unit does not translate at all (translation off, pass-through, bypass) gets an
``IdentityPlan``: its addresses are answered as they are, with the unit's counters, in either mode.

After a fallback that may have changed what later addresses see (software ran from an interrupt handler,
or the unit wrote memory, e.g. an event log), the plan and the walk are made again, a chunk ahead at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from iommusim.errors import DmaFault, InvalidArgument
from iommusim.hw.base import Translation
from iommusim.hw.batch import BatchResult, ReplayStats, as_daddr_array, fault_code
from iommusim.hw.fastwalk import VecWalk
from iommusim.hw.iotlb import Iotlb, IotlbEntry
from iommusim.machine.memory import MachineMemory
from iommusim.perms import Perm

__all__ = ["BatchPlan", "BatchUnit", "IdentityPlan", "fast_replay", "fast_translate_batch"]

U64Array = npt.NDArray[np.uint64]
U8Array = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]

PERMS = (Perm(0), Perm(1), Perm(2), Perm(3))


class BatchPlan(ABC):
    """One device's translation as a unit resolved it for a batch (built without side effects)."""

    tag: int
    iotlb: Iotlb
    counters: Counter[str]
    #: software may run when a fault is recorded (an interrupt handler is connected): re-plan after one
    volatile: bool = False
    #: the unit has caches besides the IOTLB that a miss consults (``before_fill`` must be called)
    fill_hook: bool = False
    #: the unit counts the entries its walks read (``account`` wants ``reads``)
    counts_reads: bool = True
    #: the device's DMA is not translated (reaches memory at the address it carries) and no IOTLB is involved
    identity: bool = False

    @abstractmethod
    def exceptional(self, addrs: U64Array, accs: U8Array) -> BoolArray:
        """Addresses the unit answers before its IOTLB in a way the fast path does not model."""

    @abstractmethod
    def walk(self, addrs: U64Array, skip: BoolArray, need: int = 0) -> VecWalk:
        """The walk from memory of every address (``skip``: leave not ok; ``need``: ok only if granted)."""

    @abstractmethod
    def account(self, n: int, walks: int, reads: int) -> None:
        """Count ``n`` translations made on the fast path, ``walks`` of them walks reading ``reads`` entries."""

    def before_fill(self, daddr: int, l1_mfn: int, l1_perms: int) -> bool:
        """On an IOTLB miss about to be filled from the arrays: consult the other caches as the unit would.

        Returns False, having changed nothing, when the unit would not use the arrays' walk (then the
        address goes to ``translate``)."""
        return True

    def entry(self, daddr: int, base: int, shift: int, perms: int) -> IotlbEntry:
        """The IOTLB entry a walk that found the page at ``base`` of size ``1 << shift`` leaves."""
        return IotlbEntry(self.tag, daddr >> shift, shift, base, PERMS[perms])


class IdentityPlan(BatchPlan):
    """A device whose DMA the unit lets through untranslated (translation off, pass-through, bypass...).

    Each such translation only counts (``per_translation``), touches the context cache entry it used
    (``touch``) and answers the address itself, with ``perms``; ``refuse`` marks addresses the unit treats
    otherwise (e.g. AMD's exclusion range), which go to ``translate``, as do accesses ``perms`` refuses."""

    identity = True
    counts_reads = False

    def __init__(
        self,
        counters: Counter[str],
        per_translation: dict[str, int],
        *,
        volatile: bool,
        touch: Callable[[], None] | None = None,
        perms: int = 3,
        refuse: Callable[[U64Array], BoolArray | None] | None = None,
    ) -> None:
        self.counters = counters
        self.per_translation = per_translation
        self.volatile = volatile
        self.touch = touch
        self.perms = perms
        self.refuse = refuse

    def exceptional(self, addrs: U64Array, accs: U8Array) -> BoolArray:
        out: BoolArray = (accs & np.uint8(~self.perms & 3)) != 0
        refused = self.refuse(addrs) if self.refuse is not None else None
        return out if refused is None else out | refused

    def walk(self, addrs: U64Array, skip: BoolArray, need: int = 0) -> VecWalk:
        n = addrs.size
        z1 = np.zeros(1, dtype=np.uint8)
        return VecWalk(
            ~skip,
            addrs & ~np.uint64(0xFFF),
            np.full(n, 12, dtype=np.uint8),
            np.full(n, self.perms, dtype=np.uint8),
            np.zeros(n, dtype=np.int64),
            z1,
            np.zeros(1, dtype=np.uint64),
            z1,
            np.zeros(n, dtype=bool),
        )

    def account(self, n: int, walks: int, reads: int) -> None:
        for name, k in self.per_translation.items():
            bump(self.counters, name, k * n)
        if n and self.touch is not None:
            self.touch()


class BatchUnit(Protocol):
    """What a unit gives the engine (the unit classes implement it)."""

    memory: MachineMemory

    def translate(self, source_id: int, daddr: int, access: Perm) -> Translation: ...

    def counters(self) -> Mapping[str, int]: ...

    def _batch_plan(self, source_id: int) -> BatchPlan | None:
        """The plan for a device, or None when the unit's own ``translate`` must answer the next address."""
        ...

    def _bypassing_caches(self) -> AbstractContextManager[None]:
        """Swap every translation cache below the context (IOTLB and the like) for empty throwaways."""
        ...


class LockedBatchUnit(BatchUnit, Protocol):
    """A unit with the lock its ``translate`` and its register writes take (an ``RLock``)."""

    lock: AbstractContextManager[object]


class FastBatchMethods:
    """``translate_batch`` and ``replay`` for a unit class that gives plans, each whole under the unit's lock.

    Holding the lock for the whole batch means no invalidation lands between a walk and its IOTLB fill, as
    for ``translate``.
    """

    def translate_batch(
        self: LockedBatchUnit, source_id: int, daddrs: npt.ArrayLike, access: Perm, *, use_iotlb: bool = True
    ) -> BatchResult:
        """Translate every address in order, as that many ``translate`` calls would (faults recorded)."""
        with self.lock:
            return fast_translate_batch(self, source_id, daddrs, access, use_iotlb=use_iotlb)

    def replay(self: LockedBatchUnit, source_id: int, daddrs: npt.ArrayLike, accesses: npt.ArrayLike) -> ReplayStats:
        """Run a DMA trace through the IOTLB, with per-step hit, miss and eviction counts."""
        with self.lock:
            return fast_replay(self, source_id, daddrs, accesses)


@dataclass
class _Out:
    maddrs: U64Array
    faults: npt.NDArray[np.uint16]
    shifts: U8Array
    cached: BoolArray
    hits: U8Array | None = None
    misses: U8Array | None = None
    evictions: npt.NDArray[np.uint16] | None = None

    @classmethod
    def make(cls, n: int, steps: bool) -> _Out:
        out = cls(
            np.zeros(n, dtype=np.uint64), np.zeros(n, dtype=np.uint16), np.zeros(n, dtype=np.uint8), np.zeros(n, bool)
        )
        if steps:
            out.hits = np.zeros(n, dtype=np.uint8)
            out.misses = np.zeros(n, dtype=np.uint8)
            out.evictions = np.zeros(n, dtype=np.uint16)
        return out


def bump(counters: Counter[str], name: str, n: int) -> None:
    """Add ``n`` to a counter, creating no zero entry (a Counter compares its zero entries too)."""
    if n:
        counters[name] += n


def _iotlb_counts(unit: BatchUnit) -> tuple[int, int, int]:
    c = unit.counters()
    return int(c.get("iotlb_hits", 0)), int(c.get("iotlb_misses", 0)), int(c.get("iotlb_evictions", 0))


def _scalar(unit: BatchUnit, out: _Out, i: int, sid: int, daddr: int, acc: int) -> None:
    """One address through the unit's own translate (the definition of every case)."""
    before = _iotlb_counts(unit) if out.hits is not None else None
    try:
        t = unit.translate(sid, daddr, PERMS[acc])
    except DmaFault as exc:
        out.faults[i] = fault_code(exc)
    else:
        out.maddrs[i] = t.maddr
        out.shifts[i] = t.page_shift
        out.cached[i] = t.cached
    if before is not None:
        assert out.hits is not None and out.misses is not None and out.evictions is not None
        after = _iotlb_counts(unit)
        out.hits[i] = after[0] - before[0]
        out.misses[i] = after[1] - before[1]
        out.evictions[i] = after[2] - before[2]


def _maddrs(addrs: U64Array, base: U64Array, shift: U8Array, into: U64Array | None = None) -> U64Array:
    """The machine address of each device address: its page's base and the offset inside the page."""
    lo, hi = (int(shift.min()), int(shift.max())) if shift.size else (12, 12)
    if lo == hi:  # one page size (the common case): one mask for all
        out: U64Array = np.bitwise_and(addrs, np.uint64((1 << lo) - 1), out=into)
    else:
        out = np.bitwise_and(addrs, (np.uint64(1) << shift.astype(np.uint64)) - np.uint64(1), out=into)
    np.bitwise_or(out, base, out=out)
    return out


# -- IOTLB bypassed ------------------------------------------------------------------------------------------


#: After a fallback that made the engine start again, it walks this many addresses ahead, doubling while
#: no fallback interrupts it (so faults under a connected interrupt handler cost a short walk each).
_RESTART_CHUNK = 4096


def _bypass_run(unit: BatchUnit, sid: int, addrs: U64Array, access: int, out: _Out) -> None:
    n = addrs.size
    accs = np.full(n, access, dtype=np.uint8)
    start = 0
    chunk = n
    while start < n:
        plan = unit._batch_plan(sid)
        if plan is None:
            with unit._bypassing_caches():
                _scalar(unit, out, start, sid, int(addrs[start]), access)
            start += 1
            continue
        end = min(n, start + chunk)
        stop = _direct_segment(unit, plan, sid, addrs[:end], accs[:end], start, out, bypass=True, need=access)
        chunk = chunk * 2 if stop == end else _RESTART_CHUNK
        start = stop


def _direct_segment(
    unit: BatchUnit,
    plan: BatchPlan,
    sid: int,
    addrs: U64Array,
    accs: U8Array,
    start: int,
    out: _Out,
    *,
    bypass: bool,
    need: int,
) -> int:
    """Addresses from ``start`` answered from the walk's arrays, no IOTLB involved (bypassed, or the plan's
    DMA is untranslated); the rest by ``translate`` in order.  Returns where it stopped."""
    seg, acc = addrs[start:], accs[start:]
    exc = plan.exceptional(seg, acc)
    w = plan.walk(seg, exc, need=need)
    fast = w.ok
    stop = seg.size
    if not fast.all():
        written = unit.memory.words_written
        for j in np.flatnonzero(~fast).tolist():
            with unit._bypassing_caches() if bypass else nullcontext():
                _scalar(unit, out, start + j, sid, int(seg[j]), int(acc[j]))
            if plan.volatile or unit.memory.words_written != written:
                stop = j + 1
                break
    part = fast[:stop]
    sl = slice(start, start + stop)
    if stop == seg.size and part.all():
        _maddrs(seg, w.base, w.shift, into=out.maddrs[sl])
        out.shifts[sl] = w.shift
        done = stop
        reads = w.reads_total() if plan.counts_reads else 0
    else:
        idx = np.flatnonzero(part)
        out.maddrs[sl][idx] = _maddrs(seg[idx], w.base[idx], w.shift[idx])
        out.shifts[sl][idx] = w.shift[idx]
        done = int(idx.size)
        reads = int(w.reads[idx].sum(dtype=np.int64)) if plan.counts_reads else 0
    plan.account(done, 0 if plan.identity else done, reads)
    return start + stop


# -- through the IOTLB ---------------------------------------------------------------------------------------


def _iotlb_run(unit: BatchUnit, sid: int, addrs: U64Array, accs: U8Array, out: _Out) -> None:
    n = addrs.size
    start = 0
    chunk = n
    while start < n:
        plan = unit._batch_plan(sid)
        if plan is not None and plan.identity:
            end = _direct_segment(
                unit, plan, sid, addrs[: start + chunk], accs[: start + chunk], start, out, bypass=False, need=0
            )
        elif plan is None or plan.iotlb.events is not None:  # an IOTLB that records events: every step scalar
            _scalar(unit, out, start, sid, int(addrs[start]), int(accs[start]))
            start += 1
            continue
        else:
            end = _iotlb_segment(unit, plan, sid, addrs[: start + chunk], accs[: start + chunk], start, out)
        chunk = chunk * 2 if end == min(n, start + chunk) else _RESTART_CHUNK
        start = end


def _iotlb_segment(
    unit: BatchUnit, plan: BatchPlan, sid: int, addrs: U64Array, accs: U8Array, start: int, out: _Out
) -> int:
    """Run addresses from ``start`` until the end or a fallback that calls for a new plan; returns where.

    The IOTLB's lookup and fill are written out here (its dictionaries used directly) because they run
    once per address: the same LRU order, tag index and page-size census ``Iotlb`` keeps."""
    seg, acc = addrs[start:], accs[start:]
    exc = plan.exceptional(seg, acc)
    w = plan.walk(seg, exc)
    walk_ok = (w.ok & ((acc & ~w.perms) == 0)).tolist()
    exc_l = exc.tolist()
    addr_l = seg.tolist()
    acc_l = acc.tolist()
    base_l, shift_l, perms_l = w.base.tolist(), w.shift.tolist(), w.perms.tolist()
    reads_l = w.reads.tolist() if plan.counts_reads else None
    hook = plan.fill_hook
    l1_l, l1p_l = (w.l1_mfn.tolist(), w.l1_perms.tolist()) if hook else ([], [])
    iotlb, tag, memory = plan.iotlb, plan.tag, unit.memory
    d = iotlb._cache._d
    cap = iotlb.capacity
    by_tag = iotlb._by_tag
    census = iotlb._shift_count
    live = iotlb._live_shifts
    entry_of = plan.entry
    before_fill = plan.before_fill
    steps = out.hits is not None
    # answers on the fast path, written back at the end: index, machine address, page shift, kind
    idx: list[int] = []
    res_m: list[int] = []
    res_s: list[int] = []
    hit_j: list[int] = []
    miss_j: list[int] = []
    evict_j: list[int] = []
    hits = misses = evictions = reads = 0
    written = memory.words_written
    stop = len(addr_l)
    key: tuple[int, int, int] = (0, 0, 0)
    for j in range(stop):
        a = addr_l[j]
        if not exc_l[j]:
            e = None
            for sh in live:
                key = (tag, a >> sh, sh)
                e = d.get(key)
                if e is not None:
                    break
            if e is not None:
                if not acc_l[j] & ~e.perms._value_:
                    d.move_to_end(key)
                    hits += 1
                    idx.append(j)
                    res_m.append(e.out | (a & ((1 << e.page_shift) - 1)))
                    res_s.append(e.page_shift)
                    hit_j.append(j)
                    continue
            elif walk_ok[j] and (not hook or before_fill(a, l1_l[j], l1p_l[j])):
                misses += 1
                if reads_l is not None:
                    reads += reads_l[j]
                entry = entry_of(a, base_l[j], shift_l[j], perms_l[j])
                sh = entry.page_shift
                if len(d) >= cap:  # the least recently used entry makes room
                    old, _ = d.popitem(last=False)
                    tagged = by_tag.get(old[0])
                    if tagged is not None:
                        tagged.pop(old, None)
                        if not tagged:
                            del by_tag[old[0]]
                    left = census[old[2]] - 1
                    if left:
                        census[old[2]] = left
                    else:
                        del census[old[2]]
                        live = iotlb._live_shifts = tuple(sorted(census))
                    evictions += 1
                    evict_j.append(j)
                newkey = (tag, entry.page, sh)
                d[newkey] = entry
                by_tag.setdefault(tag, {})[newkey] = None
                had = census.get(sh, 0)
                census[sh] = had + 1
                if not had:
                    live = iotlb._live_shifts = tuple(sorted(census))
                idx.append(j)
                res_m.append(entry.out | (a & ((1 << sh) - 1)))
                res_s.append(sh)
                miss_j.append(j)
                continue
        _scalar(unit, out, start + j, sid, a, acc_l[j])
        live = iotlb._live_shifts
        if plan.volatile or memory.words_written != written:
            stop = j + 1
            break
    if idx:
        at = np.asarray(idx, dtype=np.int64) + start
        out.maddrs[at] = np.asarray(res_m, dtype=np.uint64)
        out.shifts[at] = np.asarray(res_s, dtype=np.uint8)
    if hit_j:
        out.cached[np.asarray(hit_j, dtype=np.int64) + start] = True
    if steps:
        assert out.hits is not None and out.misses is not None and out.evictions is not None
        out.hits[np.asarray(hit_j, dtype=np.int64) + start] = 1
        out.misses[np.asarray(miss_j, dtype=np.int64) + start] = 1
        out.evictions[np.asarray(evict_j, dtype=np.int64) + start] = 1
    c = plan.counters
    bump(c, "iotlb_hits", hits)
    bump(c, "iotlb_misses", misses)
    bump(c, "iotlb_fills", misses)
    bump(c, "iotlb_evictions", evictions)
    plan.account(len(idx), misses, reads)
    return start + stop


def fast_translate_batch(
    unit: BatchUnit, source_id: int, daddrs: npt.ArrayLike, access: Perm, *, use_iotlb: bool = True
) -> BatchResult:
    """``BatchTranslator.translate_batch`` for a unit that gives plans."""
    addrs = as_daddr_array(daddrs)
    accs = np.full(addrs.size, int(access) & 3, dtype=np.uint8)
    out = _Out.make(addrs.size, steps=False)
    if use_iotlb:
        _iotlb_run(unit, source_id, addrs, accs, out)
    else:
        _bypass_run(unit, source_id, addrs, int(access) & 3, out)
    return BatchResult(out.maddrs, out.faults, out.shifts, out.cached, iotlb_bypassed=not use_iotlb)


def fast_replay(unit: BatchUnit, source_id: int, daddrs: npt.ArrayLike, accesses: npt.ArrayLike) -> ReplayStats:
    """``BatchTranslator.replay`` for a unit that gives plans."""
    addrs = as_daddr_array(daddrs)
    acc = np.asarray(accesses)
    if acc.shape != addrs.shape:
        raise InvalidArgument("a trace has one access kind per address")
    accs = (acc.astype(np.int64) & 3).astype(np.uint8)
    out = _Out.make(addrs.size, steps=True)
    counted = sum(_iotlb_counts(unit)[:2]) > 0
    _iotlb_run(unit, source_id, addrs, accs, out)
    assert out.hits is not None and out.misses is not None and out.evictions is not None
    if not counted and not (out.hits.any() or out.misses.any()):  # as ReferenceBatch: judged by ``cached``
        out.hits, out.misses = out.cached.astype(np.uint8), (~out.cached).astype(np.uint8)
    return ReplayStats(out.maddrs, out.faults, out.hits, out.misses, out.evictions)


def swap_attrs(obj: object, fresh: dict[str, Callable[[], object]]) -> Iterator[None]:
    """Replace attributes of ``obj`` by fresh objects for the duration of a ``with`` (a generator body)."""
    saved = {name: getattr(obj, name) for name in fresh}
    try:
        for name, make in fresh.items():
            setattr(obj, name, make())
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)
