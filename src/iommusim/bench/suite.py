"""The benchmark runs: the baselines, then each vendor's figures on fresh subjects, into a ``BenchResult``.

Every timed run of a vendor figure gets a fresh platform in its untimed set-up (``subjects``), so no run
profits from tables or cache contents an earlier one left behind.
"""

from __future__ import annotations

import gc
import os
import platform as host
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from iommusim.bench.baseline_c import CBaselineUnavailable, run_c_baseline
from iommusim.bench.baseline_py import PyRadix, numpy_fill, py_insert_pages
from iommusim.bench.options import BenchOptions
from iommusim.bench.results import BASELINES, FIGURES, BenchResult, Figure, MemoryRow, VendorResult
from iommusim.bench.subjects import (
    NO_SUPERPAGES,
    SUPERPAGES_2M,
    SUPERPAGES_ALL,
    PlatformFactory,
    Subject,
    default_factory,
    hwdom_platform,
    make_subject,
)
from iommusim.bench.timing import Measurement, rss_bytes
from iommusim.bench.workloads import LEAF_BITS, MFN_BASE, dma_trace, random_daddrs
from iommusim.errors import InvalidArgument
from iommusim.frames import Dfn, Mfn
from iommusim.hw.batch import BatchResult, BatchTranslator, ReferenceBatch, ReplayStats, batch_translator
from iommusim.perms import Perm
from iommusim.platform import VENDORS, Platform, available_vendors

__all__ = ["ideal_tables", "machine_info", "run_baselines", "run_benchmarks", "run_vendor"]

S = TypeVar("S")
Progress = Callable[[str], None]


# -- baselines ---------------------------------------------------------------------------------------------------


def run_baselines(opts: BenchOptions, result: BenchResult, progress: Progress) -> None:
    """C per-page map and random walk, Python radix insert and walk, numpy fill; cross-checked per size."""
    figs = {k: Figure(k, b.title, b.unit) for k, b in BASELINES.items()}
    result.baselines.update(figs)
    c_ok = True
    for n in opts.sizes:
        daddrs = random_daddrs(n, n)
        check: dict[str, object] = {}
        if c_ok:
            progress(f"baseline: C map of {n} pages and walk of {n} addresses")
            try:
                c = run_c_baseline(n, daddrs, repeats=opts.repeats)
            except CBaselineUnavailable as exc:
                c_ok = False
                result.baseline_notes.append(f"C baseline skipped: {exc}")
            else:
                figs["c-map"].by_size[n] = replace(c.map, extra={"max_rss_bytes": float(c.max_rss_kib * 1024)})
                figs["c-walk"].by_size[n] = c.walk
                result.machine["c_compiler"] = c.compiler
                check.update(c_tables=c.tables, c_leaf_sum=c.leaf_sum, c_walk_checksum=c.walk_checksum)
                check["c_walk_faults"] = c.walk_faults
        _python_baselines(opts, figs, n, daddrs, check, progress)
        result.checks[n] = check
        for name in ("c_matches_py", "np_fill_matches_py"):
            if check.get(name) is False:
                result.baseline_notes.append(f"MISMATCH at {n} pages: {name} is false; see the JSON checks")
        gc.collect()


def _python_baselines(
    opts: BenchOptions,
    figs: dict[str, Figure],
    n: int,
    daddrs: npt.NDArray[np.uint64],
    check: dict[str, object],
    progress: Progress,
) -> None:
    trees: list[PyRadix] = []

    def fresh_tree() -> PyRadix:
        trees[:] = [PyRadix()]
        return trees[0]

    def insert(tree: PyRadix) -> None:
        py_insert_pages(tree, n)

    progress(f"baseline: Python radix insert of {n} pages")
    figs["py-insert"].by_size[n] = opts.time("py-insert", insert, fresh_tree, n)
    tree = trees[0]
    addr_list: list[int] = daddrs.tolist()

    def walk(_state: None) -> None:
        tree.walk_checksum(addr_list)

    progress(f"baseline: Python radix walk of {n} addresses")
    figs["py-walk"].by_size[n] = opts.time("py-walk", walk, _nothing, n)

    def empty() -> npt.NDArray[np.uint64]:
        out = np.empty(n, dtype=np.uint64)
        out.fill(0)  # touched here, so the timed fill does not pay for the first page faults
        return out

    progress(f"baseline: numpy fill of {n} entries")
    figs["np-fill"].by_size[n] = opts.time("np-fill", numpy_fill, empty, n)

    filled = empty()
    numpy_fill(filled)
    py_sum, py_faults = tree.walk_checksum(addr_list)
    leaves = tree.leaves()
    check.update(
        py_tables=tree.tables,
        py_leaf_sum=int(leaves.sum(dtype=np.uint64)),
        py_walk_checksum=py_sum,
        py_walk_faults=py_faults,
        np_fill_matches_py=bool(np.array_equal(leaves[:n], filled) and not leaves[n:].any()),
    )
    if "c_tables" in check:
        check["c_matches_py"] = (
            check["c_tables"] == check["py_tables"]
            and check["c_leaf_sum"] == check["py_leaf_sum"]
            and check["c_walk_checksum"] == check["py_walk_checksum"]
            and check["c_walk_faults"] == check["py_walk_faults"]
        )


