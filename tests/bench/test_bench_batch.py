"""The batch-translation protocol: the reference loop agrees with translate() address by address."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
from bench_doubles import REASON_NOT_PRESENT, REASON_PERMISSION, ToyUnit
from hypothesis import given, settings
from hypothesis import strategies as st

from doubles import ToyFormat
from iommusim.errors import DmaFault, InvalidArgument
from iommusim.frames import PAGE_SHIFT
from iommusim.hw.base import DmaRemapper, Translation
from iommusim.hw.batch import (
    FAULT_NONE,
    FAULT_UNSPECIFIED,
    BatchResult,
    BatchTranslator,
    ReferenceBatch,
    ReplayStats,
    batch_translator,
    fault_code,
)
from iommusim.machine import Machine
from iommusim.pagetable.radix import RadixTable
from iommusim.perms import Perm

SID = 0x0300
FIRST = 0x100  # first device frame the test mappings use


def toy_unit(iotlb_entries: int = 1024) -> tuple[ToyUnit, int]:
    """A toy unit whose device (source id SID) maps frames FIRST..FIRST+63 to 0x8000 onwards: even frames
    read-write, odd ones read-only.  The tables are written with the radix engine straight into memory, as
    a driver would, and the context is programmed the way the toy driver does."""
    m = Machine(ram_bytes=64 << 20)
    fmt = ToyFormat()
    table = RadixTable(m.memory, m.allocator, fmt, owner="d1:iommu-pt", levels=4)
    for i in range(64):
        table.set_leaf(FIRST + i, ((0x8000 + i) << PAGE_SHIFT) | fmt.leaf_bits(Perm.RW if i % 2 == 0 else Perm.R, 1))
    unit = ToyUnit(m.memory, iotlb_entries=iotlb_entries)
    root = table.root
    assert root is not None
    unit.contexts[SID] = (root.value, 1)
    return unit, SID


def one_by_one(unit: DmaRemapper, sid: int, daddrs: list[int], accesses: list[int]) -> list[tuple[int, int, int, bool]]:
    """(maddr, fault code, page shift, cached) of each access, translated one call at a time."""
    out = []
    for a, acc in zip(daddrs, accesses, strict=True):
        try:
            t = unit.translate(sid, a, Perm(acc))
        except DmaFault as exc:
            out.append((0, fault_code(exc), 0, False))
        else:
            out.append((t.maddr, FAULT_NONE, t.page_shift, t.cached))
    return out


# device addresses in and around the mapped frames (some unmapped), and the access of each
_accesses = st.lists(
    st.tuples(st.integers(FIRST - 4, FIRST + 72), st.integers(0, 4095), st.sampled_from([int(Perm.R), int(Perm.W)])),
    min_size=1,
    max_size=60,
)


@settings(max_examples=25, deadline=None)
@given(_accesses, st.booleans())
def test_translate_batch_agrees_with_translate(steps: list[tuple[int, int, int]], use_iotlb: bool) -> None:
    batch_unit, sid = toy_unit()
    loop_unit, _ = toy_unit()
    daddrs = np.array([(f << 12) | off for f, off, _ in steps], dtype=np.uint64)
    for access in (Perm.R, Perm.W):
        res = ReferenceBatch(batch_unit).translate_batch(sid, daddrs, access, use_iotlb=use_iotlb)
        want = one_by_one(loop_unit, sid, daddrs.tolist(), [int(access)] * len(steps))
        got = list(
            zip(res.maddrs.tolist(), res.faults.tolist(), res.page_shifts.tolist(), res.cached.tolist(), strict=True)
        )
        assert got == want
        assert not res.iotlb_bypassed  # the reference cannot look past the unit's caches
    # the unit recorded the same faults and counted the same events either way
    assert batch_unit.faults == loop_unit.faults
    assert batch_unit.counters() == loop_unit.counters()


@settings(max_examples=25, deadline=None)
@given(_accesses)
def test_replay_agrees_with_translate_and_counts_evictions(steps: list[tuple[int, int, int]]) -> None:
    batch_unit, sid = toy_unit(iotlb_entries=4)  # a tiny IOTLB so that the trace evicts
    loop_unit, _ = toy_unit(iotlb_entries=4)
    daddrs = np.array([(f << 12) | off for f, off, _ in steps], dtype=np.uint64)
    accesses = np.array([a for _, _, a in steps], dtype=np.uint8)
    before = dict(batch_unit.counters())
    stats = ReferenceBatch(batch_unit).replay(sid, daddrs, accesses)
    want = one_by_one(loop_unit, sid, daddrs.tolist(), accesses.tolist())
    assert stats.maddrs.tolist() == [w[0] for w in want]
    assert stats.faults.tolist() == [w[1] for w in want]
    # where the access went through, a hit is exactly a translation served from the IOTLB
    assert [h for h, w in zip(stats.hits.tolist(), want, strict=True) if w[1] == FAULT_NONE] == [
        int(w[3]) for w in want if w[1] == FAULT_NONE
    ]
    assert (stats.hits + stats.misses).tolist() == [1] * len(steps)
    after = batch_unit.counters()
    totals = stats.totals()
    assert totals["evictions"] == after.get("iotlb_evictions", 0) - before.get("iotlb_evictions", 0)
    assert totals["hits"] == after.get("iotlb_hits", 0) - before.get("iotlb_hits", 0)
    assert totals["faults"] == after.get("faults", 0) - before.get("faults", 0)
    assert batch_unit.faults == loop_unit.faults


def test_fault_codes_and_results_by_hand() -> None:
    unit, sid = toy_unit()
    ref = ReferenceBatch(unit)
    daddrs = np.array([(FIRST << 12) | 0x10, ((FIRST + 1) << 12) | 0x20, (FIRST + 64) << 12], dtype=np.uint64)
    res = ref.translate_batch(sid, daddrs, Perm.W)
    # frame FIRST -> 0x8000 (read-write): 0x8000_010; FIRST+1 is read-only (a write faults); FIRST+64 unmapped
    assert res.maddrs.tolist() == [0x8000_010, 0, 0]
    assert res.faults.tolist() == [FAULT_NONE, REASON_PERMISSION, REASON_NOT_PRESENT]
    assert res.page_shifts.tolist() == [12, 0, 0] and res.ok.tolist() == [True, False, False]
    assert res.fault_count == 2 and len(res) == 3
    again = ref.translate_batch(sid, daddrs[:1], Perm.R)
    assert again.cached.tolist() == [True]  # the first call filled the IOTLB
    assert fault_code(DmaFault("no record")) == FAULT_UNSPECIFIED
    assert fault_code(DmaFault("bool", record=type("R", (), {"reason": True})())) == FAULT_UNSPECIFIED
    with pytest.raises(InvalidArgument):
        ref.translate_batch(sid, np.zeros((2, 2), dtype=np.uint64), Perm.R)
    with pytest.raises(InvalidArgument):
        ref.translate_batch(sid, np.array([-1]), Perm.R)
    with pytest.raises(InvalidArgument):
        ref.replay(sid, daddrs, np.array([1], dtype=np.uint8))


def test_result_shapes_are_checked() -> None:
    z = np.zeros(2, dtype=np.uint64)
    with pytest.raises(InvalidArgument):
        BatchResult(z, np.zeros(3, dtype=np.uint16), np.zeros(2, dtype=np.uint8), np.zeros(2, dtype=bool), True)
    with pytest.raises(InvalidArgument):
        ReplayStats(
            z, np.zeros(2, dtype=np.uint16), np.zeros(1, dtype=np.uint8), z.astype(np.uint8), z.astype(np.uint16)
        )


def test_replay_summaries_by_hand() -> None:
    s = ReplayStats(
        maddrs=np.zeros(4, dtype=np.uint64),
        faults=np.array([0, 0, 5, 0], dtype=np.uint16),
        hits=np.array([0, 1, 0, 1], dtype=np.uint8),
        misses=np.array([1, 0, 1, 0], dtype=np.uint8),
        evictions=np.array([0, 0, 2, 1], dtype=np.uint16),
    )
    assert s.totals() == {"steps": 4, "hits": 2, "misses": 2, "evictions": 3, "faults": 1}
    c = s.cumulative()
    assert c["hits"].tolist() == [0, 1, 1, 2] and c["evictions"].tolist() == [0, 0, 2, 3]
    assert s.hit_rate == 0.5


class FastToyUnit(ToyUnit):
    """A unit that offers the batch calls itself (here simply by delegating)."""

    def translate_batch(
        self, source_id: int, daddrs: np.ndarray, access: Perm, *, use_iotlb: bool = True
    ) -> BatchResult:
        return ReferenceBatch(self).translate_batch(source_id, daddrs, access, use_iotlb=use_iotlb)

    def replay(self, source_id: int, daddrs: np.ndarray, accesses: np.ndarray) -> ReplayStats:
        return ReferenceBatch(self).replay(source_id, daddrs, accesses)


def test_a_unit_with_its_own_batch_calls_is_used_directly() -> None:
    unit, _ = toy_unit()
    assert isinstance(batch_translator(unit), ReferenceBatch)
    fast = FastToyUnit(unit.memory)
    assert isinstance(fast, BatchTranslator) and batch_translator(fast) is fast


class CountingUnit:
    """A remapper without the shared IOTLB's counter names: replay reports no evictions, not an error."""

    name = "plain"

    def translate(self, source_id: int, daddr: int, access: Perm) -> Translation:
        return Translation(daddr + 0x1000, 12, Perm.RW, False)

    def counters(self) -> Mapping[str, int]:
        return {}


def test_reference_with_a_minimal_remapper() -> None:
    stats = ReferenceBatch(CountingUnit()).replay(0, np.array([0, 8], dtype=np.uint64), np.array([1, 2], np.uint8))
    assert stats.maddrs.tolist() == [0x1000, 0x1008] and stats.totals()["evictions"] == 0
    assert stats.misses.tolist() == [1, 1]
