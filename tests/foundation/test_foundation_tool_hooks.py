"""Small foundation hooks the tools rely on: domain-creation hooks, the deferred-free list, device-TLB contents."""

from __future__ import annotations

from collections import Counter

import pytest

from iommusim.errors import OutOfMemory
from iommusim.hw.vtd.caches import AtsEntry, ContextCache, CtxInfo, DeviceTlb
from iommusim.iommu import Iommu
from iommusim.machine import Domain, DomainKind, Machine, PageType
from iommusim.perms import Perm


def test_domain_created_hooks_see_the_memory_before_the_caller() -> None:
    m = Machine(ram_bytes=64 << 20)
    seen: list[tuple[int, int]] = []

    def type_first_page(dom: Domain) -> None:
        m.pages.set_type(dom.extents[0].mfn.value, PageType.L1_PAGE_TABLE)
        seen.append((dom.domid, dom.tot_pages))

    m.domain_created_hooks.append(type_first_page)
    d = m.create_domain(3, DomainKind.PV, memory_bytes=1 << 20)
    assert seen == [(3, 256)]
    assert m.pages.ptype[d.extents[0].mfn.value] == PageType.L1_PAGE_TABLE


def test_a_failing_hook_leaves_no_half_made_domain() -> None:
    m = Machine(ram_bytes=64 << 20)

    def refuse(_d: Domain) -> None:
        raise OutOfMemory("no room")

    m.domain_created_hooks.append(refuse)
    with pytest.raises(OutOfMemory):
        m.create_domain(4, DomainKind.HVM, memory_bytes=1 << 20)
    assert 4 not in m.domains
    assert (m.pages.owner == 4).sum() == 0


def test_deferred_frees_lists_what_cleanup_will_free() -> None:
    m = Machine(ram_bytes=64 << 20)
    iommu = Iommu(m, None)
    a, b = m.allocator.alloc("d1:iommu-pt"), m.allocator.alloc("d1:iommu-pt")
    iommu.defer_free(a, 2)
    iommu.defer_free(b, 1)
    assert iommu.deferred_frees() == [(a, 2), (b, 1)]
    assert iommu.run_cleanup() == 2
    assert iommu.deferred_frees() == [] and m.allocator.owned("d1:") == 0


def test_device_tlb_entries_are_listed_per_source_id() -> None:
    tlb = DeviceTlb(4, Counter())
    tlb.put(0x300, 0x20_1234, AtsEntry(0x7_0000_0000, 21, Perm.R))
    tlb.put(0x100, 0x5000, AtsEntry(0x9000, 12, Perm.RW))
    assert tlb.entries() == [
        (0x100, 0x5000, AtsEntry(0x9000, 12, Perm.RW)),
        (0x300, 0x20_0000, AtsEntry(0x7_0000_0000, 21, Perm.R)),
    ]


def test_context_cache_entries_are_listed() -> None:
    cache = ContextCache(4, Counter())
    cache.put(0x300, CtxInfo(True, did=1, slptptr=0x5000, levels=4, width=48))
    cache.put(0x10, CtxInfo(False))
    assert cache.entries() == [
        (0x300, CtxInfo(True, did=1, slptptr=0x5000, levels=4, width=48)),
        (0x10, CtxInfo(False)),
    ]
