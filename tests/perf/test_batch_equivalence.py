"""The fast batch paths of every hardware model against the reference loop over translate(), per vendor.

Each example builds the same drawn page-table image twice (``batch_rigs``), then runs one unit through the
unit's own ``translate_batch``/``replay`` and its twin through ``ReferenceBatch`` (or, with the IOTLB
bypassed, through ``translate`` with empty translation caches for each address), and compares every
answer and then everything the units recorded: fault registers or event log, interrupts, counters, the
IOTLB and the other caches in LRU order.  Between calls the images change without any invalidation, so
stale IOTLB and paging-structure cache entries must be honoured the way translate() honours them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from batch_rigs import KINDS, REGIONS, SID, AmdRig, Op, Rig, SmmuRig, VtdRig
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from iommusim.errors import DmaFault
from iommusim.frames import PAGE_SHIFT
from iommusim.hw.batch import FAULT_NONE, BatchResult, BatchTranslator, ReferenceBatch, ReplayStats, fault_code
from iommusim.perms import Perm

ops_st = st.builds(
    Op,
    region=st.integers(0, len(REGIONS) - 1),
    page=st.integers(0, 15),
    level=st.sampled_from([1, 1, 1, 2, 2, 3, 4, 5, 6]),
    kind=st.sampled_from(KINDS),
    perms=st.sampled_from([3, 3, 3, 1, 2, 0]),
    x=st.integers(0, 1 << 16),
)
near = st.builds(
    lambda r, p, off: REGIONS[r] + (p << PAGE_SHIFT) + off,
    st.integers(0, len(REGIONS) - 1),
    st.integers(0, 20),
    st.integers(0, 4095),
)
#: an address is near one the recipe wrote (by op index, most often), near a region, or anywhere
on_op = st.tuples(st.integers(0, 1 << 10), st.sampled_from([0, 0, 1, 3, 7, -1]), st.integers(0, 4095))
addr_st = st.lists(st.one_of(on_op, on_op, on_op, on_op, near, st.integers(0, (1 << 64) - 1)), min_size=1, max_size=40)


def resolve(picks: list[Any], ops: list[Op]) -> list[int]:
    """Turn drawn picks into device addresses (an op pick lands on or beside the page the op wrote)."""
    out = []
    for pick in picks:
        if isinstance(pick, tuple):
            if not ops:
                continue
            i, dp, off = pick
            op = ops[i % len(ops)]
            pick = max(0, REGIONS[op.region] + ((op.page + dp) << PAGE_SHIFT) + off)
        out.append(pick)
    return out or [0]


acc_st = st.sampled_from([1, 2, 3])

vtd_params = st.fixed_dictionaries(
    {
        "aw": st.sampled_from([1, 2, 3]),
        "cm": st.booleans(),
        "sllps": st.sampled_from([0, 1, 3]),
        "nfr": st.integers(1, 3),
        "handler": st.booleans(),
        "iotlb": st.integers(1, 8),
        "pde": st.integers(1, 4),
        "t": st.sampled_from([0, 0, 0, 1, 2]),  # second-level, device-TLB, pass-through contexts
    }
)
amd_params = st.fixed_dictionaries(
    {
        "mode": st.integers(1, 6),
        "dte_perms": st.sampled_from([1, 3, 3, 3]),
        "handler": st.booleans(),
        "iotlb": st.integers(1, 8),
        "evt_head": st.sampled_from([0, 0, 3, 250]),
        "exclusion": st.booleans(),
    }
)
smmu_params = st.fixed_dictionaries(
    {
        "geometry": st.integers(0, 4),
        "ps": st.sampled_from([2, 5]),
        "affd": st.booleans(),
        "stall": st.booleans(),
        "handler": st.booleans(),
        "iotlb": st.integers(1, 8),
        "tlb_shifts": st.sampled_from([(12, 21, 30), (12, 21, 30), (12,), (12, 30)]),
    }
)
BUILDERS: dict[str, tuple[Callable[..., Rig], Any]] = {
    "vtd": (VtdRig, vtd_params),
    "amd": (AmdRig, amd_params),
    "smmu": (SmmuRig, smmu_params),
}


def twins(vendor: str, params: dict[str, Any], ops: list[Op]) -> tuple[Rig, Rig]:
    make = BUILDERS[vendor][0]
    out = []
    for _ in range(2):
        rig = make(**params)
        for op in ops:
            rig.apply(op)
        out.append(rig)
    return out[0], out[1]


def bypass_reference(rig: Rig, addrs: np.ndarray, access: Perm) -> list[tuple[int, int, int, bool]]:
    """translate() of each address with the unit's translation caches empty and left untouched."""
    out = []
    for a in addrs.tolist():
        with rig.unit._bypassing_caches():
            try:
                t = rig.unit.translate(SID, a, access)
            except DmaFault as exc:
                out.append((0, fault_code(exc), 0, False))
            else:
                out.append((t.maddr, FAULT_NONE, t.page_shift, t.cached))
    return out


