"""The AMD driver's operations, each observed through device DMA on the hardware model."""

from __future__ import annotations

import pytest
from amd_support import DISK, NIC, Scenario, allocations, amd_platform, can_read, can_write, scenario, unit_of

from iommusim.errors import BadAddress, DmaFault, HypervisorBug, NoSuchEntry
from iommusim.frames import INVALID_DFN, PAGE_SHIFT, Daddr, Dfn, Gfn, Mfn
from iommusim.hw.amd import regs
from iommusim.machine import DomainKind, PciDevice, Sbdf
from iommusim.perms import FlushFlags, Perm

R, W, RW = Perm.R, Perm.W, Perm.RW
FREE = 0x20000  # machine frames from here on belong to nobody in these machines (RAM is 1 GiB)
D = 0x10000  # device frames from here on are beyond every guest's RAM


@pytest.fixture
def s() -> Scenario:
    return scenario()


def put(s: Scenario, mfn: int, tag: bytes) -> None:
    s.p.machine.memory.write_bytes(mfn << PAGE_SHIFT, tag)


# ---- map / unmap / lookup ------------------------------------------------------------------------------


def test_map_page_is_reached_by_dma_and_looked_up(s: Scenario) -> None:
    put(s, FREE, b"frame-A!")
    s.p.iommu.map_page(s.guest, Dfn(D), Mfn(FREE), RW)
    assert can_read(s.p, s.nic, (D << 12) + 0, 8) == b"frame-A!"
    assert can_write(s.p, s.nic, (D << 12) + 8, b"written!")
    assert s.p.machine.memory.read_bytes((FREE << 12) + 8, 8) == b"written!"
    assert s.p.iommu.lookup_page(s.guest, Dfn(D)) == (Mfn(FREE), RW)
    with pytest.raises(NoSuchEntry):
        s.p.iommu.lookup_page(s.guest, Dfn(D + 1))


def test_read_only_mapping(s: Scenario) -> None:
    s.p.iommu.map_page(s.guest, Dfn(D), Mfn(FREE), R)
    assert can_read(s.p, s.nic, D << 12) is not None
    assert not can_write(s.p, s.nic, D << 12)


def test_unmap_page_flushes_at_once(s: Scenario) -> None:
    s.p.iommu.map_page(s.guest, Dfn(D), Mfn(FREE), RW)
    assert can_read(s.p, s.nic, D << 12) is not None  # now cached in the IOTLB
    assert s.p.iommu.unmap_page(s.guest, Dfn(D)) == FlushFlags.MODIFIED
    assert can_read(s.p, s.nic, D << 12) is None


def test_batched_unmap_is_stale_until_exactly_its_flush(s: Scenario) -> None:
    for i in range(4):
        s.p.iommu.map_page(s.guest, Dfn(D + i), Mfn(FREE + i), RW)
        assert can_read(s.p, s.nic, (D + i) << 12) is not None
    flags = s.p.iommu.unmap(s.guest, Dfn(D + 1), 2, flush=False)
    assert flags == FlushFlags.MODIFIED
    assert [can_read(s.p, s.nic, (D + i) << 12) is not None for i in range(4)] == [True] * 4  # stale
    s.p.iommu.iotlb_flush(s.guest, Dfn(D + 3), 1)  # the wrong page: still stale
    assert can_read(s.p, s.nic, (D + 1) << 12) is not None
    s.p.iommu.iotlb_flush(s.guest, Dfn(D + 1), 2)
    assert [can_read(s.p, s.nic, (D + i) << 12) is not None for i in range(4)] == [True, False, False, True]


def test_unmap_of_nothing_changes_nothing(s: Scenario) -> None:
    before = s.unit.counters()["cmd_inv_pages_page"]
    assert s.p.iommu.unmap_page(s.guest, Dfn(D + 77)) == FlushFlags.NONE
    assert s.unit.counters()["cmd_inv_pages_page"] == before


# ---- when the driver flushes --------------------------------------------------------------------------------


def _remap_permissions(s: Scenario) -> bool:
    s.p.iommu.map_page(s.guest, Dfn(D), Mfn(FREE), RW)
    assert can_write(s.p, s.nic, D << 12)  # caches an RW translation
    s.p.iommu.map_page(s.guest, Dfn(D), Mfn(FREE), R)
    return can_write(s.p, s.nic, D << 12)


def test_permission_change_is_flushed() -> None:
    assert not _remap_permissions(scenario())


def test_quirk_remap_perm_no_flush_leaves_write_access() -> None:
    assert _remap_permissions(scenario(quirks=("amd-remap-perm-no-flush",), hwdom_passthrough=True))


