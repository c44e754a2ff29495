"""Hardware-domain set-up by extents selects exactly what the per-page selection selects.

Two selections are worked out by extents: the strict map of the domain's own pages (``owned_runs``, from
the allocator's runs of the domain, checked in bulk) and the x86 identity map (``_hwdom_runs``, from the
E820 boundaries and the stretches Xen owns).  Each is compared with its per-page reference on machines
whose page state Hypothesis disturbs: page types, M2P entries moved, cleared or made to collide, frames
freed and given again, E820 maps with holes, reserved and unusable ranges, every option combination.
Then the set-up itself is run both ways on real vendors and the tables compared bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iommusim.bench.subjects import BENCH_CONFIG, bench_device
from iommusim.frames import Mfn
from iommusim.iommu import hwdom
from iommusim.iommu.config import IommuConfig
from iommusim.machine import DomainKind, Machine, PageType
from iommusim.machine.pages import DOMID_XEN, E820Entry, E820Map, E820Type
from iommusim.perms import Perm
from iommusim.platform import HardwareSpec, Platform, available_vendors, build_platform

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Disturbance = tuple[str, int, int, int]  # (what, offset, count, value)

disturbances = st.lists(
    st.tuples(
        st.sampled_from(["type", "type-noref", "m2p-clear", "m2p-move", "m2p-collide", "free", "more"]),
        st.integers(0, 3000),
        st.integers(1, 600),
        st.integers(0, 7),
    ),
    max_size=5,
)


def per_page_runs(m: Machine, domid: int) -> list[tuple[int, int, int, Perm]]:
    return hwdom.owned_runs_per_page(m, domid)


def disturbed_machine(ops: list[Disturbance]) -> Machine:
    m = Machine(ram_bytes=64 << 20)
    d = m.create_domain(0, DomainKind.PV, hardware=True, memory_bytes=16 << 20)
    m.populate(d, 700)  # a second extent, adjacent in guest frames
    base = d.extents[0].mfn.value
    pt = m.pages
    for what, off, count, value in ops:
        mfn = base + off
        count = min(count, pt.frames - mfn)
        if what == "type":
            pt.set_type(mfn, PageType(value), count=count)
        elif what == "type-noref":
            pt.set_type(mfn, PageType(value), count=count, type_count=0)
        elif what == "m2p-clear":
            pt.m2p[mfn : mfn + count] = 0xFFFF_FFFF_FFFF_FFFF
        elif what == "m2p-move":
            pt.m2p[mfn : mfn + count] = np.arange(count, dtype=np.uint64) + np.uint64(0x9000 + value)
        elif what == "m2p-collide":
            pt.m2p[mfn] = pt.m2p[base + value]  # two pages claim one guest frame
        elif what == "free":
            if pt.owner[mfn] == 0:
                m.allocator.free_domain(Mfn(mfn), 1 + value)
        else:
            m.populate(d, count, align_order=value % 3)
    return m


@SETTINGS
@given(ops=disturbances)
def test_owned_runs_by_extents_equal_the_per_page_selection(ops: list[Disturbance]) -> None:
    m = disturbed_machine(ops)
    assert hwdom.owned_runs(m, 0) == per_page_runs(m, 0)


def test_owned_runs_of_an_untouched_domain_are_one_run_per_extent() -> None:
    m = Machine(ram_bytes=64 << 20)
    d = m.create_domain(0, DomainKind.PV, hardware=True, memory_bytes=16 << 20)
    ext = d.extents[0]
    assert hwdom.owned_runs(m, 0) == [(ext.gfn.value, ext.mfn.value, ext.count, Perm.RW)]
    assert per_page_runs(m, 0) == hwdom.owned_runs(m, 0)


def test_allocator_extents_follow_partial_frees() -> None:
    m = Machine(ram_bytes=64 << 20)
    a = m.allocator
    first = a.alloc_domain(5, 100).value
    a.free_domain(Mfn(first + 10), 20)
    assert a.domain_extents(5) == [(first, 10), (first + 30, 70)]
    a.free_domain(Mfn(first), 10)
    a.free_domain(Mfn(first + 30), 70)
    assert a.domain_extents(5) == []


# -- the x86 identity map --------------------------------------------------------------------------------------

e820s = st.lists(
    st.tuples(st.integers(0, 0x120000), st.integers(1, 0x8000), st.sampled_from(list(E820Type))),
    max_size=6,
)


def identity_machine(entries: list[tuple[int, int, E820Type]], xen: list[tuple[int, int]]) -> Machine:
    m = Machine(ram_bytes=256 << 20)
    kept: list[E820Entry] = [E820Entry(0, m.pages.frames, E820Type.RAM)]
    for start, count, t in sorted(entries):
        start = max(start, kept[-1].end_pfn)
        kept.append(E820Entry(start, count, t))
    m.e820 = E820Map(kept)
    for start, count in xen:
        start = min(start, m.pages.frames - 1)
        m.pages.set_owner(start, min(count, m.pages.frames - start), DOMID_XEN)
    return m


@SETTINGS
@given(
    entries=e820s,
    xen=st.lists(st.tuples(st.integers(0, 70000), st.integers(1, 3000)), max_size=4),
    strict=st.booleans(),
    inclusive=st.sampled_from([None, True, False]),
    reserved=st.sampled_from([None, True, False]),
    kind=st.sampled_from([DomainKind.PV, DomainKind.HVM]),
)
def test_identity_map_runs_by_extents_equal_the_per_frame_selection(
    entries: list[tuple[int, int, E820Type]],
    xen: list[tuple[int, int]],
    strict: bool,
    inclusive: bool | None,
    reserved: bool | None,
    kind: DomainKind,
) -> None:
    from iommusim.iommu import Iommu

    m = identity_machine(entries, xen)
    d = m.create_domain(0, kind, hardware=True, memory_bytes=1 << 20)
    io = Iommu(m, None, IommuConfig(hwdom_strict=strict, hwdom_inclusive=inclusive, hwdom_reserved=reserved))
    frames = hwdom._hwdom_frames(io, d)
    perms = np.full(frames.shape, np.uint8(Perm.RW), dtype=np.uint8)
    expect = [(pfn, count) for pfn, _, count, _ in hwdom.runs(frames, frames, perms)]
    assert hwdom._hwdom_runs(io, d) == expect


# -- the whole set-up on the vendors, both ways ---------------------------------------------------------------------


@contextmanager
def per_page_selection() -> Iterator[None]:
    """Swap the extent-based selections for their per-page references."""
    saved_owned, saved_runs = hwdom.owned_runs, hwdom._hwdom_runs

    def frames_as_runs(io, d):  # type: ignore[no-untyped-def]
        f = hwdom._hwdom_frames(io, d)
        return [(p, n) for p, _, n, _ in hwdom.runs(f, f, np.full(f.shape, np.uint8(Perm.RW), dtype=np.uint8))]

    hwdom.owned_runs = hwdom.owned_runs_per_page  # type: ignore[assignment]
    hwdom._hwdom_runs = frames_as_runs  # type: ignore[assignment]
    try:
        yield
    finally:
        hwdom.owned_runs, hwdom._hwdom_runs = saved_owned, saved_runs  # type: ignore[assignment]


def hwdom_tables(vendor: str, config: IommuConfig, *, by_extents: bool) -> tuple[Platform, list[bytes]]:
    spec = HardwareSpec(vendor=vendor, ram_bytes=256 << 20, superpages=(21,), iotlb_entries=64)
    p = build_platform(spec, config=config, devices=[bench_device()])
    with nullcontext() if by_extents else per_page_selection():
        p.create_hardware_domain(24 << 20)
    alloc, mem = p.machine.allocator, p.machine.memory
    frames = [f.value for f in alloc.frames_of("d0:")]
    return p, [f.to_bytes(8, "little") + mem.peek_words(f).tobytes() for f in frames]


@pytest.mark.parametrize("vendor", [v for v in ("vtd", "amd") if v in available_vendors()])
@pytest.mark.parametrize(
    "config",
    [
        BENCH_CONFIG,
        IommuConfig(hwdom_strict=True),
        IommuConfig(hwdom_strict=False),
        IommuConfig(hwdom_strict=False, hwdom_inclusive=True, hwdom_reserved=True),
    ],
    ids=["bench", "strict", "relaxed", "relaxed-inclusive"],
)
def test_hwdom_set_up_by_extents_writes_the_same_tables(vendor: str, config: IommuConfig) -> None:
    pa, a = hwdom_tables(vendor, config, by_extents=True)
    pb, b = hwdom_tables(vendor, config, by_extents=False)
    assert len(a) > 1 and a == b
    assert dict(pa.machine.allocator.in_use) == dict(pb.machine.allocator.in_use)
    assert [x.text for x in pa.machine.console.lines] == [x.text for x in pb.machine.console.lines]
