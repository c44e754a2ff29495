"""Translating many device addresses in one call: the interface a hardware model offers for bulk DMA.

A unit that translates one access at a time (``DmaRemapper.translate``) is correct but slow when a
benchmark or a trace needs millions of translations.  ``BatchTranslator`` is what a vendor's hardware model
adds to translate a whole numpy array for one device in one call, walking level by level over arrays, and to
replay a long DMA trace through its IOTLB with per-step hit, miss and eviction counts.

Both calls must behave exactly as the equivalent sequence of ``translate`` calls, in order, would: the same
machine addresses, the same faults recorded in the unit's fault registers or event log (a batch reports
them in its result instead of raising ``DmaFault``), the same IOTLB contents and counters afterwards.  The
one permitted difference is ``use_iotlb=False``: then every address is walked from memory and the IOTLB is
neither looked up nor filled.

``ReferenceBatch`` gives any ``DmaRemapper`` both calls by looping over ``translate``: it is the slow path
that defines what the fast paths must return.  It cannot look past the unit's own caches, so with
``use_iotlb=False`` it still goes through them and says so (``BatchResult.iotlb_bypassed`` is false).
``batch_translator(unit)`` returns the unit itself when it implements the protocol, else the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from iommusim.errors import DmaFault, InvalidArgument
from iommusim.hw.base import DmaRemapper
from iommusim.perms import Perm

__all__ = [
    "FAULT_NONE",
    "FAULT_UNSPECIFIED",
    "BatchResult",
    "BatchTranslator",
    "ReferenceBatch",
    "ReplayStats",
    "as_daddr_array",
    "batch_translator",
    "fault_code",
]

U64Array = npt.NDArray[np.uint64]
U16Array = npt.NDArray[np.uint16]
U8Array = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]

#: Fault code of an address that was translated.
FAULT_NONE = 0
#: Fault code of a fault whose record carries no reason code of its own.
FAULT_UNSPECIFIED = 0xFFFF


def fault_code(exc: DmaFault) -> int:
    """The code a batch reports for a fault: the record's integer ``reason`` if it has one (1..0xFFFE)."""
    reason = getattr(exc.record, "reason", None)
    if isinstance(reason, int) and not isinstance(reason, bool) and 0 < int(reason) < FAULT_UNSPECIFIED:
        return int(reason)
    return FAULT_UNSPECIFIED


@dataclass(frozen=True)
class BatchResult:
    """What translating an array of device addresses gave, index by index."""

    #: Machine address each device address reached (0 where it faulted).
    maddrs: U64Array
    #: ``FAULT_NONE`` where translated, else the vendor's fault reason code (``FAULT_UNSPECIFIED`` if none).
    faults: U16Array
    #: log2 of the size of the mapping used (12, 21, 30...; 0 where it faulted).
    page_shifts: U8Array
    #: Whether the translation came from a translation cache rather than a walk.
    cached: BoolArray
    #: Whether the IOTLB was really left out when the caller asked for that.
    iotlb_bypassed: bool

    def __post_init__(self) -> None:
        n = self.maddrs.shape
        if self.faults.shape != n or self.page_shifts.shape != n or self.cached.shape != n:
            raise InvalidArgument("a batch result has one entry per address in every array")

    def __len__(self) -> int:
        return int(self.maddrs.size)

    @property
    def ok(self) -> BoolArray:
        out: BoolArray = self.faults == FAULT_NONE
        return out

    @property
    def fault_count(self) -> int:
        return int(np.count_nonzero(self.faults))


@dataclass(frozen=True)
class ReplayStats:
    """A DMA trace run through a unit, step by step (one step per access), ready for plots."""

    maddrs: U64Array
    faults: U16Array
    #: 1 where the step was served from the IOTLB.
    hits: U8Array
    #: 1 where the step missed the IOTLB (and so walked, or faulted).
    misses: U8Array
    #: IOTLB entries the step's fill pushed out.
    evictions: U16Array

    def __post_init__(self) -> None:
        n = self.maddrs.shape
        if any(a.shape != n for a in (self.faults, self.hits, self.misses, self.evictions)):
            raise InvalidArgument("replay statistics have one entry per step in every array")

    def __len__(self) -> int:
        return int(self.maddrs.size)

    def totals(self) -> dict[str, int]:
        return {
            "steps": len(self),
            "hits": int(self.hits.sum(dtype=np.int64)),
            "misses": int(self.misses.sum(dtype=np.int64)),
            "evictions": int(self.evictions.sum(dtype=np.int64)),
            "faults": int(np.count_nonzero(self.faults)),
        }

    def cumulative(self) -> dict[str, npt.NDArray[np.int64]]:
        """Running totals after each step (what a hit-rate plot draws)."""
        return {
            "hits": np.cumsum(self.hits, dtype=np.int64),
            "misses": np.cumsum(self.misses, dtype=np.int64),
            "evictions": np.cumsum(self.evictions, dtype=np.int64),
        }

    @property
    def hit_rate(self) -> float:
        looked = int(self.hits.sum(dtype=np.int64)) + int(self.misses.sum(dtype=np.int64))
        return int(self.hits.sum(dtype=np.int64)) / looked if looked else 0.0