def _pv_remap(quirks: tuple[str, ...]) -> bytes | None:
    s = scenario(assign=False, quirks=quirks, hwdom_passthrough=True)
    p, disk = s.p, s.disk
    pv = p.create_guest(2, 8 << 20, kind=DomainKind.PV)
    p.iommu.assign_device(pv, disk)
    put(s, FREE, b"old-page")
    put(s, FREE + 1, b"new-page")
    p.iommu.map_page(pv, Dfn(D), Mfn(FREE), RW)
    assert can_read(p, disk, D << 12) == b"old-page"
    p.iommu.map_page(pv, Dfn(D), Mfn(FREE + 1), RW)
    return can_read(p, disk, D << 12)


def test_pv_remap_is_flushed() -> None:
    assert _pv_remap(()) == b"new-page"


def test_quirk_pv_no_map_flush() -> None:
    assert _pv_remap(("amd-pv-no-map-flush",)) == b"old-page"


@pytest.mark.parametrize(
    ("first", "count", "command"),
    [
        (D + 5, 1, "cmd_inv_pages_page"),  # one page: order 0
        (D + 5, 3, "cmd_inv_pages_range"),  # inside one 2 MiB block: order 9
        (D + 500, 30, "cmd_inv_pages_range"),  # crosses 2 MiB, inside 1 GiB: order 18
        ((1 << 18) - 2, 4, "cmd_inv_pages_domain"),  # crosses 1 GiB: everything
    ],
)
def test_iotlb_flush_picks_the_smallest_single_flush(first: int, count: int, command: str) -> None:
    s = scenario()
    before = dict(s.unit.counters())
    s.driver.iotlb_flush(s.guest, Dfn(first), count, FlushFlags.MODIFIED)
    after = s.unit.counters()
    sent = {k for k in ("cmd_inv_pages_page", "cmd_inv_pages_range", "cmd_inv_pages_domain") if after[k] != before[k]}
    assert sent == {command}
    s.driver.iotlb_flush(s.guest, Dfn(first), count, FlushFlags.ADDED)  # nothing was modified: no flush
    assert s.unit.counters()[command] == after[command]


def test_order_18_flush_covers_the_1g_block(s: Scenario) -> None:
    for i in (0, 511, 700):
        s.p.iommu.map_page(s.guest, Dfn(D + i), Mfn(FREE + i), RW)
        assert can_read(s.p, s.nic, (D + i) << 12) is not None
    s.p.iommu.unmap(s.guest, Dfn(D), 1024, flush=False)
    assert can_read(s.p, s.nic, (D + 700) << 12) is not None
    s.p.iommu.iotlb_flush(s.guest, Dfn(D + 500), 300)  # order 18: the whole 1 GiB around it
    assert [can_read(s.p, s.nic, (D + i) << 12) for i in (0, 511, 700)] == [None] * 3


def test_quirk_no_iotlb_flush_op() -> None:
    s = scenario(quirks=("amd-no-iotlb-flush-op",), hwdom_passthrough=True)
    assert "iotlb_flush" not in s.driver.provided
    assert "map_range" not in s.driver.provided
    s.p.iommu.map_page(s.guest, Dfn(D), Mfn(FREE), RW)
    assert can_read(s.p, s.nic, D << 12) is not None
    s.p.iommu.unmap(s.guest, Dfn(D), 1, flush=False)  # batched, yet the seed flushed inside unmap
    assert can_read(s.p, s.nic, D << 12) is None


# ---- paging-mode growth ----------------------------------------------------------------------------------


def test_paging_mode_grows_one_level_at_a_time_up_to_six() -> None:
    s = scenario()
    st = s.driver.arch(s.guest)
    assert st.paging_mode == 2 and s.dte().mode == 2
    mapped: list[int] = []
    for level in range(3, 7):
        dfn = 1 << (9 * (level - 1))  # the first frame beyond what level - 1 levels reach
        inv_before = s.unit.counters()["cmd_inv_devtab_entry"]
        old_root = st.table.root
        with allocations(s.p.machine) as delta:
            s.p.iommu.map_page(s.guest, Dfn(dfn), Mfn(FREE + level), RW)
        mapped.append(dfn)
        assert st.paging_mode == level
        dte = s.dte()
        assert (dte.mode, dte.root) == (level, st.table.root.value << 12)
        # the new root's entry 0 points at the old root, one level down
        entry0 = s.p.machine.memory.load_word(st.table.root.value, 0)
        assert entry0 == s.driver.fmt.table_entry(old_root.value << 12, level)
        assert s.unit.counters()["cmd_inv_devtab_entry"] == inv_before + 1
        # one new root plus the path below it to the new leaf: one table per level under the root
        assert delta == {"d1:amd-pt": level}
        for i, old in enumerate(mapped):
            assert s.translate(old << 12).maddr == (FREE + 3 + i) << 12
        assert can_read(s.p, s.nic, 0x1000) is not None  # the guest's own RAM still translates
    with pytest.raises(HypervisorBug):
        s.driver.map_page(s.guest, Dfn(1 << 48), Mfn(FREE), RW)  # beyond Xen's 48-bit DFN assertion