def _nothing() -> None:
    return None


# -- vendor figures ---------------------------------------------------------------------------------------------


@dataclass
class _VendorRun:
    vendor: str
    factory: PlatformFactory
    opts: BenchOptions
    result: VendorResult
    progress: Progress
    provided: frozenset[str] | None = None

    def note(self, text: str) -> None:
        if text not in self.result.notes:
            self.result.notes.append(text)

    def subject(self, pages: int, *, superpages: tuple[int, ...], mapped: bool = False) -> Subject:
        s = make_subject(self.factory, self.vendor, pages, superpages=superpages)
        if self.provided is None:
            self.provided = s.platform.ops.provided
            if "map_range" not in self.provided:
                self.note("the driver has no map_range: bulk maps go page by page through the generic layer")
            if "unmap_range" not in self.provided:
                self.note("the driver has no unmap_range: bulk unmaps go page by page through the generic layer")
        if mapped:
            s.map_all()
        return s

    def record(self, key: str, n: int, m: Measurement) -> None:
        spec = FIGURES[key]
        fig = self.result.figures.setdefault(key, Figure(key, spec.title, spec.unit))
        fig.by_size[n] = m

    def run_figure(self, key: str, n: int, run: Callable[[S], object], setup: Callable[[], S]) -> Measurement | None:
        """Measure one figure at one size; a failure is recorded as the reason the figure is missing."""
        spec = FIGURES[key]
        self.progress(f"{self.vendor}: {spec.title}, {n} {spec.unit}(s)")
        try:
            m = self.opts.time(key, run, setup, n)
        except Exception as exc:  # a vendor without this feature must not stop the rest of the run
            self.result.skipped[key] = f"{type(exc).__name__}: {exc}"
            return None
        self.record(key, n, m)
        return m

    # -- (1) per-page map and unmap through the generic layer, each with its implicit flush ------------------

    def per_page(self, n: int) -> None:
        def map_pages(s: Subject) -> None:
            iommu, d, d0, m0 = s.platform.iommu, s.domain, s.dfn.value, s.mfn.value
            for i in range(s.pages):
                iommu.map_page(d, Dfn(d0 + i), Mfn(m0 + i), Perm.RW)

        def unmap_pages(s: Subject) -> None:
            iommu, d, d0 = s.platform.iommu, s.domain, s.dfn.value
            for i in range(s.pages):
                iommu.unmap_page(d, Dfn(d0 + i))

        def fresh() -> Subject:
            return self.subject(n, superpages=SUPERPAGES_ALL)

        def fresh_mapped() -> Subject:
            return self.subject(n, superpages=SUPERPAGES_ALL, mapped=True)

        if self.opts.wants("map-page"):
            self.run_figure("map-page", n, map_pages, fresh)
        if self.opts.wants("unmap-page"):
            self.run_figure("unmap-page", n, unmap_pages, fresh_mapped)

    # -- (2) bulk map and unmap, superpages forbidden and allowed ---------------------------------------------

    def bulk(self, n: int) -> None:
        def map_range(s: Subject) -> None:
            s.map_all()

        def unmap_range(s: Subject) -> None:
            s.platform.iommu.unmap(s.domain, s.dfn, s.pages)

        for sp, tag in ((NO_SUPERPAGES, "nosp"), (SUPERPAGES_ALL, "sp")):

            def fresh(sp: tuple[int, ...] = sp) -> Subject:
                return self.subject(n, superpages=sp)

            def fresh_mapped(sp: tuple[int, ...] = sp) -> Subject:
                return self.subject(n, superpages=sp, mapped=True)

            if self.opts.wants(f"bulk-map-{tag}"):
                self.run_figure(f"bulk-map-{tag}", n, map_range, fresh)
            if self.opts.wants(f"bulk-unmap-{tag}"):
                self.run_figure(f"bulk-unmap-{tag}", n, unmap_range, fresh_mapped)

    # -- (3) hardware-domain set-up -------------------------------------------------------------------------------

    def hwdom(self, n: int) -> None:
        def run(p: Platform) -> None:
            p.create_hardware_domain(n << 12)

        # the target for superpages names 2 MiB ones: 1 GiB leaves are not allowed here
        for sp, tag in ((NO_SUPERPAGES, "nosp"), (SUPERPAGES_2M, "sp")):

            def setup(sp: tuple[int, ...] = sp) -> Platform:
                return hwdom_platform(self.factory, self.vendor, n, superpages=sp)

            if self.opts.wants(f"hwdom-{tag}"):
                self.run_figure(f"hwdom-{tag}", n, run, setup)

    # -- (4) batched translation and (5) trace replay ---------------------------------------------------------------

    def _translator(self, s: Subject) -> tuple[BatchTranslator, int]:
        route = s.platform.machine.dma.route_of(s.device)
        if route is None:
            raise InvalidArgument(f"{s.device.sbdf} has no IOMMU unit in front of it")
        tr = batch_translator(route.unit)
        if isinstance(tr, ReferenceBatch):
            self.note(
                "the hardware model has no batch API: translation and replay use the reference loop over "
                "translate(), which cannot bypass the IOTLB"
            )
        return tr, route.source_id

    def translate(self, n: int) -> None:
        wanted = [k for k in ("translate-bypass", "translate-iotlb") if self.opts.wants(k)]
        if not wanted:
            return
        s = self.subject(n, superpages=NO_SUPERPAGES, mapped=True)
        tr, sid = self._translator(s)
        daddrs = random_daddrs(n, n, first_dfn=s.dfn.value)
        expected = s.expected_maddrs(daddrs)
        iommu, d = s.platform.iommu, s.domain

        def cold() -> None:
            iommu.iotlb_flush_all(d)

        for key in wanted:
            use_iotlb = key == "translate-iotlb"
            out: list[BatchResult] = []

            def run(_state: None, use_iotlb: bool = use_iotlb, out: list[BatchResult] = out) -> None:
                out[:] = [tr.translate_batch(sid, daddrs, Perm.R, use_iotlb=use_iotlb)]

            m = self.run_figure(key, n, run, cold)
            if m is None:
                continue
            res = out[0]
            ok = res.ok
            wrong = int(np.count_nonzero(res.maddrs[ok] != expected[ok]))
            extra = {
                "faults": float(res.fault_count),
                "wrong": float(wrong),
                "cached_share": float(res.cached.mean()) if len(res) else 0.0,
                "iotlb_bypassed": float(res.iotlb_bypassed),
            }
            if res.fault_count or wrong:
                self.note(f"{key} at {n}: {res.fault_count} faults and {wrong} wrong translations")
            self.record(key, n, replace(m, extra=extra))

    def replay(self, n: int) -> None:
        if not self.opts.wants("replay"):
            return
        s = self.subject(n, superpages=NO_SUPERPAGES, mapped=True)
        tr, sid = self._translator(s)
        daddrs, accesses = dma_trace(n, n, first_dfn=s.dfn.value)
        iommu, d = s.platform.iommu, s.domain
        out: list[ReplayStats] = []

        def cold() -> None:
            iommu.iotlb_flush_all(d)

        def run(_state: None) -> None:
            out[:] = [tr.replay(sid, daddrs, accesses)]

        m = self.run_figure("replay", n, run, cold)
        if m is None:
            return
        stats = out[0]
        extra = {k: float(v) for k, v in stats.totals().items()}
        extra["hit_rate"] = stats.hit_rate
        self.record("replay", n, replace(m, extra=extra))

    # -- (6) memory per mapped page ---------------------------------------------------------------------------

    def memory(self, n: int) -> None:
        if not self.opts.wants("memory"):
            return
        self.progress(f"{self.vendor}: memory of a bulk map of {n} pages")
        s = self.subject(n, superpages=NO_SUPERPAGES)
        alloc = s.platform.machine.allocator
        gc.collect()
        frames0, rss0 = alloc.total_in_use, rss_bytes()
        s.map_all()
        rss1, frames1 = rss_bytes(), alloc.total_in_use
        del s, alloc
        gc.collect()
        s = self.subject(n, superpages=NO_SUPERPAGES)
        gc.collect()
        tracemalloc.start()
        try:
            before = _python_heap()
            s.map_all()
            gc.collect()
            after = _python_heap()
        finally:
            tracemalloc.stop()
        del s
        tables = frames1 - frames0
        self.result.memory[n] = MemoryRow(
            pages=n,
            table_frames=tables,
            table_bytes_per_page=tables * 4096 / n,
            bookkeeping_bytes_per_page=max(after - before, 0) / n,
            rss_bytes_per_page=max(rss1 - rss0, 0) / n,
            ideal_bytes_per_page=ideal_tables(n) * 4096 / n,
        )

    def guarded(self, group: str, step: Callable[[int], None], n: int) -> None:
        """Run one group of figures at one size; if its set-up fails, every figure of it records why."""
        try:
            step(n)
        except Exception as exc:  # as run_figure: record why and go on with the other groups
            why = f"{type(exc).__name__}: {exc}"
            keys = [k for k, f in FIGURES.items() if f.group == group] or [group]
            for k in keys:
                if self.opts.wants(k):
                    self.result.skipped.setdefault(k, why)
        gc.collect()