def rows(r: BatchResult) -> list[tuple[int, int, int, bool]]:
    return list(zip(r.maddrs.tolist(), r.faults.tolist(), r.page_shifts.tolist(), r.cached.tolist(), strict=True))


def steps(r: ReplayStats) -> list[tuple[int, ...]]:
    cols = (r.maddrs, r.faults, r.hits, r.misses, r.evictions)
    return list(zip(*(c.tolist() for c in cols), strict=True))


def same_state(fast: Rig, ref: Rig) -> None:
    a, b = fast.state(), ref.state()
    for key in b:
        assert a[key] == b[key], key


def check_vendor(
    vendor: str, params: dict[str, Any], ops: list[Op], later: list[Op], addrs: list[Any], accs: list[int]
) -> None:
    fast, ref = twins(vendor, params, ops)
    assert isinstance(fast.unit, BatchTranslator)
    addrs = resolve(addrs, ops + later)
    daddrs = np.array(addrs, dtype=np.uint64)
    # 1. through the IOTLB, cold
    got = fast.unit.translate_batch(SID, daddrs, Perm.R)
    want = ReferenceBatch(ref.unit).translate_batch(SID, daddrs, Perm.R)
    assert rows(got) == rows(want)
    same_state(fast, ref)
    event(f"plan: {fast.unit._batch_plan(SID) is not None}; translated: {min(3, int(got.ok.sum()))}+")
    event(f"faults: {min(3, got.fault_count)}+; from the IOTLB: {min(3, int(got.cached.sum()))}+")
    # 2. the tables change with no invalidation: cached translations go stale
    for rig in (fast, ref):
        for op in later:
            rig.apply(op)
    # 3. a trace of mixed accesses
    trace = np.array((addrs * 2)[: 2 * len(addrs)], dtype=np.uint64)
    kinds = np.array((accs * (len(trace) // max(1, len(accs)) + 1))[: len(trace)], dtype=np.uint8)
    got_r = fast.unit.replay(SID, trace, kinds)
    want_r = ReferenceBatch(ref.unit).replay(SID, trace, kinds)
    assert steps(got_r) == steps(want_r)
    same_state(fast, ref)
    # 4. the IOTLB bypassed: every address from memory, the caches neither consulted nor changed
    before = fast.state()
    got = fast.unit.translate_batch(SID, daddrs, Perm.W, use_iotlb=False)
    assert got.iotlb_bypassed and not got.cached.any()
    assert rows(got) == bypass_reference(ref, daddrs, Perm.W)
    same_state(fast, ref)
    after = fast.state()
    for cache in ("iotlb", "pde", "negative", "tlb"):
        if cache in before:
            assert after[cache] == before[cache]
    # 5. through the IOTLB again, warm and stale
    got = fast.unit.translate_batch(SID, daddrs, Perm.RW)
    want = ReferenceBatch(ref.unit).translate_batch(SID, daddrs, Perm.RW)
    assert rows(got) == rows(want)
    same_state(fast, ref)


def _given(vendor: str, examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return lambda f: settings(
        max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
    )(
        given(
            BUILDERS[vendor][1],
            st.lists(ops_st, max_size=14),
            st.lists(ops_st, max_size=4),
            addr_st,
            st.lists(acc_st, min_size=1, max_size=5),
        )(f)
    )


@pytest.mark.parametrize("vendor", ["vtd", "amd", "smmu"])
def test_fast_batch_equals_the_reference(vendor: str) -> None:
    @_given(vendor, 100)
    def run(params: dict[str, Any], ops: list[Op], later: list[Op], addrs: list[int], accs: list[int]) -> None:
        check_vendor(vendor, params, ops, later, addrs, accs)

    run()


@pytest.mark.slow
@pytest.mark.parametrize("vendor", ["vtd", "amd", "smmu"])
def test_fast_batch_equals_the_reference_deep(vendor: str) -> None:
    @_given(vendor, 600)
    def run(params: dict[str, Any], ops: list[Op], later: list[Op], addrs: list[int], accs: list[int]) -> None:
        check_vendor(vendor, params, ops, later, addrs, accs)

    run()