def test_invalid_dfn_crashes_the_domain_with_efault(s: Scenario) -> None:
    with pytest.raises(BadAddress):
        s.p.iommu.map_page(s.guest, INVALID_DFN, Mfn(FREE), RW)
    assert s.guest.crashed


def test_unmap_does_not_grow_the_tree(s: Scenario) -> None:
    st = s.driver.arch(s.guest)
    with allocations(s.p.machine) as delta:
        assert s.p.iommu.unmap_page(s.guest, Dfn(1 << 30)) == FlushFlags.NONE
    assert delta == {}
    assert st.paging_mode == 2


def test_quirk_unmap_grows_tree() -> None:
    s = scenario(quirks=("amd-unmap-grows-tree",), hwdom_passthrough=True)
    st = s.driver.arch(s.guest)
    before = s.unit.counters()["cmd_inv_pages_page"]
    with allocations(s.p.machine) as delta:
        s.p.iommu.unmap_page(s.guest, Dfn(1 << 30))
    assert st.paging_mode == 5 - 1  # 2**30 frames need four levels
    assert delta == {"d1:amd-pt": 2 + 3}  # two new roots, and the walk allocates three tables below
    assert s.unit.counters()["cmd_inv_pages_page"] == before + 1  # flushed although nothing was mapped


def test_pv_dfn_beyond_reach_is_efault_and_crashes_even_the_hardware_domain() -> None:
    s = scenario(assign=False)
    levels = s.driver.arch(s.hwdom).paging_mode
    with pytest.raises(BadAddress):
        s.p.iommu.map_page(s.hwdom, Dfn(1 << (9 * levels)), Mfn(FREE), RW)
    assert s.hwdom.crashed  # AMD's own domain_crash does not spare the hardware domain


# ---- merging and splitting ---------------------------------------------------------------------------------


def _map_block(s: Scenario, dfn: int, mfn: int, n: int = 512, perms: Perm = RW) -> None:
    for i in range(n):
        s.p.iommu.map_page(s.guest, Dfn(dfn + i), Mfn(mfn + i), perms)


def test_full_contiguous_table_merges_into_a_2m_leaf(s: Scenario) -> None:
    with allocations(s.p.machine) as delta:
        _map_block(s, D, FREE, 511)
    assert delta == {"d1:amd-pt": 1}  # the level-1 table (level 2 exists for the guest's RAM)
    assert s.translate((D + 3) << 12).page_shift == 12
    with allocations(s.p.machine) as delta:
        s.p.iommu.map_page(s.guest, Dfn(D + 511), Mfn(FREE + 511), RW)
    assert delta == {"d1:amd-pt": -1}  # the level-1 table went
    tr = s.translate((D + 7) << 12 | 0x123)
    assert (tr.page_shift, tr.maddr) == (21, (FREE + 7) << 12 | 0x123)
    assert s.p.iommu.lookup_page(s.guest, Dfn(D + 300)) == (Mfn(FREE + 300), RW)
    runs = [m for m in s.p.iommu.dump_page_tables(s.guest) if m.dfn == D]
    assert [(r.pages, r.page_shift) for r in runs] == [(512, 21)]


def test_unmapping_inside_a_superpage_splits_it(s: Scenario) -> None:
    _map_block(s, D, FREE)
    with allocations(s.p.machine) as delta:
        s.p.iommu.unmap_page(s.guest, Dfn(D + 9))
    assert delta == {"d1:amd-pt": 1}  # the split made a level-1 table again
    assert can_read(s.p, s.nic, (D + 9) << 12) is None
    assert can_read(s.p, s.nic, (D + 8) << 12) is not None
    assert s.translate((D + 10) << 12).page_shift == 12
    with allocations(s.p.machine) as delta:
        s.p.iommu.map_page(s.guest, Dfn(D + 9), Mfn(FREE + 9), RW)  # whole again: merges again
    assert delta == {"d1:amd-pt": -1}
    assert s.translate((D + 9) << 12).page_shift == 21


@pytest.mark.parametrize(
    "spoiler",
    [
        lambda s: s.p.iommu.map_page(s.guest, Dfn(D + 100), Mfn(FREE + 100), Perm.R),  # permissions differ
        lambda s: s.p.iommu.map_page(s.guest, Dfn(D + 100), Mfn(FREE + 9999), RW),  # not contiguous
        lambda s: s.p.iommu.unmap_page(s.guest, Dfn(D + 100)),  # not full
    ],
)
def test_tables_that_are_not_uniform_do_not_merge(s: Scenario, spoiler: object) -> None:
    _map_block(s, D, FREE, 511)
    spoiler(s)  # type: ignore[operator]
    s.p.iommu.map_page(s.guest, Dfn(D + 511), Mfn(FREE + 511), RW)
    assert s.translate((D + 1) << 12).page_shift == 12


