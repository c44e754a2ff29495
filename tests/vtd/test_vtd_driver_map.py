"""Map, unmap, lookup and the range forms, each observed through a device's DMA on the unit."""

from __future__ import annotations

import pytest
from vtd_helpers import NIC, boot, fault_of, gmfn, guest_with, lands_at, make, reaches, unit

from iommusim.errors import AddressNotAvailable, NoSuchEntry, NotSupported
from iommusim.frames import Dfn, Gfn, Mfn
from iommusim.iommu.config import IommuConfig
from iommusim.perms import FlushFlags, Perm


@pytest.fixture
def plat():  # type: ignore[no-untyped-def]
    p = make()
    boot(p)
    g = guest_with(p)
    return p, g


def test_guest_dma_goes_where_its_p2m_says(plat) -> None:  # type: ignore[no-untyped-def]
    p, g = plat
    for gfn in (0, 1, 0x123, 0xFFF):
        assert lands_at(p, NIC, (gfn << 12) | 0x10) == (gmfn(g, gfn) << 12) | 0x10
    assert fault_of(p, NIC, 0x1000 << 12).reason == 0x6  # beyond the guest's 16 MiB


def test_map_page_flags_and_implicit_flush(plat) -> None:  # type: ignore[no-untyped-def]
    p, g = plat
    a, b = Mfn(gmfn(g, 1)), Mfn(gmfn(g, 2))
    dfn = Dfn(0x8000)
    assert p.iommu.map_page(g, dfn, a, Perm.R) == FlushFlags.ADDED
    assert lands_at(p, NIC, 0x8000 << 12) == -1  # read-only: the write is refused
    assert reaches(p, NIC, 0x8000 << 12)
    assert fault_of(p, NIC, 0x8000 << 12, write=True).reason == 0x5
    # a new target for a present entry: both flags, and the flush makes DMA see it at once
    assert p.iommu.map_page(g, dfn, b, Perm.RW) == FlushFlags.ADDED | FlushFlags.MODIFIED
    assert lands_at(p, NIC, 0x8000 << 12) == b.value << 12


def test_identical_remap_needs_no_flush(plat) -> None:  # type: ignore[no-untyped-def]
    p, g = plat
    a = Mfn(gmfn(g, 3))
    p.iommu.map_page(g, Dfn(0x9000), a, Perm.RW)
    before = unit(p).counters().get("iotlb_inv_page", 0)
    assert p.iommu.map_page(g, Dfn(0x9000), a, Perm.RW) == FlushFlags.NONE
    assert unit(p).counters().get("iotlb_inv_page", 0) == before


def test_first_mapping_needs_no_flush_without_caching_mode(plat) -> None:  # type: ignore[no-untyped-def]
    p, g = plat
    before = unit(p).counters().get("qi_descriptors", 0)
    p.iommu.map_page(g, Dfn(0xA000), Mfn(gmfn(g, 4)), Perm.RW)
    assert unit(p).counters().get("qi_descriptors", 0) == before  # not-present -> present: nothing cached
    assert reaches(p, NIC, 0xA000 << 12)


def test_caching_mode_flushes_new_mappings_with_did_0() -> None:
    p = make(caching_mode=True)
    boot(p)
    g = guest_with(p)
    assert fault_of(p, NIC, 0xA000 << 12).reason == 0x6  # cached as not present
    p.iommu.map_page(g, Dfn(0xA000), Mfn(gmfn(g, 4)), Perm.RW)
    assert reaches(p, NIC, 0xA000 << 12)  # Xen's page flush with DID 0 dropped the cached not-present entry


def test_unmap_page(plat) -> None:  # type: ignore[no-untyped-def]
    p, g = plat
    p.iommu.map_page(g, Dfn(0xB000), Mfn(gmfn(g, 5)), Perm.RW)
    assert reaches(p, NIC, 0xB000 << 12)
    assert p.iommu.unmap_page(g, Dfn(0xB000)) == FlushFlags.MODIFIED
    assert fault_of(p, NIC, 0xB000 << 12).reason == 0x6
    before = unit(p).counters().get("qi_descriptors", 0)
    assert p.iommu.unmap_page(g, Dfn(0xB000)) == FlushFlags.NONE  # never mapped: nothing written, no flush
    assert p.iommu.unmap_page(g, Dfn(0x7_0000_0000)) == FlushFlags.NONE  # no table there at all
    assert unit(p).counters().get("qi_descriptors", 0) == before


def test_batched_changes_wait_for_the_callers_flush(plat) -> None:  # type: ignore[no-untyped-def]
    p, g = plat
    p.iommu.map_page(g, Dfn(0xC000), Mfn(gmfn(g, 6)), Perm.RW)
    assert reaches(p, NIC, 0xC000 << 12)
    with p.iommu.dont_flush():
        flags = p.iommu.unmap_page(g, Dfn(0xC000))
    assert reaches(p, NIC, 0xC000 << 12)  # stale until the flush
    p.iommu.iotlb_flush(g, Dfn(0xC000), 1, flags)
    assert not reaches(p, NIC, 0xC000 << 12)


