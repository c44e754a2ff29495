"""The ARM p2m in machine memory: Xen's p2m_set_entry semantics, checked against memory and a plain model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iommusim.arm import ArmP2m, VmidAllocator, p2m_layout_for_pa_range
from iommusim.arm.p2m import FORMAT
from iommusim.errors import Busy, InvalidArgument, OutOfMemory
from iommusim.frames import Gfn, Mfn
from iommusim.machine import Domain, DomainKind, Machine
from iommusim.machine.p2m import P2mEntry, P2mType
from iommusim.pagetable.walk import walk


def _setup(pa_bits: int = 40, blocks: tuple[int, ...] = (21, 30)) -> tuple[Machine, ArmP2m, VmidAllocator]:
    m = Machine(ram_bytes=256 << 20)
    vmids = VmidAllocator()
    layout = p2m_layout_for_pa_range(pa_bits)
    m.p2m_factory = lambda d: ArmP2m(m, d, layout, vmids, block_shifts=blocks)
    d = m.create_domain(1, DomainKind.HVM)
    assert isinstance(d.p2m, ArmP2m)
    return m, d.p2m, vmids


def _raw(m: Machine, p: ArmP2m, gfn: int) -> tuple[int, int]:
    """(descriptor, our level) that translates ``gfn``, read from memory by the hardware-side walker."""
    g = p.layout.geometry
    r = walk(m.memory, FORMAT, p.root.value, g.levels, gfn << 12, root_pages=g.root_pages)
    return r.entry.raw, r.level


def test_root_vmid_and_vttbr() -> None:
    m, p, _ = _setup()
    # PARange 40: two concatenated level-1 root tables, 8 KiB aligned; VMID 1 (0 is reserved)
    assert p.table.root_pages == 2
    assert p.root.value % 2 == 0
    assert m.allocator.owned("d1:p2m") == 2
    assert p.vmid == 1
    assert p.vttbr == p.root_maddr | (1 << 48)
    # a fresh VMID's CPU TLB entries are flushed once
    assert p.counters["cpu_tlb_flush_vmid"] == 1


def test_blocks_where_aligned_with_golden_descriptors() -> None:
    m, p, _ = _setup()
    # 2 MiB-aligned guest and machine frames and an order-9 request: one 2 MiB block at ARM level 2
    flags = p.guest_physmap_add_entry(Gfn(0x200), Mfn(0x8200), 9, P2mType.RAM_RW)
    raw, level = _raw(m, p, 0x200)
    # 0x8200 << 12 = 0x0820_0000; block low bits 0x7FD (bits[1:0] = 01); ram_rw type 1 << 55
    assert (raw, level) == (0x0080_0000_0820_07FD, 2)
    assert p.stats()["2M mappings"] == 1
    assert int(flags) == 1  # ADDED: nothing valid was there
    # order 18 at a 1 GiB boundary on both sides: one 1 GiB block (0x40000 << 12 = 0x4000_0000)
    p.guest_physmap_add_entry(Gfn(0x40000), Mfn(0x40000), 18, P2mType.MMIO_DIRECT_DEV)
    raw, level = _raw(m, p, 0x40123)
    assert (raw, level) == (0x01C0_0000_4000_06C5, 3)
    # a misaligned machine frame gives 512 pages instead of a block
    p.guest_physmap_add_entry(Gfn(0x400), Mfn(0x8401), 9, P2mType.RAM_RW)
    assert _raw(m, p, 0x400) == (0x0080_0000_0840_17FF, 1)
    assert p.stats()["4K mappings"] == 512


def test_block_sizes_follow_the_hardware() -> None:
    _, p, _ = _setup(blocks=(21,))
    # no 1 GiB blocks: the order-18 request becomes 512 blocks of 2 MiB
    p.guest_physmap_add_entry(Gfn(0x40000), Mfn(0x40000), 18, P2mType.RAM_RW)
    s = p.stats()
    assert (s["1G mappings"], s["2M mappings"]) == (0, 512)
    _, q, _ = _setup(blocks=())
    q.guest_physmap_add_entry(Gfn(0x200), Mfn(0x8200), 9, P2mType.RAM_RW)
    assert q.stats()["4K mappings"] == 512


def test_xens_order_rule_uses_the_request_not_only_the_frames() -> None:
    _, p, _ = _setup()
    # 1024 frames from gfn 0x200/mfn 0x8200: every piece of 512 starts 2 MiB-aligned -> two blocks
    p.insert_mapping(Gfn(0x200), 1024, Mfn(0x8200), P2mType.RAM_RW)
    assert p.stats()["2M mappings"] == 2
    # 513 frames from an aligned start: Xen's mask includes the odd count, so all 513 are pages
    _, q, _ = _setup()
    q.insert_mapping(Gfn(0x200), 513, Mfn(0x8200), P2mType.RAM_RW)
    assert (q.stats()["2M mappings"], q.stats()["4K mappings"]) == (0, 513)


def test_split_on_partial_change_keeps_the_rest() -> None:
    m, p, _ = _setup()
    p.guest_physmap_add_entry(Gfn(0x200), Mfn(0x8200), 9, P2mType.RAM_RW)
    flushes = p.counters["cpu_tlb_flush_vmid"]
    flags = p.guest_physmap_add_entry(Gfn(0x205), Mfn(0x9000), 0, P2mType.RAM_RO)
    assert int(flags) == 3  # ADDED | MODIFIED: the page was valid inside the block
    assert p.counters["shattered_l2"] == 1
    # break-before-make around the split, then again before the valid page is replaced
    assert p.counters["cpu_tlb_flush_vmid"] == flushes + 2
    # the children keep the block's attributes: 0x8204 -> page 0x0080_0000_0820_47FF
    assert _raw(m, p, 0x204) == (0x0080_0000_0820_47FF, 1)
    assert p.lookup(Gfn(0x205)) == P2mEntry(Mfn(0x9000), P2mType.RAM_RO)
    assert p.lookup(Gfn(0x3FF)) == P2mEntry(Mfn(0x83FF), P2mType.RAM_RW)
    assert p.get_entry(Gfn(0x3FF)) == (P2mEntry(Mfn(0x83FF), P2mType.RAM_RW), 0)


def test_removal_defers_the_cpu_flush_and_frees_replaced_tables() -> None:
    m, p, _ = _setup()
    p.insert_mapping(Gfn(0x200), 512, Mfn(0x8201), P2mType.RAM_RW)  # pages in a level-1 table
    tables = m.allocator.owned("d1:p2m")
    flushes = p.counters["cpu_tlb_flush_vmid"]
    # removing the whole 2 MiB unhooks and frees the level-1 table; one (deferred) CPU TLB flush
    assert int(p.guest_physmap_remove_page(Gfn(0x200), 9)) == 2  # MODIFIED
    assert m.allocator.owned("d1:p2m") == tables - 1
    assert p.counters["cpu_tlb_flush_vmid"] == flushes + 1
    assert p.lookup(Gfn(0x200)) is None
    # removing what is not there changes nothing and needs no flush
    assert int(p.guest_physmap_remove_page(Gfn(0x200), 0)) == 0
    assert p.counters["cpu_tlb_flush_vmid"] == flushes + 1
    # a block over an existing table replaces it and frees the table
    p.insert_mapping(Gfn(0x400), 2, Mfn(0x8401), P2mType.RAM_RW)
    before = m.allocator.owned("d1:p2m")
    assert int(p.guest_physmap_add_entry(Gfn(0x400), Mfn(0x8400), 9, P2mType.RAM_RW)) == 3
    assert m.allocator.owned("d1:p2m") == before - 1


def test_identical_rewrite_is_still_a_change_of_a_valid_entry() -> None:
    _, p, _ = _setup()
    p.guest_physmap_add_entry(Gfn(7), Mfn(0x900), 0, P2mType.RAM_RW)
    flushes = p.counters["cpu_tlb_flush_vmid"]
    # Xen removes and rewrites the entry (break-before-make) even when nothing differs
    assert int(p.guest_physmap_add_entry(Gfn(7), Mfn(0x900), 0, P2mType.RAM_RW)) == 3
    assert p.counters["cpu_tlb_flush_vmid"] == flushes + 1


def test_ipa_limit_and_bad_requests() -> None:
    _, p, _ = _setup(pa_bits=32)
    # a 32-bit IPA holds 2**20 guest frames
    p.guest_physmap_add_entry(Gfn((1 << 20) - 1), Mfn(5), 0, P2mType.RAM_RW)
    with pytest.raises(InvalidArgument):
        p.guest_physmap_add_entry(Gfn(1 << 20), Mfn(5), 0, P2mType.RAM_RW)
    with pytest.raises(InvalidArgument):
        p.guest_physmap_add_entry(Gfn(0), Mfn(1 << 36), 0, P2mType.RAM_RW)
    with pytest.raises(InvalidArgument):
        p.set_entry(Gfn(0), Mfn(5), 0, P2mType.RAM_LOGDIRTY)
    with pytest.raises(TypeError):
        p.set_entry(Mfn(0), Mfn(5), 0, P2mType.RAM_RW)  # type: ignore[arg-type]


def test_vmids_are_unique_freed_and_can_run_out() -> None:
    m = Machine(ram_bytes=64 << 20)
    vmids = VmidAllocator(bits=2)  # VMIDs 1..3
    layout = p2m_layout_for_pa_range(40)
    m.p2m_factory = lambda d: ArmP2m(m, d, layout, vmids)
    ds = [m.create_domain(i, DomainKind.HVM) for i in (1, 2, 3)]
    assert [d.p2m.vmid for d in ds] == [1, 2, 3]  # type: ignore[union-attr]
    in_use = dict(m.allocator.in_use)
    with pytest.raises(Busy):
        m.create_domain(4, DomainKind.HVM)
    assert 4 not in m.domains
    assert dict(m.allocator.in_use) == in_use  # the root was never allocated
    m.destroy_domain(ds[1])
    assert m.create_domain(5, DomainKind.HVM).p2m.vmid == 2  # type: ignore[union-attr]


def _snapshot(p: ArmP2m) -> list[tuple[int, int, int]]:
    """Every leaf descriptor with the frames it covers: identical lists mean identical translations."""
    return p.leaves()


def test_allocation_failure_at_each_point_leaves_the_p2m_intact() -> None:
    m, p, _ = _setup()
    p.guest_physmap_add_entry(Gfn(0x3FE00), Mfn(0x8200), 9, P2mType.RAM_RW)  # the last 2 MiB of the first GiB
    p.guest_physmap_add_entry(Gfn(0x1000), Mfn(0x9000), 0, P2mType.RAM_RW)
    before = _snapshot(p)
    in_use = dict(m.allocator.in_use)
    # two pages across the 1 GiB boundary: 0x3FFFF splits the block (one table), 0x40000 needs a level-2 and
    # a level-1 table in the second GiB: three allocations, each of which may fail
    failures = 0
    for nth in range(1, 10):
        m.allocator.fail_nth(nth, owner_prefix="d1:p2m")
        try:
            p.insert_mapping(Gfn(0x3FFFF), 2, Mfn(0x20000), P2mType.RAM_RW)
        except OutOfMemory:
            failures += 1
            assert _snapshot(p) == before
            assert dict(m.allocator.in_use) == in_use
            continue
        finally:
            m.allocator.clear_failures()
        break
    assert failures == 3
    assert p.lookup(Gfn(0x3FFFF)) == P2mEntry(Mfn(0x20000), P2mType.RAM_RW)
    assert p.lookup(Gfn(0x40000)) == P2mEntry(Mfn(0x20001), P2mType.RAM_RW)
    assert p.lookup(Gfn(0x3FFFE)) == P2mEntry(Mfn(0x83FE), P2mType.RAM_RW)
    # the same for a removal that has to split a 1 GiB block
    p.guest_physmap_add_entry(Gfn(0x80000), Mfn(0x40000), 18, P2mType.RAM_RW)
    before = _snapshot(p)
    in_use = dict(m.allocator.in_use)
    for nth in (1, 2):
        m.allocator.fail_nth(nth, owner_prefix="d1:p2m")
        with pytest.raises(OutOfMemory):
            p.guest_physmap_remove_page(Gfn(0x80001), 0)
        m.allocator.clear_failures()
        assert _snapshot(p) == before
        assert dict(m.allocator.in_use) == in_use
    p.guest_physmap_remove_page(Gfn(0x80001), 0)
    assert p.lookup(Gfn(0x80001)) is None
    assert p.lookup(Gfn(0x80002)) == P2mEntry(Mfn(0x40002), P2mType.RAM_RW)


def test_teardown_frees_every_table() -> None:
    m, p, vmids = _setup()
    d: Domain = p.domain
    p.guest_physmap_add_entry(Gfn(0x12345), Mfn(0x1000), 0, P2mType.RAM_RW)
    m.destroy_domain(d)
    assert m.allocator.owned("d1:p2m") == 0
    assert vmids.in_use == 0
    with pytest.raises(InvalidArgument):
        p.guest_physmap_add_entry(Gfn(0), Mfn(0x1000), 0, P2mType.RAM_RW)


_TYPES = [P2mType.RAM_RW, P2mType.RAM_RO, P2mType.IOMMU_MAP_RO, P2mType.GRANT_MAP_RW, P2mType.MMIO_DIRECT_DEV]
_OPS = st.lists(
    st.tuples(
        st.sampled_from(["map", "unmap"]),
        st.sampled_from([0, 9]),
        st.integers(0, 7),  # 2 MiB slot within a 16 MiB window
        st.integers(0, 511),  # page within the slot (orders 0 only)
        st.integers(0, 63),  # machine 2 MiB slot
        st.sampled_from(_TYPES),
    ),
    max_size=14,
)


@settings(max_examples=40, deadline=None)
@given(ops=_OPS)
def test_matches_a_plain_model(ops: list[tuple[str, int, int, int, int, P2mType]]) -> None:
    m, p, _ = _setup()
    model: dict[int, P2mEntry] = {}
    for op, order, slot, page, mslot, t in ops:
        g = slot * 512 + (page if order == 0 else 0)
        mf = 0x10000 + mslot * 512 + (page if order == 0 else 0)
        n = 1 << order
        if op == "map":
            p.guest_physmap_add_entry(Gfn(g), Mfn(mf), order, t)
            for i in range(n):
                model[g + i] = P2mEntry(Mfn(mf + i), t)
        else:
            p.guest_physmap_remove_page(Gfn(g), order)
            for i in range(n):
                model.pop(g + i, None)
        assert {gfn.value: e for gfn, e in p.items()} == model
    for g in range(0, 8 * 512, 37):
        assert p.lookup(Gfn(g)) == model.get(g)
    m.destroy_domain(p.domain)
    assert m.allocator.total_in_use == 0