def test_unaligned_block_does_not_merge(s: Scenario) -> None:
    _map_block(s, D, FREE + 1)  # contiguous and full, but the first frame is not 2 MiB aligned
    assert s.translate((D + 1) << 12).page_shift == 12


def test_bulk_map_makes_1g_leaves_and_only_path_tables() -> None:
    s = scenario()
    with allocations(s.p.machine) as delta:
        s.p.iommu.map(s.guest, Dfn(1 << 18), Mfn(1 << 18), 1 << 18, RW)  # 1 GiB at 1 GiB: one leaf
    assert s.driver.arch(s.guest).paging_mode == 3
    assert delta == {"d1:amd-pt": 1}  # the new level-3 root only
    assert s.translate((1 << 30) + 0x5678).page_shift == 30
    assert s.translate((1 << 30) + 0x5678).maddr == (1 << 30) + 0x5678


def test_bulk_and_per_page_maps_leave_the_same_translations() -> None:
    a, b = scenario(), scenario()
    runs = [(D - 3, FREE - 3, 520), (D + 517, FREE + 517, 1000), (D + 2000, FREE + 7000, 40)]
    for dfn, mfn, n in runs:
        a.p.iommu.map(a.guest, Dfn(dfn), Mfn(mfn), n, RW)
        for i in range(n):
            b.p.iommu.map_page(b.guest, Dfn(dfn + i), Mfn(mfn + i), RW)
    assert a.p.iommu.dump_page_tables(a.guest) == b.p.iommu.dump_page_tables(b.guest)
    assert a.p.machine.allocator.owned("d1:") == b.p.machine.allocator.owned("d1:")


def test_quirk_merge_counter_maps_a_page_nobody_mapped() -> None:
    """The seed's counter counts events, not entries: 512 events can merge a table with a hole."""

    def run(quirks: tuple[str, ...]) -> bool:
        s = scenario(quirks=quirks, hwdom_passthrough=True)
        _map_block(s, D, FREE, 256)  # counter 256
        s.p.iommu.unmap_page(s.guest, Dfn(D + 100))
        s.p.iommu.map_page(s.guest, Dfn(D + 100), Mfn(FREE + 100), RW)  # counted again: 257
        for i in range(256, 511):  # 255 more events: the last one finds the counter at 511
            s.p.iommu.map_page(s.guest, Dfn(D + i), Mfn(FREE + i), RW)
        return can_read(s.p, s.nic, (D + 511) << 12) is not None  # dfn D+511 was never mapped

    assert not run(())
    assert run(("amd-merge-counter",))


def test_split_keeps_permissions_unless_quirk() -> None:
    def run(quirks: tuple[str, ...]) -> bool:
        s = scenario(quirks=quirks, hwdom_passthrough=True)
        _map_block(s, D, FREE, perms=R)
        assert s.translate(D << 12).page_shift == 21
        s.p.iommu.map_page(s.guest, Dfn(D + 5), Mfn(FREE + 5), RW)  # splits the read-only superpage
        return can_write(s.p, s.nic, (D + 6) << 12)

    assert not run(())
    assert run(("amd-split-rw-children",))


# ---- teardown ----------------------------------------------------------------------------------------------


def test_destroy_frees_every_table_page() -> None:
    s = scenario()
    s.p.iommu.map_page(s.guest, Dfn(1 << 40), Mfn(FREE), RW)  # six levels
    _map_block(s, D, FREE)  # and a merged superpage
    s.p.iommu.map_page(s.guest, Dfn(D + 1000), Mfn(FREE), RW)
    assert s.p.machine.allocator.owned("d1:amd-pt") > 5
    s.p.destroy(s.guest)
    assert s.p.machine.allocator.owned("d1:") == 0
    assert s.p.iommu.pending_frees == 0
    assert can_read(s.p, s.nic, 0x1000) is not None  # back with the hardware domain's identity map


def test_free_page_table_by_level_and_skip_levels_are_a_bug(s: Scenario) -> None:
    st = s.driver.arch(s.guest)
    s.p.iommu.map_page(s.guest, Dfn(1 << 20), Mfn(FREE), RW)
    tables = st.table.table_frames()
    assert len(tables) == s.p.machine.allocator.owned("d1:amd-pt")
    s.driver.teardown(s.guest)
    assert s.p.iommu.run_cleanup() == len(tables)
    assert s.p.machine.allocator.owned("d1:") == 0
    m = s.p.machine
    top, low = m.allocator.alloc("x"), m.allocator.alloc("x")
    m.memory.store_word(top.value, 0, s.driver.fmt.pointer_entry(low.value << 12, 1))
    with pytest.raises(HypervisorBug):
        s.driver.free_page_table(top, 3)  # a level-3 table pointing to level 1: Xen asserts


