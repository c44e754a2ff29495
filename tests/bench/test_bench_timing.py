"""The measurement core and the seeded inputs: structure and statistics, never timings."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from iommusim.bench.timing import Measurement, measure, measure_call, rng, rss_bytes
from iommusim.bench.workloads import LEAF_BITS, MFN_BASE, dma_trace, leaf, random_daddrs
from iommusim.errors import InvalidArgument
from iommusim.perms import Perm


def test_statistics_of_known_samples() -> None:
    # five samples 10..50 ns over 10 items: median 30, quartiles by linear interpolation at positions
    # 0.25*4 = 1 and 0.75*4 = 3, i.e. 20 and 40; IQR 20; spread 20/30; 3 ns per item
    m = Measurement("x", 10, (50, 10, 40, 20, 30))
    assert (m.median_ns, m.q1_ns, m.q3_ns, m.iqr_ns) == (30, 20, 40, 20)
    assert m.spread == pytest.approx(2 / 3)
    assert m.per_item_ns == 3
    j = m.to_json()
    assert j["samples_ns"] == [50, 10, 40, 20, 30] and j["per_item_ns"] == 3


def test_measure_runs_setup_run_teardown_in_order() -> None:
    log: list[str] = []
    counter = iter(range(100))

    def setup() -> int:
        k = next(counter)
        log.append(f"setup{k}")
        return k

    def run(k: int) -> None:
        log.append(f"run{k}")

    def teardown(k: int) -> None:
        log.append(f"teardown{k}")

    m = measure("t", run, setup, items=4, teardown=teardown, repeats=3, warmup=2)
    assert len(m.samples_ns) == 3  # the two warm-up runs are not kept
    assert log == [f"{step}{k}" for k in range(5) for step in ("setup", "run", "teardown")]
    assert m.items == 4 and m.name == "t" and all(s >= 0 for s in m.samples_ns)


def test_budget_stops_after_the_minimum_number_of_runs() -> None:
    calls: list[int] = []
    m = measure_call("b", lambda: calls.append(sum(range(1000))), items=1, repeats=10, warmup=0, budget_s=0.0)
    assert len(m.samples_ns) == 3 and len(calls) == 3
    m = measure_call("b", lambda: None, items=1, repeats=2, warmup=0, budget_s=0.0)
    assert len(m.samples_ns) == 2  # never more than asked for


def test_bad_arguments() -> None:
    with pytest.raises(InvalidArgument):
        measure_call("x", lambda: None, items=1, repeats=0)
    with pytest.raises(InvalidArgument):
        Measurement("x", 1, ())
    with pytest.raises(InvalidArgument):
        Measurement("x", 0, (1,))


def test_rss_growth_is_seen() -> None:
    assert rss_bytes() > 0
    kept: list[mmap.mmap] = []
    size = 32 << 20

    def grow() -> None:
        # A fresh anonymous mapping with every page touched: the allocator cannot hand back memory that
        # an earlier test freed but left resident, so the growth is really there to be seen.
        mm = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            mm[offset] = 1
        kept.append(mm)

    m = measure_call("grow", grow, items=1, repeats=1, warmup=0)
    assert m.rss_growth_bytes >= size // 2  # the pages were written, so they are resident
    for mm in kept:
        mm.close()


def test_rng_streams_are_deterministic_and_independent() -> None:
    a, b, c = rng(1).integers(0, 1 << 40, 8), rng(1).integers(0, 1 << 40, 8), rng(2).integers(0, 1 << 40, 8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_leaf_values() -> None:
    # frame 5 maps to machine frame MFN_BASE + 5; the entry is its address with read and write set
    assert leaf(5) == ((MFN_BASE + 5) << 12) | LEAF_BITS == ((0x40005 << 12) | 0x3)


def test_random_addresses_stay_in_range_and_repeat() -> None:
    d = random_daddrs(5000, 300, first_dfn=0x1000)
    assert d.dtype == np.uint64 and d.shape == (5000,)
    pages = d >> np.uint64(12)
    assert int(pages.min()) >= 0x1000 and int(pages.max()) < 0x1000 + 300
    assert not (d & np.uint64(7)).any()  # 8-byte aligned
    assert np.array_equal(d, random_daddrs(5000, 300, first_dfn=0x1000))
    assert len(np.unique(pages)) > 250  # spread over the range, not stuck on a few pages


def test_dma_trace_has_ring_locality() -> None:
    daddrs, acc = dma_trace(4096, 1 << 12, rings=4, ring_pages=8, stride=512, scattered=0.0)
    assert set(np.unique(acc).tolist()) <= {int(Perm.R), int(Perm.W)}
    pages = np.unique(daddrs >> np.uint64(12))
    # 4 rings of 8 pages, walked 512 bytes at a time (8 accesses per page): at most 32 distinct pages
    assert len(pages) <= 32
    loose, _ = dma_trace(4096, 1 << 12, rings=4, ring_pages=8, scattered=1.0)
    assert len(np.unique(loose >> np.uint64(12))) > 1000
    again, acc2 = dma_trace(4096, 1 << 12, rings=4, ring_pages=8, stride=512, scattered=0.0)
    assert np.array_equal(again, daddrs) and np.array_equal(acc2, acc)
    tiny, _ = dma_trace(100, 3, first_dfn=7)  # rings longer than the range are cut to it
    assert int((tiny >> np.uint64(12)).min()) >= 7 and int((tiny >> np.uint64(12)).max()) < 10
    with pytest.raises(InvalidArgument):
        dma_trace(10, 0)