def _python_heap() -> int:
    """Bytes traced outside numpy's array data (whose frame storage is counted as table pages instead)."""
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.DomainFilter(inclusive=False, domain=np.lib.tracemalloc_domain)]
    )
    return sum(stat.size for stat in snap.statistics("filename"))


def ideal_tables(pages: int, levels: int = 4) -> int:
    """Tables of a ``levels``-level tree mapping frames 0 .. pages-1 (what the C program allocates)."""
    total = 1
    for k in range(1, levels):
        total += -(-pages // (512**k))
    return total


def run_vendor(
    vendor: str,
    opts: BenchOptions,
    *,
    factory: PlatformFactory | None = None,
    progress: Progress | None = None,
) -> VendorResult:
    """Every wanted figure of one vendor at every size; a vendor that is not installed is skipped."""
    result = VendorResult(vendor)
    if factory is None:
        if vendor not in VENDORS:
            result.skipped["*"] = f"unknown vendor (registered: {', '.join(sorted(VENDORS)) or 'none'})"
            return result
        if vendor not in available_vendors():
            result.skipped["*"] = "the vendor model is not installed"
            return result
        factory = default_factory
    run = _VendorRun(vendor, factory, opts, result, progress or _quiet)
    for n in opts.sizes:
        run.guarded("per-page", run.per_page, n)
        run.guarded("bulk", run.bulk, n)
        run.guarded("hwdom", run.hwdom, n)
        run.guarded("translate", run.translate, n)
        run.guarded("replay", run.replay, n)
        run.guarded("memory", run.memory, n)
    return result


def _quiet(_text: str) -> None:
    return None


def machine_info() -> dict[str, object]:
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu or host.processor(),
        "platform": host.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "mfn_base": MFN_BASE,
        "leaf_bits": LEAF_BITS,
    }


def run_benchmarks(
    opts: BenchOptions,
    *,
    factories: dict[str, PlatformFactory] | None = None,
    progress: Progress | None = None,
) -> BenchResult:
    """Baselines, then each vendor (``opts.vendors``, or every registered one, or the given factories)."""
    say = progress or _quiet
    result = BenchResult(tuple(opts.sizes), opts.repeats, machine_info())
    result.machine.update(opts.timing())
    run_baselines(opts, result, say)
    if not opts.vendor_figures_wanted:
        return result
    factories = factories or {}
    vendors = list(opts.vendors) if opts.vendors is not None else sorted(set(VENDORS) | set(factories))
    if not vendors:
        result.baseline_notes.append("no vendor model is registered yet: only the baselines were measured")
    for v in vendors:
        result.vendors.append(run_vendor(v, opts, factory=factories.get(v), progress=say))
    return result