@runtime_checkable
class BatchTranslator(Protocol):
    """Bulk translation offered by a hardware model (on the unit object itself)."""

    def translate_batch(self, source_id: int, daddrs: U64Array, access: Perm, *, use_iotlb: bool = True) -> BatchResult:
        """Translate every address of ``daddrs`` for one device, in order, with the same ``access``."""
        ...

    def replay(self, source_id: int, daddrs: U64Array, accesses: U8Array) -> ReplayStats:
        """Run a trace (address ``i`` accessed as ``Perm(accesses[i])``) through the IOTLB, in order."""
        ...


def as_daddr_array(daddrs: npt.ArrayLike) -> U64Array:
    """A one-dimensional uint64 array of device addresses, or EINVAL (shared by every batch path)."""
    arr = np.asarray(daddrs)
    if arr.ndim != 1:
        raise InvalidArgument("device addresses come as a one-dimensional array")
    if arr.size and arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise InvalidArgument("device addresses are not negative")
    return arr.astype(np.uint64, copy=False)


class ReferenceBatch:
    """Both batch calls for any ``DmaRemapper``, one ``translate`` at a time (correct, slow)."""

    def __init__(self, unit: DmaRemapper) -> None:
        self.unit = unit

    def translate_batch(self, source_id: int, daddrs: U64Array, access: Perm, *, use_iotlb: bool = True) -> BatchResult:
        addrs = as_daddr_array(daddrs)
        n = addrs.size
        maddrs = np.zeros(n, dtype=np.uint64)
        faults = np.zeros(n, dtype=np.uint16)
        shifts = np.zeros(n, dtype=np.uint8)
        cached = np.zeros(n, dtype=bool)
        translate = self.unit.translate
        for i, daddr in enumerate(addrs.tolist()):
            try:
                t = translate(source_id, daddr, access)
            except DmaFault as exc:
                faults[i] = fault_code(exc)
                continue
            maddrs[i] = t.maddr
            shifts[i] = t.page_shift
            cached[i] = t.cached
        return BatchResult(maddrs, faults, shifts, cached, iotlb_bypassed=False)

    def replay(self, source_id: int, daddrs: U64Array, accesses: U8Array) -> ReplayStats:
        """Per-step counts come from the unit's ``iotlb_hits``/``iotlb_misses``/``iotlb_evictions`` counters
        (the shared ``Iotlb``'s names); a unit that never reports hits or misses is judged by ``cached``.

        Whether the unit counts is decided over the whole run (and what it counted before), so a step that
        never reached the IOTLB (a fault before it) shows no hit and no miss wherever it comes in the trace.
        """
        addrs = as_daddr_array(daddrs)
        acc = np.asarray(accesses)
        if acc.shape != addrs.shape:
            raise InvalidArgument("a trace has one access kind per address")
        n = addrs.size
        maddrs = np.zeros(n, dtype=np.uint64)
        faults = np.zeros(n, dtype=np.uint16)
        hits = np.zeros(n, dtype=np.uint8)
        misses = np.zeros(n, dtype=np.uint8)
        evictions = np.zeros(n, dtype=np.uint16)
        cached = np.zeros(n, dtype=bool)
        translate = self.unit.translate
        counters = self.unit.counters
        prev = _iotlb_counts(counters())
        counted = prev[0] + prev[1] > 0  # the unit counts IOTLB lookups under the shared names
        for i, (daddr, a) in enumerate(zip(addrs.tolist(), acc.tolist(), strict=True)):
            try:
                t = translate(source_id, daddr, Perm(a))
                maddrs[i] = t.maddr
                cached[i] = t.cached
            except DmaFault as exc:
                faults[i] = fault_code(exc)
            now = _iotlb_counts(counters())
            dh, dm, de = (x - y for x, y in zip(now, prev, strict=True))
            prev = now
            counted = counted or dh + dm > 0
            hits[i], misses[i], evictions[i] = dh, dm, de
        if not counted:
            hits, misses = cached.astype(np.uint8), (~cached).astype(np.uint8)
        return ReplayStats(maddrs, faults, hits, misses, evictions)


def _iotlb_counts(counters: Mapping[str, int]) -> tuple[int, int, int]:
    return (
        int(counters.get("iotlb_hits", 0)),
        int(counters.get("iotlb_misses", 0)),
        int(counters.get("iotlb_evictions", 0)),
    )


def batch_translator(unit: DmaRemapper) -> BatchTranslator:
    """The unit's own batch calls when it has them, else the reference loop over ``translate``."""
    if isinstance(unit, BatchTranslator):
        return unit
    return ReferenceBatch(unit)
