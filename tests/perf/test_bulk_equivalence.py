"""The bulk write paths leave memory exactly as the slow paths do, on every vendor.

Two fresh platforms get the same random sequence of range maps and unmaps (aligned and not, across a 1 GiB
boundary so that two level-2 tables are involved, over existing mappings, with partial unmaps): one through
the fast path, the other through the slow one.  Afterwards every hypervisor frame the domain's tables hold
must have the same number and the same 512 words, the allocator must account the same frames to the same
owners (with the same free list), the deferred frees must match, and the device's DMA must come out the
same for every page of the window.

* Superpages forbidden: fast = the range ops of the generic layer (bulk radix path), slow = one
  ``map_page``/``unmap_page`` per page with its flush.
* Superpages allowed: the per-page path never writes superpages, so the slow side is the same range ops with
  the radix engine's bulk path switched off (``RadixTable.bulk = False``, the plain per-table loop).
* ARM: the SMMU walks the p2m, whose range inserts are the bulk path; compared with the per-table loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from iommusim.bench.subjects import BENCH_CONFIG, BENCH_DEVICE, bench_device
from iommusim.errors import DmaFault, IommuError
from iommusim.frames import Dfn, Gfn, Mfn
from iommusim.machine.domain import Domain, DomainKind
from iommusim.machine.p2m import P2mType
from iommusim.pagetable.radix import RadixTable
from iommusim.perms import Perm
from iommusim.platform import HardwareSpec, Platform, available_vendors, build_platform

X86 = [v for v in ("vtd", "amd") if v in available_vendors()]
WINDOW = 3 * 512 + 17  # frames: a few leaf tables and a ragged end
#: First device frame of the window: 1024 frames below a 1 GiB boundary, so ranges cross into a second
#: level-2 table.
DFN0 = (1 << 18) - 1024
SHIFTS = (0, 1, 512, 7 * 512 + 3)  # machine-frame offsets: 2 MiB-compatible or not

Op = tuple[str, int, int, int, int]  # (kind, start, count, mfn shift, perms)


@contextmanager
def bulk_paths(on: bool) -> Iterator[None]:
    saved = RadixTable.bulk
    RadixTable.bulk = on
    try:
        yield
    finally:
        RadixTable.bulk = saved


@dataclass
class Rig:
    platform: Platform
    domain: Domain
    mfn0: int  # machine frame backing the window's first frame (shift 0)

    def map_fast(self, start: int, count: int, shift: int, perms: Perm) -> None:
        self.platform.iommu.map(self.domain, Dfn(DFN0 + start), Mfn(self.mfn0 + start + shift), count, perms)

    def unmap_fast(self, start: int, count: int) -> None:
        self.platform.iommu.unmap(self.domain, Dfn(DFN0 + start), count)

    def map_pages(self, start: int, count: int, shift: int, perms: Perm) -> None:
        iommu = self.platform.iommu
        for i in range(start, start + count):
            iommu.map_page(self.domain, Dfn(DFN0 + i), Mfn(self.mfn0 + i + shift), perms)

    def unmap_pages(self, start: int, count: int) -> None:
        iommu = self.platform.iommu
        for i in range(start, start + count):
            iommu.unmap_page(self.domain, Dfn(DFN0 + i))


def x86_rig(vendor: str, superpages: tuple[int, ...]) -> Rig:
    spec = HardwareSpec(vendor=vendor, ram_bytes=512 << 20, superpages=superpages, iotlb_entries=64)
    p = build_platform(spec, config=BENCH_CONFIG, devices=[bench_device()])
    p.create_hardware_domain(4 << 20)
    d = p.create_guest(1, 0, kind=DomainKind.PV)
    mfn = p.machine.allocator.alloc_domain(1, WINDOW + 8 * 512, align_order=9)
    p.iommu.assign_device(d, p.device(BENCH_DEVICE))
    return Rig(p, d, mfn.value)


def snapshot(p: Platform, owner: str) -> dict[str, object]:
    """Everything the equivalence is about: table frames and words, allocator accounting, deferred frees."""
    alloc = p.machine.allocator
    frames = [f.value for f in alloc.frames_of(owner)]
    mem = p.machine.memory
    return {
        "frames": frames,
        "words": [mem.peek_words(f).tobytes() for f in frames],
        "in_use": dict(alloc.in_use),
        "allocations": alloc.allocations,
        "frees": alloc.frees,
        "free_list": list(alloc._xen_free),
        "deferred": [(m.value, lv) for m, lv in p.iommu.deferred_frees()],
    }


def dma_view(p: Platform, first_dfn: int, pages: int) -> list[object]:
    dev = p.device(BENCH_DEVICE)
    out: list[object] = []
    for i in range(pages):
        for access in (Perm.R, Perm.W):
            daddr = ((first_dfn + i) << 12) | ((i * 40) & 0xFF8)
            try:
                out.append(p.machine.dma.translate(dev, daddr, access))
            except DmaFault as exc:
                out.append(type(exc).__name__)
    return out


ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(["map", "map", "unmap"]),
        st.integers(0, WINDOW - 1),
        st.one_of(st.integers(1, 40), st.integers(500, WINDOW)),
        st.sampled_from(SHIFTS),
        st.sampled_from([int(Perm.R), int(Perm.W), int(Perm.RW)]),
    ).map(lambda t: (t[0], t[1], min(t[2], WINDOW - t[1]), t[3], t[4])),
    min_size=1,
    max_size=4,
)

SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_ops(rig: Rig, ops: list[Op], *, fast: bool) -> None:
    for kind, start, count, shift, perms in ops:
        if kind == "map":
            (rig.map_fast if fast else rig.map_pages)(start, count, shift, Perm(perms))
        else:
            (rig.unmap_fast if fast else rig.unmap_pages)(start, count)


def assert_same(a: Rig, b: Rig) -> None:
    sa, sb = snapshot(a.platform, "d1:"), snapshot(b.platform, "d1:")
    assert sa["frames"] == sb["frames"]
    assert sa == sb
    assert a.platform.iommu.dump_page_tables(a.domain) == b.platform.iommu.dump_page_tables(b.domain)
    assert dma_view(a.platform, DFN0, WINDOW) == dma_view(b.platform, DFN0, WINDOW)


WHOLE_TABLES: list[Op] = [("map", 0, WINDOW, 1, 3), ("unmap", 5, WINDOW - 5, 0, 0), ("map", 700, 800, 7, 1)]


@pytest.mark.parametrize("vendor", X86)
@SETTINGS
@given(ops=ops_strategy)
@example(ops=WHOLE_TABLES)  # whole leaf tables mapped, emptied by one unmap, then partly refilled
def test_bulk_range_ops_equal_per_page_ops_without_superpages(vendor: str, ops: list[Op]) -> None:
    fast, slow = x86_rig(vendor, ()), x86_rig(vendor, ())
    run_ops(fast, ops, fast=True)
    run_ops(slow, ops, fast=False)
    assert_same(fast, slow)


@pytest.mark.parametrize("vendor", X86)
@SETTINGS
@given(ops=ops_strategy)
def test_bulk_range_ops_equal_the_per_table_loop_with_superpages(vendor: str, ops: list[Op]) -> None:
    fast, slow = x86_rig(vendor, (21, 30)), x86_rig(vendor, (21, 30))
    with bulk_paths(True):
        run_ops(fast, ops, fast=True)
    with bulk_paths(False):
        run_ops(slow, ops, fast=True)
    assert_same(fast, slow)


@pytest.mark.parametrize("vendor", X86)
def test_a_failed_bulk_map_leaves_nothing_behind(vendor: str) -> None:
    """ENOMEM at each table allocation of a bulk map in turn: memory and accounting as if it never ran."""
    ref = x86_rig(vendor, ())
    ref.map_fast(600, 5, 0, Perm.R)
    before = snapshot(ref.platform, "d1:")
    nth = 1
    while True:
        rig = x86_rig(vendor, ())
        rig.map_fast(600, 5, 0, Perm.R)  # some leaf tables exist already, others must be allocated
        plan = rig.platform.machine.allocator.fail_nth(nth, owner_prefix="d1:")
        try:
            rig.platform.iommu.map(rig.domain, Dfn(DFN0), Mfn(rig.mfn0), WINDOW, Perm.RW)
        except IommuError:  # ENOMEM (AMD reports it as EFAULT, as Xen does)
            assert plan.fired
        else:
            assert not plan.fired
            break
        after = snapshot(rig.platform, "d1:")
        for key in ("frames", "words", "in_use", "deferred"):
            assert after[key] == before[key], (nth, key)
        assert dma_view(rig.platform, DFN0, WINDOW) == dma_view(ref.platform, DFN0, WINDOW)
        nth += 1
    assert nth > 3  # the map needed several tables: failures were injected at several points


# -- ARM: the p2m the SMMU walks -----------------------------------------------------------------------------------


def arm_rig() -> Platform:
    spec = HardwareSpec(vendor="smmu", ram_bytes=512 << 20, superpages=(21, 30), iotlb_entries=64)
    p = build_platform(spec, config=BENCH_CONFIG, devices=[bench_device()])
    p.create_hardware_domain(4 << 20)
    return p


@pytest.mark.skipif("smmu" not in available_vendors(), reason="the SMMU model is not installed")
@SETTINGS
@given(ops=ops_strategy)
def test_arm_p2m_bulk_inserts_equal_the_per_table_loop(ops: list[Op]) -> None:
    rigs = []
    for on in (True, False):
        p = arm_rig()
        d = p.machine.hardware_domain
        assert d is not None and d.p2m is not None
        p2m = d.p2m
        base = (1 << 18) - 1024
        with bulk_paths(on):
            for kind, start, count, shift, perms in ops:
                t = P2mType.RAM_RW if perms & Perm.W else P2mType.RAM_RO
                if kind == "map":
                    p2m.insert_mapping(Gfn(base + start), count, Mfn(base + start + shift), t)  # type: ignore[attr-defined]
                else:
                    p2m.remove_mapping(Gfn(base + start), count)  # type: ignore[attr-defined]
        rigs.append((p, d, base))
    (pa, da, base), (pb, db, _) = rigs
    assert snapshot(pa, "d0:") == snapshot(pb, "d0:")
    assert dma_view(pa, base, WINDOW) == dma_view(pb, base, WINDOW)


def smmu_rig(superpages: tuple[int, ...]) -> Rig:
    """The direct-mapped hardware domain with the device attached: the only map the SMMU driver accepts."""
    import contextlib

    from iommusim.errors import AlreadyExists

    spec = HardwareSpec(vendor="smmu", ram_bytes=2 << 30, superpages=superpages, iotlb_entries=64)
    p = build_platform(spec, config=BENCH_CONFIG, devices=[bench_device()])
    d = p.create_hardware_domain(4 << 20)
    with contextlib.suppress(AlreadyExists):
        p.iommu.assign_device(d, p.device(BENCH_DEVICE))
    return Rig(p, d, DFN0)


smmu_ops = ops_strategy.map(lambda ops: [(k, a, n, 0, p) for k, a, n, _, p in ops])


@pytest.mark.skipif("smmu" not in available_vendors(), reason="the SMMU model is not installed")
@SETTINGS
@given(ops=smmu_ops)
def test_smmu_range_ops_equal_per_page_ops(ops: list[Op]) -> None:
    """Same translations; same table words while nothing was unmapped (a range unmap reclaims the tables it
    empties whole, the per-page one leaves them empty, as the p2m documents)."""
    fast, slow = smmu_rig(()), smmu_rig(())
    run_ops(fast, ops, fast=True)
    run_ops(slow, ops, fast=False)
    if all(kind == "map" for kind, *_ in ops):
        assert snapshot(fast.platform, "d0:") == snapshot(slow.platform, "d0:")
    pf, ps = fast.domain.p2m, slow.domain.p2m
    assert pf is not None and ps is not None
    assert list(pf.items()) == list(ps.items())
    assert dma_view(fast.platform, DFN0, WINDOW) == dma_view(slow.platform, DFN0, WINDOW)


def test_fill_leaves_above_bit_63_matches_the_plain_formula() -> None:
    """Leaves whose bits reach bit 63 cannot come from a uint64 arange: the fallback gives the same words."""
    from iommusim.pagetable.radix import _fill_leaves

    bits = (1 << 63) | (1 << 62) | 3
    out = np.empty(5, dtype=np.uint64)
    _fill_leaves(out, (0x1234 << 12) | bits, bits)
    assert [int(w) for w in out] == [((0x1234 + k) << 12) | bits for k in range(5)]


# -- the software walk's fast table test agrees with the full decode --------------------------------------------------


def _formats() -> list[object]:
    from iommusim.pagetable.amd import AmdV1Format
    from iommusim.pagetable.arm_s2 import ArmS2Format
    from iommusim.pagetable.vtd import VtdSecondLevelFormat

    return [ArmS2Format(), AmdV1Format(), VtdSecondLevelFormat(haw=46, superpage_levels=frozenset({2, 3}))]


@settings(max_examples=400, deadline=None)
@given(
    raw=st.one_of(
        st.integers(0, (1 << 64) - 1),
        st.integers(0, (1 << 52) - 1).map(lambda r: r | 1),
        st.integers(0, (1 << 52) - 1).map(lambda r: (r & ~0xE00) | 0x603),  # AMD PDE with NextLevel 3
        st.integers(0, (1 << 48) - 1).map(lambda r: (r & ~0xFFF) | 0x7FF),  # ARM table descriptor and more
    ),
    level=st.integers(1, 4),
)
def test_is_table_is_the_tables_of_decode(raw: int, level: int) -> None:
    from iommusim.pagetable.format import EntryKind

    for fmt in _formats():
        assert fmt.is_table(raw, level) == (fmt.decode(raw, level).kind == EntryKind.TABLE)  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.parametrize("vendor", X86)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_strategy, superpages=st.sampled_from([(), (21,), (21, 30)]))
def test_bulk_range_ops_deep(vendor: str, ops: list[Op], superpages: tuple[int, ...]) -> None:
    """The deep version: more sequences, every superpage setting, against the per-table loop."""
    fast, slow = x86_rig(vendor, superpages), x86_rig(vendor, superpages)
    with bulk_paths(True):
        run_ops(fast, ops, fast=True)
    with bulk_paths(False):
        run_ops(slow, ops, fast=True)
    assert_same(fast, slow)


@pytest.mark.parametrize(("levels", "root_pages"), [(1, 4), (2, 2), (3, 16), (4, 1)])
def test_set_leaf_fast_walk_agrees_with_the_journalled_one(levels: int, root_pages: int) -> None:
    """The per-page fast path (tables all there) writes where the full descent writes, roots of any shape."""
    from iommusim.machine import Machine
    from iommusim.pagetable.vtd import VtdSecondLevelFormat

    fmt = VtdSecondLevelFormat(haw=46, superpage_levels=frozenset())
    tables = []
    for _ in range(2):
        m = Machine(ram_bytes=64 << 20)
        tables.append(RadixTable(m.memory, m.allocator, fmt, owner="t", levels=levels, root_pages=root_pages))
    fast, slow = tables
    rng = np.random.default_rng(7)
    dfns = rng.integers(0, fast.dfn_limit, size=200).tolist()
    for t in tables:  # build the same tables first, then overwrite through both paths
        for dfn in dfns:
            t.map_range(dfn, 0x1000, 1, {1: 3})
    for k, dfn in enumerate(dfns):
        a = fast.set_leaf(dfn, ((k + 5) << 12) | 1)
        with bulk_paths(False):
            slow.check_dfn(dfn)
            b = slow.map_range(dfn, (k + 5) << 12, 1, {1: 1})
        assert (a.flush, fast.lookup(dfn)) == (b.flush, slow.lookup(dfn))
    words = [[t.memory.peek_words(f).tobytes() for f in t.table_frames()] for t in tables]
    assert words[0] == words[1]
