"""The measurement core: run a callable several times and summarise its wall time robustly.

A measurement runs an untimed ``setup`` (fresh state for every run), then the timed ``run`` on that state,
then an untimed ``teardown``; it does that ``warmup`` times without keeping the figures and ``repeats``
times keeping them, and reports the median and the interquartile range (robust against the odd slow run on
a shared machine), the median per item, and how much the process's resident set grew across a run.

Inputs are made from a seeded numpy generator (``rng``) so that every run of a benchmark, and the C and
Python baselines, see the same addresses.
"""

from __future__ import annotations

import gc
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from iommusim.errors import InvalidArgument

__all__ = ["SEED", "Measurement", "measure", "measure_call", "rng", "rss_bytes"]

#: The seed every benchmark input is derived from.
SEED = 0x10_1114

S = TypeVar("S")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rng(stream: int = 0) -> np.random.Generator:
    """A deterministic generator; ``stream`` separates independent inputs made from the same seed."""
    return np.random.default_rng([SEED, stream])


def rss_bytes() -> int:
    """The process's resident set size now (``/proc/self/statm``), or its peak where there is no /proc."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass(frozen=True)
class Measurement:
    """Wall times of repeated runs of one piece of work on ``items`` items (pages, addresses, accesses)."""

    name: str
    items: int
    samples_ns: tuple[int, ...]
    #: Largest growth of the process's resident set across one run (setup excluded).
    rss_growth_bytes: int = 0
    #: Anything the run wants to report besides its time (hit rates, table counts...).
    extra: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.samples_ns:
            raise InvalidArgument(f"{self.name}: a measurement needs at least one sample")
        if self.items < 1:
            raise InvalidArgument(f"{self.name}: a measurement covers at least one item")

    def _quantile(self, q: float) -> float:
        return float(np.quantile(np.asarray(self.samples_ns, dtype=np.float64), q))

    @property
    def median_ns(self) -> float:
        return self._quantile(0.5)

    @property
    def q1_ns(self) -> float:
        return self._quantile(0.25)

    @property
    def q3_ns(self) -> float:
        return self._quantile(0.75)

    @property
    def iqr_ns(self) -> float:
        return self.q3_ns - self.q1_ns

    @property
    def spread(self) -> float:
        """The IQR as a fraction of the median: 0.02 means the middle half of the runs lie within 2%."""
        med = self.median_ns
        return self.iqr_ns / med if med else 0.0

    @property
    def per_item_ns(self) -> float:
        return self.median_ns / self.items

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "items": self.items,
            "samples_ns": list(self.samples_ns),
            "median_ns": self.median_ns,
            "q1_ns": self.q1_ns,
            "q3_ns": self.q3_ns,
            "iqr_ns": self.iqr_ns,
            "per_item_ns": self.per_item_ns,
            "rss_growth_bytes": self.rss_growth_bytes,
            "extra": dict(self.extra),
        }


def measure(
    name: str,
    run: Callable[[S], object],
    setup: Callable[[], S],
    *,
    items: int,
    teardown: Callable[[S], object] | None = None,
    repeats: int = 5,
    warmup: int = 1,
    min_repeats: int = 3,
    budget_s: float | None = None,
) -> Measurement:
    """Time ``run(setup())`` ``repeats`` times after ``warmup`` untimed runs.

    With ``budget_s``, repeating stops early once ``min_repeats`` runs are done and the timed runs have
    used up the budget, so that a slow figure at a large size does not take forever.
    """
    if repeats < 1 or warmup < 0:
        raise InvalidArgument("at least one timed run, and no negative number of warm-up runs")
    samples: list[int] = []
    growth = 0
    spent = 0
    for i in range(warmup + repeats):
        state = setup()
        gc.collect()
        before = rss_bytes()
        t0 = time.perf_counter_ns()
        run(state)
        elapsed = time.perf_counter_ns() - t0
        growth = max(growth, rss_bytes() - before)
        if teardown is not None:
            teardown(state)
        del state
        if i < warmup:
            continue
        samples.append(elapsed)
        spent += elapsed
        if budget_s is not None and len(samples) >= min(min_repeats, repeats) and spent > budget_s * 1e9:
            break
    return Measurement(name, items, tuple(samples), growth)


def _nothing() -> None:
    return None


def measure_call(
    name: str,
    fn: Callable[[], object],
    *,
    items: int,
    repeats: int = 5,
    warmup: int = 1,
    min_repeats: int = 3,
    budget_s: float | None = None,
) -> Measurement:
    """``measure`` for work that needs no fresh state per run."""
    return measure(
        name,
        lambda _state: fn(),
        _nothing,
        items=items,
        repeats=repeats,
        warmup=warmup,
        min_repeats=min_repeats,
        budget_s=budget_s,
    )