# ---- hardware domain --------------------------------------------------------------------------------------


def test_hwdom_identity_map_comes_before_its_devices() -> None:
    p = amd_platform()
    driver = p.ops
    order: list[str] = []
    real = p.iommu.arch_hwdom_init

    def spy(d: object, progress: object = None) -> None:
        assert driver.arch(d).table.root is not None, "the root comes first"
        order.append("identity")
        real(d, progress)  # type: ignore[arg-type]

    p.iommu.arch_hwdom_init = spy  # type: ignore[method-assign]
    devtab_write = driver.devtab.set_root_page_table

    def spy_dte(*a: object) -> None:
        order.append("dte")
        devtab_write(*a)

    driver.devtab.set_root_page_table = spy_dte
    d0 = p.create_hardware_domain(64 << 20)
    assert order[0] == "identity" and order.count("dte") == 2
    # PV identity: device frame n is machine frame n
    nic = p.device(NIC)
    first = d0.extents[0].mfn.value
    p.machine.memory.write_bytes(first << 12, b"dom0page")
    assert can_read(p, nic, first << 12) == b"dom0page"


def test_passthrough_hwdom_has_v0_dtes_and_untranslated_dma() -> None:
    s = scenario(assign=False, hwdom_passthrough=True)
    dte = s.dte(s.nic)
    assert (dte.valid, dte.translation_valid, dte.mode) == (False, True, s.driver.arch(s.hwdom).paging_mode)
    s.p.machine.memory.write_bytes(0x3F00_0000, b"anywhere")
    assert can_read(s.p, s.nic, 0x3F00_0000) == b"anywhere"  # unmapped, yet reached: V = 0
    s.p.iommu.assign_device(s.guest, s.nic)
    assert s.dte(s.nic).valid
    assert can_read(s.p, s.nic, 0x3F00_0000) is None
    s.p.iommu.deassign_device(s.guest, s.nic)
    assert not s.dte(s.nic).valid
    assert can_read(s.p, s.nic, 0x3F00_0000) == b"anywhere"


# ---- devices -------------------------------------------------------------------------------------------------


def test_assign_and_deassign_move_the_dma_view(s: Scenario) -> None:
    gmfn = s.guest_mfn(3)
    s.p.machine.memory.write_bytes(gmfn << 12, b"guest-03")
    assert can_read(s.p, s.nic, 3 << 12) == b"guest-03"
    assert s.dte().domain_id == 1
    hw_frame = s.hwdom.extents[0].mfn.value + 0x3F00  # beyond the guest's 4096 frames of RAM
    assert can_read(s.p, s.nic, hw_frame << 12) is None
    s.p.iommu.deassign_device(s.guest, s.nic)
    assert s.dte().domain_id == 0
    assert can_read(s.p, s.nic, hw_frame << 12) is not None


def test_remove_device_clears_v_and_tv(s: Scenario) -> None:
    s.p.iommu.remove_device(s.disk)
    dte = s.dte(s.disk)
    assert not dte.valid and not dte.translation_valid
    # Xen only clears V and TV: with V = 0 the hardware lets the device's DMA through untranslated
    assert can_read(s.p, s.disk, 0x3F00_0000) is not None


def test_unity_ranges_while_assigned() -> None:
    ivmd = {"ivmd": [{"first_pfn": 0x3E000, "pages": 4, "perms": "r", "devices": [NIC]}]}

    def run(quirks: tuple[str, ...]) -> tuple[bool, bool, bool]:
        s = scenario(extra=ivmd, quirks=quirks, hwdom_passthrough=True)
        s.p.iommu.assign_device(s.guest, s.disk)  # keeps the guest's tables alive after the NIC leaves
        s.p.machine.memory.write_bytes(0x3E001 << 12, b"firmware")
        reads = can_read(s.p, s.nic, 0x3E001 << 12) == b"firmware"
        writes = can_write(s.p, s.nic, 0x3E001 << 12)
        s.p.iommu.deassign_device(s.guest, s.nic)
        try:
            s.p.iommu.lookup_page(s.guest, Dfn(0x3E001))
            kept = True
        except NoSuchEntry:
            kept = False
        return reads, writes, kept

    assert run(()) == (True, False, False)
    assert run(("amd-unity-map-seed",)) == (True, False, True)