def test_lookup_page(plat) -> None:  # type: ignore[no-untyped-def]
    p, g = plat
    m = Mfn(gmfn(g, 7))
    p.iommu.map_page(g, Dfn(0xD000), m, Perm.R)
    assert p.iommu.lookup_page(g, Dfn(0xD000)) == (m, Perm.R)
    with pytest.raises(NoSuchEntry):
        p.iommu.lookup_page(g, Dfn(0xD001))
    with pytest.raises(NoSuchEntry):
        p.iommu.lookup_page(g, Dfn(0x7_0000_0000))


def test_dfn_beyond_the_domain_width_is_refused_not_truncated(plat) -> None:  # type: ignore[no-untyped-def]
    p, g = plat
    beyond = Dfn((1 << 36) + 0x10)  # 48-bit domain: 2**36 frames; truncating would give 0x10
    with pytest.raises(AddressNotAvailable, match="48-bit"):
        p.ops.map_page(g, beyond, Mfn(gmfn(g, 8)), Perm.RW)
    assert lands_at(p, NIC, 0x10 << 12) == gmfn(g, 0x10) << 12  # dfn 0x10 untouched
    with pytest.raises(AddressNotAvailable):
        p.ops.unmap_page(g, beyond)
    with pytest.raises(AddressNotAvailable):
        p.ops.map_range(g, Dfn((1 << 36) - 1), Mfn(gmfn(g, 8)), 2, Perm.RW)


def test_map_range_uses_superpages_and_dma_sees_them() -> None:
    p = make(ram=3 << 30)
    boot(p)
    g = p.create_guest(1, 0)
    p.machine.populate(g, 1 << 18, align_order=18)  # 1 GiB at a 1 GiB-aligned machine frame
    p.iommu.assign_device(g, NIC)
    u = unit(p)
    sid = p.device(NIC).sbdf.bdf
    base = gmfn(g, 0)
    assert base % (1 << 18) == 0
    assert u.translate(sid, 0x1234_5123, Perm.R).page_shift == 30
    assert u.translate(sid, 0x1234_5123, Perm.R).maddr == (base << 12) + 0x1234_5123
    # a 2 MiB-aligned range that is not 1 GiB aligned gets 2 MiB leaves
    flags = p.iommu.map(g, Dfn(0x10_0200), Mfn(base + 0x200), 0x400, Perm.RW)
    assert flags & FlushFlags.ADDED
    assert u.translate(sid, 0x1_0020_0000, Perm.R).page_shift == 21
    assert lands_at(p, NIC, 0x1_0030_0008) == ((base + 0x300) << 12) | 8


def test_superpage_split_on_partial_unmap_and_remap() -> None:
    p = make(ram=3 << 30)
    boot(p)
    g = p.create_guest(1, 0)
    p.machine.populate(g, 1 << 18, align_order=18)
    p.iommu.assign_device(g, NIC)
    u = unit(p)
    sid = p.device(NIC).sbdf.bdf
    base = gmfn(g, 0)
    assert u.translate(sid, 0x20_0000, Perm.R).page_shift == 30
    p.iommu.unmap_page(g, Dfn(0x201))  # one 4 KiB page inside the first 1 GiB leaf
    assert not reaches(p, NIC, 0x201 << 12)
    assert lands_at(p, NIC, 0x200 << 12) == (base + 0x200) << 12
    assert lands_at(p, NIC, 0x202 << 12) == (base + 0x202) << 12
    assert u.translate(sid, 0x202 << 12, Perm.R).page_shift == 12
    assert u.translate(sid, 0x20_0000 + (1 << 21), Perm.R).page_shift == 21  # the rest stays in 2 MiB leaves
    # remapping one page of a 2 MiB leaf to another frame splits that leaf too
    other = Mfn(base + 0x7_0000)
    p.iommu.map_page(g, Dfn(0x600), other, Perm.R)
    assert lands_at(p, NIC, 0x600 << 12) == -1
    assert reaches(p, NIC, 0x600 << 12)
    assert lands_at(p, NIC, 0x601 << 12) == (base + 0x601) << 12
    assert p.iommu.lookup_page(g, Dfn(0x601)) == (Mfn(base + 0x601), Perm.RW)


def test_no_superpages_when_the_unit_has_none() -> None:
    p = make(superpages=())
    boot(p)
    g = guest_with(p)
    sid = p.device(NIC).sbdf.bdf
    assert unit(p).translate(sid, 0, Perm.R).page_shift == 12
    assert p.ops.page_sizes == 1 << 12
    assert lands_at(p, NIC, 0x1FF << 12) == gmfn(g, 0x1FF) << 12


