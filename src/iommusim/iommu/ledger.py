"""Which changes to a domain's IOMMU tables have not been flushed yet, on purpose.

When a caller batches (``dont_flush``) or asks the range form not to flush, the device may keep using
old translations until the caller's own flush: a stale window that is expected.  The ledger remembers
those windows per domain (ranges of Dfns) and forgets each one when a flush through the generic layer
covers it.  Checks compare the hardware's caches with memory: a disagreement inside a window on the
ledger is a window the caller still owes a flush for; one outside it is a missing flush, i.e. a bug.
"""

from __future__ import annotations

import threading

__all__ = ["FlushLedger"]


class FlushLedger:
    def __init__(self) -> None:
        self._pending: dict[int, list[tuple[int, int]]] = {}  # domid -> sorted, disjoint [start, end)
        self._lock = threading.Lock()

    def note(self, domid: int, dfn: int, count: int) -> None:
        """Frames ``[dfn, dfn + count)`` changed and were not flushed."""
        if count <= 0:
            return
        with self._lock:
            ranges = self._pending.setdefault(domid, [])
            ranges.append((dfn, dfn + count))
            ranges.sort()
            merged: list[tuple[int, int]] = []
            for lo, hi in ranges:
                if merged and lo <= merged[-1][1]:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
                else:
                    merged.append((lo, hi))
            self._pending[domid] = merged

    def flushed(self, domid: int, dfn: int, count: int) -> None:
        """A flush covered ``[dfn, dfn + count)``."""
        end = dfn + count
        with self._lock:
            out: list[tuple[int, int]] = []
            for lo, hi in self._pending.get(domid, []):
                if hi <= dfn or lo >= end:
                    out.append((lo, hi))
                    continue
                if lo < dfn:
                    out.append((lo, dfn))
                if hi > end:
                    out.append((end, hi))
            if out:
                self._pending[domid] = out
            else:
                self._pending.pop(domid, None)

    def flushed_all(self, domid: int) -> None:
        with self._lock:
            self._pending.pop(domid, None)

    def pending(self, domid: int) -> list[tuple[int, int]]:
        """Outstanding windows of a domain as (first dfn, count)."""
        return [(lo, hi - lo) for lo, hi in self._pending.get(domid, [])]

    def covers(self, domid: int, dfn: int) -> bool:
        return any(lo <= dfn < hi for lo, hi in self._pending.get(domid, []))

    def domains(self) -> list[int]:
        return sorted(self._pending)