def test_alias_requestor_id() -> None:
    bridged = PciDevice(Sbdf.parse("0000:05:00.0"))
    s = scenario(
        devs=[PciDevice(Sbdf.parse(NIC)), PciDevice(Sbdf.parse(DISK)), bridged],
        extra={"aliases": {"0000:05:00.0": "0000:04:00.0"}},
        assign=False,
    )
    assert s.driver.requestor_id(0x0500) == 0x0400
    dev = s.p.device("0000:05:00.0")
    s.p.iommu.assign_device(s.guest, dev)
    # the DTE at the alias (0x0400) now belongs to the guest: so does the DMA of both devices behind it
    assert s.driver.devtab.read(0x0400).domain_id == 1
    gmfn = s.guest_mfn(2)
    s.p.machine.memory.write_bytes(gmfn << 12, b"via-brdg")
    assert can_read(s.p, dev, 2 << 12) == b"via-brdg"
    assert s.driver.get_device_group_id(0, 5, 0) == 0x0400


def test_phantom_functions_get_their_own_dtes() -> None:
    devs = [PciDevice(Sbdf.parse(NIC)), PciDevice(Sbdf.parse(DISK), phantom_stride=2)]
    s = scenario(devs=devs, assign=False)
    s.p.iommu.assign_device(s.guest, s.disk)
    for devfn in (0, 2, 4, 6):
        assert s.driver.devtab.read(0x0400 | devfn).domain_id == 1
    gmfn = s.guest_mfn(1)
    s.p.machine.memory.write_bytes(gmfn << 12, b"phantom!")
    assert s.p.machine.dma.read(s.disk, Daddr(1 << 12), 8, devfn=4) == b"phantom!"


# ---- ATS devices ------------------------------------------------------------------------------------------


def _ats_stale_after_range_flush(quirks: tuple[str, ...]) -> list[bool]:
    devs = [PciDevice(Sbdf.parse(NIC), ats=True), PciDevice(Sbdf.parse(DISK))]
    s = scenario(devs=devs, quirks=quirks, hwdom_passthrough=True)
    assert s.dte().iotlb and s.nic.ats_enabled
    for i in range(4):
        s.p.iommu.map_page(s.guest, Dfn(D + i), Mfn(FREE + i), RW)
        assert can_read(s.p, s.nic, (D + i) << 12) is not None
    s.p.iommu.unmap(s.guest, Dfn(D), 4)  # flushed as one order-9 range, IOTLB and device IOTLB
    return [can_read(s.p, s.nic, (D + i) << 12) is not None for i in range(4)]


def test_ats_device_iotlb_is_invalidated() -> None:
    assert _ats_stale_after_range_flush(()) == [False] * 4


def test_quirk_iotlb_s_bit_zero_leaves_the_device_iotlb_stale() -> None:
    # The order-9 address for D = 0x10000 is 0x1000_0000 with bit 20 cleared and bits 19:12 set:
    # 0x100F_F000.  With S = 0 that names one page, dfn 0x100FF, which is none of the four: all stay stale.
    assert _ats_stale_after_range_flush(("amd-iotlb-s-bit-zero",)) == [True] * 4


# ---- the command buffer as the driver uses it -------------------------------------------------------------


def _stop_command_processing(s: Scenario) -> None:
    mmio = s.unit.mmio
    mmio.write(regs.CONTROL, mmio.read(regs.CONTROL) & ~regs.CTRL_CMD_BUF_EN)


def test_full_command_ring_is_waited_for_then_timed_out() -> None:
    from iommusim.errors import TimedOut

    s = scenario(extra={"cmd_entries": 256})
    _stop_command_processing(s)

    def remap_until_it_fails() -> None:
        for i in range(200):  # each map of a present page flushes: invalidate + completion wait
            s.p.iommu.map_page(s.guest, Dfn(3), Mfn(FREE + i), RW)

    with pytest.raises(TimedOut):
        remap_until_it_fails()
    handle = s.driver.units[0]
    assert handle.stats["completion_wait_timeouts"] >= 1
    assert handle.stats["ring_full_timeouts"] == 1
    assert s.p.machine.console.grep("command ring full")


def test_quirk_cmd_ring_drop_loses_commands_silently() -> None:
    s = scenario(extra={"cmd_entries": 256}, quirks=("amd-cmd-ring-drop",), hwdom_passthrough=True)
    _stop_command_processing(s)
    for i in range(200):
        s.p.iommu.map_page(s.guest, Dfn(3), Mfn(FREE + i), RW)
    assert s.driver.units[0].stats["commands_dropped"] > 0


# ---- the event log as the driver handles it -----------------------------------------------------------


def test_fault_is_logged_with_xens_fields_and_the_entry_recycled(s: Scenario) -> None:
    with pytest.raises(DmaFault):
        s.p.machine.dma.write(s.nic, Daddr(0xBAD_D000), b"x")
    line = s.p.machine.console.grep("IO_PAGE_FAULT")[-1]
    assert "device id 0x0300" in line.text and "domain 1" in line.text and "0xbadd000" in line.text
    assert "flags 0x020" in line.text  # RW: a write, to a page not present
    handle = s.driver.units[0]
    mmio = s.unit.mmio
    assert regs.ring_ptr(mmio.read(regs.EVT_LOG_HEAD)) == regs.ring_ptr(mmio.read(regs.EVT_LOG_TAIL)) == 1
    slot = handle.events.slot(0)
    assert s.p.machine.memory.read_bytes(slot, 16) == bytes(16)  # zeroed after use
    assert mmio.read(regs.CONTROL) & regs.CTRL_EVENT_INT_EN  # the interrupt is back on


