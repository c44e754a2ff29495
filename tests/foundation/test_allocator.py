"""The page allocator: accounting by owner, failure injection, domain extents, page ownership."""

from __future__ import annotations

import pytest

from iommusim.errors import InvalidArgument, OutOfMemory
from iommusim.frames import Mfn
from iommusim.machine import DOMID_INVALID, DOMID_XEN, Machine
from iommusim.machine.domain import DomainKind


def test_hypervisor_pages_are_zeroed_accounted_and_owned_by_xen() -> None:
    m = Machine(ram_bytes=64 << 20)
    a = m.allocator
    mfn = a.alloc("d1:iommu-pt")
    assert m.memory.frame_words(mfn).any() == 0
    m.memory.store_word(mfn.value, 3, 7)
    assert a.in_use == {"d1:iommu-pt": 1} and a.owner_of(mfn) == "d1:iommu-pt"
    assert m.pages.owner[mfn.value] == DOMID_XEN
    a.free(mfn)
    assert a.total_in_use == 0 and m.pages.owner[mfn.value] == DOMID_INVALID
    again = a.alloc("x")
    assert again == mfn and m.memory.load_word(mfn.value, 3) == 0  # scrubbed on reuse


def test_contiguous_aligned_runs() -> None:
    m = Machine(ram_bytes=64 << 20)
    base = m.allocator.alloc("vtd0:qi", 4, align_order=2)
    assert base.value % 4 == 0 and m.allocator.in_use["vtd0:qi"] == 4
    m.allocator.free(base, 4)
    assert m.allocator.total_in_use == 0


def test_fail_nth_allocation_once() -> None:
    m = Machine(ram_bytes=64 << 20)
    plan = m.allocator.fail_nth(3)
    m.allocator.alloc("a")
    m.allocator.alloc("b")
    with pytest.raises(OutOfMemory, match="injected") as info:
        m.allocator.alloc("c")
    assert info.value.errno == 12 and info.value.rc == -12
    m.allocator.alloc("d")  # only the third fails
    assert plan.fired == ["c"] and m.allocator.in_use == {"a": 1, "b": 1, "d": 1}


def test_fail_filtered_by_owner_and_fail_all() -> None:
    m = Machine(ram_bytes=64 << 20)
    m.allocator.fail_nth(1, owner_prefix="d2:")
    m.allocator.alloc("d1:pt")
    with pytest.raises(OutOfMemory):
        m.allocator.alloc("d2:pt")
    m.allocator.fail_all()
    with pytest.raises(OutOfMemory):
        m.allocator.alloc("d1:pt")
    m.allocator.clear_failures()
    m.allocator.alloc("d1:pt")
    with pytest.raises(InvalidArgument):
        m.allocator.fail_nth(0)


def test_exhaustion_and_bad_free() -> None:
    m = Machine(ram_bytes=2 << 20)  # 512 frames, 256 reserved low
    with pytest.raises(OutOfMemory):
        m.allocator.alloc("big", 300)
    with pytest.raises(InvalidArgument):
        m.allocator.free(Mfn(400))


def test_domain_extents_and_m2p() -> None:
    m = Machine(ram_bytes=64 << 20)
    d = m.create_domain(1, DomainKind.PV, memory_bytes=8 << 20)
    (ext,) = d.extents
    assert ext.count == 2048 and ext.gfn.value == 0
    assert (m.pages.owner[ext.mfn.value : ext.mfn.value + 2048] == 1).all()
    assert int(m.pages.m2p[ext.mfn.value + 5]) == 5
    assert list(m.pages.owned_by(1)[:2]) == [ext.mfn.value, ext.mfn.value + 1]
    m.destroy_domain(d)
    assert (m.pages.owner[ext.mfn.value : ext.mfn.value + 2048] == DOMID_INVALID).all()
    d2 = m.create_domain(2, DomainKind.PV, memory_bytes=4 << 20)
    assert d2.extents[0].mfn == ext.mfn  # freed extents are reused


def test_hvm_domain_gets_a_p2m_and_direct_mapped_is_one_to_one() -> None:
    m = Machine(ram_bytes=64 << 20)
    g = m.create_domain(1, DomainKind.HVM, memory_bytes=4 << 20)
    assert g.p2m is not None and len(g.p2m) == 1024  # type: ignore[arg-type]
    ext = g.extents[0]
    from iommusim.frames import Gfn

    entry = g.p2m.lookup(Gfn(10))
    assert entry is not None and entry.mfn == ext.mfn + 10
    dm = m.create_domain(2, DomainKind.HVM, memory_bytes=2 << 20, direct_mapped=True)
    assert dm.extents[0].gfn.value == dm.extents[0].mfn.value
