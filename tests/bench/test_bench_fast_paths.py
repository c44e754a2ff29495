"""The benchmark's translation and replay figures on the real hardware models use their fast batch API,
and that API agrees with the reference loop on the benchmark's own subjects (tiny sizes, no timings)."""

from __future__ import annotations

import numpy as np
import pytest

from iommusim.bench import BenchOptions, run_vendor
from iommusim.bench.subjects import NO_SUPERPAGES, SUPERPAGES_ALL, Subject, default_factory, make_subject
from iommusim.bench.workloads import dma_trace, random_daddrs
from iommusim.hw.batch import BatchTranslator, ReferenceBatch
from iommusim.perms import Perm
from iommusim.platform import VENDORS

HW = [v for v in ("vtd", "amd", "smmu") if v in VENDORS]


def subject(vendor: str, pages: int, superpages: tuple[int, ...] = NO_SUPERPAGES) -> Subject:
    s = make_subject(default_factory, vendor, pages, superpages=superpages)
    s.map_all()
    return s


def unit_and_sid(s: Subject) -> tuple[object, int]:
    route = s.platform.machine.dma.route_of(s.device)
    assert route is not None
    return route.unit, route.source_id


@pytest.mark.parametrize("vendor", HW)
def test_bench_translation_and_replay_take_the_fast_path(vendor: str) -> None:
    opts = BenchOptions(
        sizes=(64,),
        repeats=1,
        warmup=0,
        budget_s=None,
        vendors=(vendor,),
        only=frozenset({"translate", "replay"}),
    )
    v = run_vendor(vendor, opts)
    assert not any("no batch API" in n for n in v.notes)
    for key in ("translate-bypass", "translate-iotlb"):
        extra = v.figures[key].by_size[64].extra
        assert extra["faults"] == 0 and extra["wrong"] == 0
        assert extra["iotlb_bypassed"] == (1.0 if key == "translate-bypass" else 0.0)
    replay = v.figures["replay"].by_size[64].extra
    assert replay["steps"] == 64 and replay["hits"] + replay["misses"] == 64 and replay["faults"] == 0


@pytest.mark.parametrize("vendor", HW)
@pytest.mark.parametrize("superpages", [NO_SUPERPAGES, SUPERPAGES_ALL])
def test_fast_batch_agrees_with_the_reference_on_bench_subjects(vendor: str, superpages: tuple[int, ...]) -> None:
    pages = 1024
    fast_s, ref_s = subject(vendor, pages, superpages), subject(vendor, pages, superpages)
    (fast, sid), (ref, _) = unit_and_sid(fast_s), unit_and_sid(ref_s)
    assert isinstance(fast, BatchTranslator)
    # a few addresses past the mapping fault; the rest land where the subject's mapping says
    daddrs = random_daddrs(600, pages + 8, first_dfn=fast_s.dfn.value)
    trace, kinds = dma_trace(900, pages, first_dfn=fast_s.dfn.value)
    reference = ReferenceBatch(ref)  # type: ignore[arg-type]
    expected = fast_s.expected_maddrs(daddrs)
    for use_iotlb in (True, False, True):
        got = fast.translate_batch(sid, daddrs, Perm.R, use_iotlb=use_iotlb)
        if use_iotlb:
            want = reference.translate_batch(sid, daddrs, Perm.R)
            assert np.array_equal(got.cached, want.cached)
            assert tlb_of(fast) == tlb_of(ref)
        else:
            assert got.iotlb_bypassed and not got.cached.any()
        assert np.array_equal(got.maddrs, want.maddrs) and np.array_equal(got.faults, want.faults)
        assert np.array_equal(got.page_shifts, want.page_shifts)
        assert np.array_equal(got.maddrs[got.ok], expected[got.ok])
        assert 0 < got.fault_count < 100
    r_got, r_want = fast.replay(sid, trace, kinds), reference.replay(sid, trace, kinds)
    for field in ("maddrs", "faults", "hits", "misses", "evictions"):
        assert np.array_equal(getattr(r_got, field), getattr(r_want, field)), field
    assert tlb_of(fast) == tlb_of(ref)


def tlb_of(unit: object) -> list[object]:
    """The unit's IOTLB entries, least recently used first (the SMMU calls its IOTLB ``tlb``)."""
    tlb = getattr(unit, "iotlb", None) or unit.tlb
    return list(tlb.entries())