def test_repeated_faults_disable_bus_mastering(s: Scenario) -> None:
    for _ in range(10):
        with pytest.raises(DmaFault):
            s.p.machine.dma.read(s.nic, Daddr(0xBAD_D000), 4)
    assert not s.nic.bus_master
    assert s.p.machine.console.grep("disabling bus mastering")


def test_driver_restarts_the_log_after_an_overflow() -> None:
    s = scenario(extra={"event_entries": 256})
    mmio = s.unit.mmio
    mmio.write(regs.CONTROL, mmio.read(regs.CONTROL) & ~regs.CTRL_EVENT_INT_EN)  # interrupts masked
    for i in range(256):
        with pytest.raises(DmaFault):
            s.unit.translate(s.rid(), (0x50000 + i) << 12, R)
    assert mmio.read(regs.STATUS) & regs.STATUS_EVENT_OVERFLOW
    s.driver.handlers[0]()  # the interrupt is delivered at last
    assert len(s.p.machine.console.grep("IO_PAGE_FAULT")) == 255
    assert s.driver.handlers[0].resets == 1
    st = mmio.read(regs.STATUS)
    assert not st & regs.STATUS_EVENT_OVERFLOW and st & regs.STATUS_EVENT_LOG_RUN
    assert not s.nic.bus_master  # 255 faults counted against the device on the way
    with pytest.raises(DmaFault):
        s.unit.translate(s.rid(), 0xBAD_D000, R)
    assert len(s.p.machine.console.grep("IO_PAGE_FAULT")) == 256


# ---- several IOMMUs, power management, dumps ---------------------------------------------------------------


def test_every_iommu_is_flushed() -> None:
    devs = [PciDevice(Sbdf.parse(NIC)), PciDevice(Sbdf.parse(DISK)), PciDevice(Sbdf.parse("0000:83:00.0"))]
    s = scenario(units=2, devs=devs)
    u0, u1 = unit_of(s.p, 0), unit_of(s.p, 1)
    far = s.p.device("0000:83:00.0")
    assert s.driver.unit_for(far) is s.driver.units[1]
    before = (u0.counters()["cmd_inv_pages_page"], u1.counters()["cmd_inv_pages_page"])
    s.p.iommu.map_page(s.guest, Dfn(D), Mfn(FREE), RW)
    s.p.iommu.unmap_page(s.guest, Dfn(D))
    after = (u0.counters()["cmd_inv_pages_page"], u1.counters()["cmd_inv_pages_page"])
    assert after == (before[0] + 1, before[1] + 1)  # unit 1 has no device of d1, and is flushed anyway


def test_crash_shutdown_and_resume(s: Scenario) -> None:
    s.p.iommu.crash_shutdown()
    assert not s.unit.enabled
    assert can_read(s.p, s.nic, 0x3F00_0000) is not None  # an IOMMU that is off translates nothing
    s.p.iommu.enabled = True
    s.p.iommu.resume()
    assert s.unit.enabled
    assert can_read(s.p, s.nic, 0x3F00_0000) is None
    assert s.unit.counters()["cmd_inv_iommu_all"] == 2  # at boot and at resume


def test_dump_page_tables_reads_memory(s: Scenario) -> None:
    s.p.iommu.map_page(s.guest, Dfn(D), Mfn(FREE), R)
    dump = s.p.iommu.dump_page_tables(s.guest)
    assert any(m.dfn == D and m.mfn == FREE and m.perms == R for m in dump)
    assert sum(m.pages for m in dump) == s.guest.tot_pages + 1


def test_pv_guest_paging_mode_from_memory_size() -> None:
    p = amd_platform(ram=4 << 30)
    p.create_hardware_domain(64 << 20)
    g = p.create_guest(2, 16 << 20, kind=DomainKind.PV)
    # 4 GiB = 2**20 frames -> 2048 -> 4 entries: three levels
    assert p.ops.arch(g).paging_mode == 3
    assert p.ops.arch(p.create_guest(3, 16 << 20)).paging_mode == 2
    _ = Gfn(0)