def test_unmap_range(plat) -> None:  # type: ignore[no-untyped-def]
    p, g = plat
    assert reaches(p, NIC, 0x10 << 12)
    p.iommu.unmap(g, Dfn(0x10), 0x20)
    assert not reaches(p, NIC, 0x10 << 12)
    assert not reaches(p, NIC, 0x2F << 12)
    assert reaches(p, NIC, 0x30 << 12)


def test_passthrough_hardware_domain() -> None:
    p = make(config=IommuConfig(hwdom_passthrough=True))
    hw = boot(p)
    assert p.iommu.map_page(hw, Dfn(0x10), Mfn(0x10), Perm.RW) == FlushFlags.NONE
    assert p.iommu.unmap_page(hw, Dfn(0x10)) == FlushFlags.NONE
    with pytest.raises(NotSupported):
        p.iommu.lookup_page(hw, Dfn(0x10))
    assert lands_at(p, NIC, 0x3000_0000) == 0x3000_0000  # context T=2: untranslated, even Xen's pages
    assert unit(p).counters()["pass_through"] >= 1


def test_relaxed_hwdom_reaches_ram_but_not_xen() -> None:
    p = make()
    hw = boot(p)
    frame = hw.extents[0].mfn.value
    assert lands_at(p, NIC, frame << 12) == frame << 12
    root = p.ops.units[0].root  # type: ignore[attr-defined]
    assert fault_of(p, NIC, root.value << 12).reason == 0x6  # the unit's own root table is Xen's


def test_strict_hwdom_maps_only_its_own_pages() -> None:
    p = make(config=IommuConfig(hwdom_strict=True))
    hw = boot(p)
    ext = hw.extents[0]
    assert lands_at(p, NIC, (ext.gfn.value + 3) << 12) == (ext.mfn.value + 3) << 12
    g = p.create_guest(1, 4 << 20)
    assert not reaches(p, NIC, gmfn(g, 0) << 12)


def test_three_level_unit_skips_the_top_level() -> None:
    p = make(sagaw=0b00010)  # the unit walks 39-bit, 3-level tables only
    boot(p)
    g = guest_with(p)
    assert p.ops.units[0].levels == 3  # type: ignore[attr-defined]
    assert lands_at(p, NIC, 0x5 << 12) == gmfn(g, 5) << 12
    assert fault_of(p, NIC, 1 << 40).reason == 0x4  # beyond 39 bits
    p.iommu.map_page(g, Dfn(0x7F_FFFF), Mfn(gmfn(g, 9)), Perm.RW)  # the last frame below 2**39
    assert lands_at(p, NIC, 0x7F_FFFF << 12) == gmfn(g, 9) << 12


def test_five_level_domain() -> None:
    p = make(sagaw=0b01100, mgaw=57, domain_width=57, haw=46)
    boot(p)
    g = guest_with(p)
    st = g.iommu.arch
    assert (st.levels, st.width) == (5, 57)
    high = Dfn(1 << 40)  # needs bit 52 of the address: only a 5-level walk reaches it
    p.iommu.map_page(g, high, Mfn(gmfn(g, 9)), Perm.RW)
    assert lands_at(p, NIC, high.value << 12) == gmfn(g, 9) << 12
    assert p.iommu.lookup_page(g, high) == (Mfn(gmfn(g, 9)), Perm.RW)


def test_domain_width_is_capped_by_sagaw() -> None:
    p = make(sagaw=0b00100, domain_width=57)
    assert p.ops.domain_agaw == 2  # type: ignore[attr-defined]
    assert p.machine.console.grep("exceeds what the units walk")


def test_dump_page_tables_matches_dma(plat) -> None:  # type: ignore[no-untyped-def]
    p, g = plat
    p.iommu.map_page(g, Dfn(0x9_0000), Mfn(gmfn(g, 1)), Perm.R)
    runs = p.iommu.dump_page_tables(g)
    assert sum(m.pages for m in runs) == (16 << 20 >> 12) + 1
    last = runs[-1]
    assert (last.dfn, last.mfn, last.pages, last.perms) == (0x9_0000, gmfn(g, 1), 1, Perm.R)
    for m in runs:
        assert lands_at(p, NIC, m.dfn << 12) in (-1, m.mfn << 12)
        assert reaches(p, NIC, (m.dfn + m.pages - 1) << 12)
    assert any("dfn 90000" in line for line in p.iommu.debug_key_dump())


def test_p2m_changes_follow_into_the_iommu(plat) -> None:  # type: ignore[no-untyped-def]
    p, g = plat
    new = gmfn(g, 0x20)
    p.guest_map(g, Gfn(0x5000), Mfn(new))
    assert lands_at(p, NIC, 0x5000 << 12) == new << 12
    p.guest_unmap(g, Gfn(0x5000))
    assert not reaches(p, NIC, 0x5000 << 12)