def test_iotlb_flush_all_ends_every_stale_window(s: Scenario) -> None:
    for i in (0, 700, 5000):
        s.p.iommu.map_page(s.guest, Dfn(D + i), Mfn(FREE + i), RW)
        assert can_read(s.p, s.nic, (D + i) << 12) is not None
    with s.p.iommu.dont_flush():
        for i in (0, 700, 5000):
            s.p.iommu.unmap_page(s.guest, Dfn(D + i))
    assert all(can_read(s.p, s.nic, (D + i) << 12) is not None for i in (0, 700, 5000))
    before = s.unit.counters()["cmd_inv_pages_domain"]
    s.p.iommu.iotlb_flush_all(s.guest)
    assert s.unit.counters()["cmd_inv_pages_domain"] == before + 1
    assert all(can_read(s.p, s.nic, (D + i) << 12) is None for i in (0, 700, 5000))


def test_enabling_ats_flushes_the_whole_device_iotlb() -> None:
    s = scenario(devs=[PciDevice(Sbdf.parse(NIC), ats=True), PciDevice(Sbdf.parse(DISK))], assign=False)
    assert s.nic.ats_enabled  # enabled when the hardware domain took the device
    atc_flushes = s.unit.counters()["cmd_inv_iotlb_pages"]
    s.p.iommu.assign_device(s.guest, s.nic)  # disabled on the way out, enabled again on the way in
    assert s.unit.counters()["cmd_inv_iotlb_pages"] > atc_flushes
    assert s.dte().iotlb


def test_ats_off_in_xen_means_no_dte_i_and_no_iotlb_commands() -> None:
    devs = [PciDevice(Sbdf.parse(NIC), ats=True), PciDevice(Sbdf.parse(DISK))]
    s = scenario(devs=devs, extra={"ats": False})
    assert not s.dte().iotlb and not s.nic.ats_enabled
    s.p.iommu.map_page(s.guest, Dfn(D), Mfn(FREE), RW)
    s.p.iommu.unmap_page(s.guest, Dfn(D))
    assert s.unit.counters()["cmd_inv_iotlb_pages"] == 0


def test_a_split_is_followed_by_a_flush_of_everything_unless_batched(s: Scenario) -> None:
    _map_block(s, D, FREE)
    before = s.unit.counters()["cmd_inv_pages_domain"]
    s.p.iommu.map_page(s.guest, Dfn(D + 3), Mfn(FREE + 99), RW)  # splits, then remaps one page
    assert s.unit.counters()["cmd_inv_pages_domain"] == before + 1
    with s.p.iommu.dont_flush():
        flags = s.p.iommu.map_page(s.guest, Dfn(D + 600), Mfn(FREE + 9), RW)  # no split: a new table
    assert flags == FlushFlags.ADDED
    _map_block(s, D + 1024, FREE + 1024)
    with s.p.iommu.dont_flush():
        flags = s.p.iommu.unmap_page(s.guest, Dfn(D + 1030))
    assert flags == FlushFlags.MODIFIED | FlushFlags.ALL  # the caller owes a flush of everything


def test_the_drivers_command_ring_wraps() -> None:
    s = scenario(extra={"cmd_entries": 256})
    handle = s.driver.units[0]
    for i in range(150):  # each remap sends an invalidation and a completion wait: 300 commands
        s.p.iommu.map_page(s.guest, Dfn(D), Mfn(FREE + i), RW)
        assert s.translate(D << 12).maddr == (FREE + i) << 12
    assert handle.stats["commands_sent"] > 256
    assert handle.cmd.index == regs.ring_ptr(s.unit.mmio.read(regs.CMD_BUF_TAIL))
    assert regs.ring_ptr(s.unit.mmio.read(regs.CMD_BUF_HEAD)) == handle.cmd.index  # all consumed
    assert handle.stats.get("completion_wait_timeouts", 0) == 0


def test_without_invalidate_all_resume_flushes_every_device_and_domain() -> None:
    s = scenario(extra={"ia_sup": False})
    assert s.unit.counters()["cmd_inv_iommu_all"] == 0  # not sent at boot: the unit lacks it
    dtes, domains = s.unit.counters()["cmd_inv_devtab_entry"], s.unit.counters()["cmd_inv_pages_domain"]
    s.p.iommu.suspend()
    assert not s.unit.enabled
    s.p.iommu.resume()
    c = s.unit.counters()
    assert c["cmd_inv_iommu_all"] == 0 and c["cmd_illegal"] == 0
    assert c["cmd_inv_devtab_entry"] - dtes == s.driver.ivrs.bdf_entries
    assert c["cmd_inv_pages_domain"] - domains == 2  # d0 and d1
    assert can_read(s.p, s.nic, 0x1000) is not None


def test_the_seed_driver_ignores_hats() -> None:
    """Xen grows an HVM guest past the levels the IOMMU implements; the unit then refuses the DTE."""
    s = scenario(extra={"paging_modes": 4})
    s.p.iommu.map_page(s.guest, Dfn(1 << 36), Mfn(FREE), RW)  # needs five levels
    assert s.dte().mode == 5
    assert can_read(s.p, s.nic, 0x1000) is None
    assert s.unit.counters()["event_illegal_dev_table_entry"] == 1
