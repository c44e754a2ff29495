"""The AMD IOMMU hardware model on its own: tables, DTEs and commands written by hand, DMA through it.

Every fault is checked by reading the event the unit wrote into the log in memory, word by word.
"""

from __future__ import annotations

import itertools

import pytest
from amd_support import BareUnit, bare_unit

from iommusim.errors import DmaFault
from iommusim.hw.amd import regs
from iommusim.hw.amd.structs import (
    ALL_PAGES_ADDRESS,
    CompletionWait,
    Dte,
    Event,
    EventCode,
    EventFlag,
    InvalidateDevtabEntry,
    InvalidateIntTable,
    InvalidateIommuAll,
    InvalidateIommuPages,
    InvalidateIotlbPages,
)
from iommusim.pagetable.amd import AmdV1Format
from iommusim.perms import Perm

F = AmdV1Format()
DEV = 0x0300
DOM = 1
R, W, RW = Perm.R, Perm.W, Perm.RW


def leaf(maddr: int, perms: Perm = RW) -> int:
    return maddr | F.leaf_bits(perms, 1)


def tree(b: BareUnit, mode: int = 3) -> list[int]:
    """A chain root -> ... -> level-1 table covering DMA address 0; tables listed root first."""
    tables = [b.table() for _ in range(mode)]
    for lvl, (upper, lower) in enumerate(itertools.pairwise(tables)):
        b.put(upper, 0, F.table_entry(lower << 12, mode - lvl))
    return tables


def dte(root: int, mode: int = 3, perms: Perm = RW, **kw: object) -> Dte:
    return Dte(
        valid=True,
        translation_valid=True,
        mode=mode,
        root=root << 12,
        ir=bool(perms & R),
        iw=bool(perms & W),
        domain_id=DOM,
        **kw,  # type: ignore[arg-type]
    )


def fault(b: BareUnit, access: Perm, daddr: int, devid: int = DEV) -> Event:
    with pytest.raises(DmaFault) as info:
        b.unit.translate(devid, daddr, access)
    record = info.value.record
    assert isinstance(record, Event)
    return record


@pytest.fixture
def b() -> BareUnit:
    return bare_unit()


# ---- translation ------------------------------------------------------------------------------------------


def test_4k_translation_and_iotlb(b: BareUnit) -> None:
    t = tree(b)
    b.put(t[-1], 5, leaf(0x1234_5000))
    b.set_dte(DEV, dte(t[0]))
    tr = b.unit.translate(DEV, 0x5ABC, W)
    assert (tr.maddr, tr.page_shift, tr.perms, tr.cached) == (0x1234_5ABC, 12, RW, False)
    assert b.unit.translate(DEV, 0x5000, R).cached
    assert b.unit.counters()["walks"] == 1


def test_2m_and_1g_leaves(b: BareUnit) -> None:
    t = tree(b, 3)
    b.put(t[1], 1, 0x4020_0000 | F.leaf_bits(RW, 2))  # level-2 slot 1: DMA 0x20_0000..0x3F_FFFF
    b.put(t[0], 1, 0x1_4000_0000 | F.leaf_bits(R, 3))  # level-3 slot 1: DMA 0x4000_0000..0x7FFF_FFFF
    b.set_dte(DEV, dte(t[0]))
    tr = b.unit.translate(DEV, 0x2F_1234, W)
    assert (tr.maddr, tr.page_shift) == (0x402F_1234, 21)
    tr = b.unit.translate(DEV, 0x5555_5555, R)
    assert (tr.maddr, tr.page_shift, tr.perms) == (0x1_5555_5555, 30, R)


def test_next_level_7_replicated_at_level_2(b: BareUnit) -> None:
    # a 4 MiB page at 0x4040_0000 is replicated in level-2 slots 2 and 3 (DMA 0x40_0000..0x7F_FFFF)
    t = tree(b, 3)
    raw = F.sized_leaf(0x4040_0000, 22, RW)
    b.put(t[1], 2, raw)
    b.put(t[1], 3, raw)
    b.set_dte(DEV, dte(t[0]))
    assert b.unit.translate(DEV, 0x7F_FFF8, R).maddr == 0x407F_FFF8  # slot 3, offset 0x3F_FFF8
    tr = b.unit.translate(DEV, 0x40_0010, R)
    assert (tr.maddr, tr.page_shift, tr.cached) == (0x4040_0010, 22, True)  # the 4 MiB IOTLB entry


def test_level_skip_and_its_zero_bits_rule(b: BareUnit) -> None:
    # mode 4; the level-4 root's slot 0 points straight at a level-2 table (level 3 skipped):
    # DMA bits 38:30 must then be zero
    root, l2, l1 = b.table(), b.table(), b.table()
    b.put(root, 0, F.pointer_entry(l2 << 12, 2))
    b.put(l2, 0, F.table_entry(l1 << 12, 2))
    b.put(l1, 7, leaf(0x9000_0000))
    b.set_dte(DEV, dte(root, 4))
    assert b.unit.translate(DEV, 0x7008, R).maddr == 0x9000_0008
    ev = fault(b, R, (1 << 30) | 0x7000)  # bit 30 belongs to the skipped level
    assert (ev.code, ev.flags) == (EventCode.IO_PAGE_FAULT, EventFlag.PR)


def test_permissions_are_anded_over_the_walk_and_the_dte(b: BareUnit) -> None:
    t = tree(b)
    b.put(t[-1], 1, leaf(0x1000_0000, RW))
    b.put(t[1], 0, (b.mem.load_word(t[1], 0) & ~(1 << 62)))  # the level-2 PDE drops IW
    b.set_dte(DEV, dte(t[0]))
    assert b.unit.translate(DEV, 0x1000, R).perms == R
    ev = fault(b, W, 0x1000)
    # PR (0x010) | RW (0x020) | PE (0x040) = 0x070
    assert (ev.code, ev.device_id, ev.domain_id, ev.flags, ev.address) == (
        EventCode.IO_PAGE_FAULT,
        DEV,
        DOM,
        0x70,
        0x1000,
    )
    b.set_dte(DEV, dte(t[0], perms=R))
    b.send(InvalidateDevtabEntry(DEV))
    assert fault(b, W, 0x2000).flags == 0x70  # the DTE denies the write before any walk


def test_io_page_fault_event_in_memory(b: BareUnit) -> None:
    t = tree(b)
    b.set_dte(DEV, dte(t[0]))
    fault(b, W, 0x1_2345_6000)  # three levels reach 2**39: in range, but nothing is mapped there
    # not present: PR = 0; a write: RW (0x020) -> word 1 = 0x2 << 28 | 0x020 << 16 | domain 1 = 0x2020_0001;
    # the address splits into word 2 = 0x2345_6000 and word 3 = 0x1
    assert b.event_words(0) == (DEV, 0x2020_0001, 0x2345_6000, 0x1)
    assert b.irqs, "the event interrupt was raised"
    assert b.status() & regs.STATUS_EVENT_LOG_INT


def test_faulting_translations_are_not_cached(b: BareUnit) -> None:
    t = tree(b)
    b.set_dte(DEV, dte(t[0]))
    fault(b, R, 0x3000)
    b.put(t[-1], 3, leaf(0x7000_0000))  # mapped afterwards, with no invalidation at all
    assert b.unit.translate(DEV, 0x3000, R).maddr == 0x7000_0000
    assert b.unit.counters()["walks"] == 2


def test_dte_v0_passes_dma_untranslated(b: BareUnit) -> None:
    # Xen's passthrough hardware domain: root and mode written, but V = 0
    t = tree(b)
    b.set_dte(DEV, Dte(valid=False, translation_valid=True, mode=3, root=t[0] << 12, domain_id=0))
    tr = b.unit.translate(DEV, 0xABCD_E123, W)
    assert (tr.maddr, tr.perms) == (0xABCD_E123, RW)
    assert b.unit.counters()["passthrough"] == 1
    assert b.unit.counters().get("events", 0) == 0


def test_tv0_faults_and_mode0_is_untranslated_under_ir_iw(b: BareUnit) -> None:
    b.set_dte(DEV, Dte(valid=True, translation_valid=False, domain_id=DOM))
    ev = fault(b, R, 0x4000)
    assert (ev.code, ev.flags) == (EventCode.IO_PAGE_FAULT, 0)
    b.set_dte(0x10, Dte(valid=True, translation_valid=True, mode=0, ir=True, domain_id=2))
    assert b.unit.translate(0x10, 0x5000_0000, R).maddr == 0x5000_0000
    assert fault(b, W, 0x5000_0000, 0x10).flags == EventFlag.PR | EventFlag.RW | EventFlag.PE


def test_illegal_dte_events(b: BareUnit) -> None:
    t = tree(b)
    b.set_dte(DEV, dte(t[0], mode=7))
    ev = fault(b, R, 0x1000)
    # ILLEGAL_DEV_TABLE_ENTRY, RZ = 0: an invalid level encoding -> word 1 = 0x1 << 28
    assert b.event_words(0) == (DEV, 0x1000_0000, 0x1000, 0)
    assert ev.code == EventCode.ILLEGAL_DEV_TABLE_ENTRY
    b.set_dte(0x11, Dte.from_qwords((dte(t[0]).qwords()[0] | (1 << 2), DOM, 0, 0)))
    ev = fault(b, W, 0x2000, 0x11)
    # RZ (0x080) | RW (0x020) = 0x0A0 -> word 1 = 0x10A0_0000
    assert b.event_words(1) == (0x11, 0x10A0_0000, 0x2000, 0)


def test_mode_beyond_the_units_levels_is_illegal() -> None:
    b = bare_unit(paging_levels=4)
    t = tree(b, 5)
    b.set_dte(DEV, dte(t[0], mode=5))
    assert fault(b, R, 0).code == EventCode.ILLEGAL_DEV_TABLE_ENTRY
    assert b.unit.mmio.read(regs.EXT_FEATURE, 8) >> regs.EFR_HATS_SHIFT & 3 == 0  # HATS 0: four levels


def test_address_beyond_the_mode_and_reserved_pte_bits(b: BareUnit) -> None:
    t = tree(b, 2)  # two levels translate DMA bits 29:0
    b.put(t[-1], 1, leaf(0x8000_0000) | (1 << 55))  # a reserved PTE bit
    b.set_dte(DEV, dte(t[0], 2))
    assert fault(b, R, 1 << 30).flags == 0
    ev = fault(b, R, 0x1000)
    assert ev.flags == EventFlag.PR | EventFlag.RZ  # 0x090


def test_device_beyond_the_table_and_unreadable_tables() -> None:
    b = bare_unit()
    b.unit.mmio.write(regs.DEV_TAB_BASE, regs.dev_table_base_value(b.devtab, 1), 8)  # 128 entries
    ev = fault(b, R, 0x1000, 0x100)
    assert (ev.code, ev.device_id, ev.flags) == (EventCode.IO_PAGE_FAULT, 0x100, 0)
    root = b.table()
    b.put(root, 1, F.table_entry((1 << 46) + 0x1000, 2))  # a level-1 table beyond the 46-bit address width
    b.set_dte(0x7F, dte(root, 2))
    ev = fault(b, R, (1 << 21) + 0x5000, 0x7F)
    # PAGE_TAB_HARDWARE_ERROR (4) with type master abort (1 << 9) and the entry's system address
    assert (ev.code, ev.hw_error_type, ev.domain_id) == (EventCode.PAGE_TAB_HARDWARE_ERROR, 1, DOM)
    assert ev.address == (1 << 46) + 0x1000 + 5 * 8


def test_iommu_disabled_means_no_translation(b: BareUnit) -> None:
    b.unit.mmio.write(regs.CONTROL, 0, 8)
    assert b.unit.translate(DEV, 0x1234, W).maddr == 0x1234


def test_exclusion_range(b: BareUnit) -> None:
    t = tree(b)
    b.set_dte(DEV, dte(t[0], allow_exclusion=True))
    b.unit.mmio.write(regs.EXCL_BASE, 0x10_0000 | regs.EXCL_ENABLE, 8)
    b.unit.mmio.write(regs.EXCL_LIMIT, 0x1F_F000, 8)
    assert b.unit.translate(DEV, 0x1F_FFF0, W).maddr == 0x1F_FFF0  # inside: untranslated
    fault(b, W, 0x20_0000)  # outside: translated (and not mapped)


# ---- caches and invalidations --------------------------------------------------------------------------


def _stale_setup(b: BareUnit) -> list[int]:
    t = tree(b)
    for i in range(8):
        b.put(t[-1], i, leaf(0x1000_0000 + (i << 12)))
    b.set_dte(DEV, dte(t[0]))
    for i in range(8):
        b.unit.translate(DEV, i << 12, R)
    for i in range(8):  # the tables change: every page now maps elsewhere
        b.put(t[-1], i, leaf(0x2000_0000 + (i << 12)))
    return t


def _maps(b: BareUnit) -> list[int]:
    return [b.unit.translate(DEV, i << 12, R).maddr >> 28 for i in range(8)]


def test_stale_until_exactly_the_right_page_is_invalidated(b: BareUnit) -> None:
    _stale_setup(b)
    assert _maps(b) == [1] * 8  # every page still follows the old tables
    b.send(InvalidateIommuPages.for_order(DOM, 0x3000, 0), CompletionWait(interrupt=True))
    assert _maps(b) == [1, 1, 1, 2, 1, 1, 1, 1]
    b.send(InvalidateIommuPages.for_order(DOM + 1, 0, 9))  # another domain: nothing happens
    assert _maps(b) == [1, 1, 1, 2, 1, 1, 1, 1]
    b.send(InvalidateIommuPages(DOM, 0x4000 | 0x1000, True))  # S=1, bit 12 set, bit 13 clear: 0x4000-0x7FFF
    assert _maps(b) == [1, 1, 1, 2, 2, 2, 2, 2]
    b.send(InvalidateIommuPages.for_order(DOM, ALL_PAGES_ADDRESS, 0))
    assert _maps(b) == [2] * 8
    c = b.unit.counters()
    assert (c["cmd_inv_pages_page"], c["cmd_inv_pages_range"], c["cmd_inv_pages_domain"]) == (1, 2, 1)


def test_page_invalidation_drops_a_cached_superpage_it_overlaps(b: BareUnit) -> None:
    t = tree(b)
    b.put(t[1], 0, 0x4000_0000 | F.leaf_bits(RW, 2))
    b.set_dte(DEV, dte(t[0]))
    b.unit.translate(DEV, 0x1000, R)
    b.put(t[1], 0, 0x6000_0000 | F.leaf_bits(RW, 2))
    assert b.unit.translate(DEV, 0x1F_F000, R).maddr == 0x401F_F000  # cached 2 MiB entry
    b.send(InvalidateIommuPages.for_order(DOM, 0x1F_F000, 0))
    assert b.unit.translate(DEV, 0x1000, R).maddr == 0x6000_1000


def test_dte_cache_is_stale_until_invalidate_devtab_entry(b: BareUnit) -> None:
    t = tree(b)
    b.put(t[-1], 1, leaf(0x1000_0000))
    b.set_dte(DEV, dte(t[0]))
    b.unit.translate(DEV, 0x1000, R)
    b.set_dte(DEV, Dte())  # V = 0 in memory
    b.send(InvalidateIommuPages.for_order(DOM, ALL_PAGES_ADDRESS, 0))
    assert b.unit.translate(DEV, 0x1000, R).maddr == 0x1000_0000  # the cached DTE still translates
    b.send(InvalidateDevtabEntry(DEV + 1))
    assert b.unit.translate(DEV, 0x1000, R).maddr == 0x1000_0000
    b.send(InvalidateDevtabEntry(DEV))
    assert b.unit.translate(DEV, 0x1000, R).maddr == 0x1000  # now V = 0: untranslated


def test_invalidate_iommu_all_drops_every_cache(b: BareUnit) -> None:
    _stale_setup(b)
    b.set_dte(DEV, Dte())
    b.send(InvalidateIommuAll())
    assert b.unit.translate(DEV, 0x5000, R).maddr == 0x5000
    assert len(b.unit.iotlb) == 0


def test_iotlb_capacity_and_lru() -> None:
    b = bare_unit(iotlb_entries=4)
    t = tree(b)
    for i in range(6):
        b.put(t[-1], i, leaf(0x1000_0000 + (i << 12)))
    b.set_dte(DEV, dte(t[0]))
    for i in (0, 1, 2, 3, 0, 4):  # touching 0 again makes 1 the least recently used
        b.unit.translate(DEV, i << 12, R)
    for i in range(6):
        b.put(t[-1], i, leaf(0x2000_0000 + (i << 12)))
    assert [b.unit.translate(DEV, i << 12, R).cached for i in (0, 2, 3, 4)] == [True] * 4
    assert b.unit.translate(DEV, 0x1000, R).maddr == 0x2000_1000  # evicted: walked again
    assert b.unit.counters()["iotlb_evictions"] >= 1


def test_device_iotlb_follows_invalidate_iotlb_pages_only(b: BareUnit) -> None:
    t = tree(b)
    for i in range(4):
        b.put(t[-1], i, leaf(0x1000_0000 + (i << 12)))
    b.set_dte(DEV, dte(t[0], iotlb=True))
    for i in range(4):
        b.unit.translate(DEV, i << 12, R)
    for i in range(4):
        b.put(t[-1], i, leaf(0x2000_0000 + (i << 12)))
    b.send(InvalidateIommuPages.for_order(DOM, ALL_PAGES_ADDRESS, 0))
    assert [b.unit.translate(DEV, i << 12, R).maddr >> 28 for i in range(4)] == [1] * 4  # the ATS cache
    b.send(InvalidateIotlbPages(DEV, 0x1000, False))
    assert [b.unit.translate(DEV, i << 12, R).maddr >> 28 for i in range(4)] == [1, 2, 1, 1]
    b.send(InvalidateIotlbPages(DEV, 0x1000, True))  # S=1, bit 12 set, bit 13 clear: 0x0000-0x3FFF
    assert [b.unit.translate(DEV, i << 12, R).maddr >> 28 for i in range(4)] == [2] * 4


def test_suppressing_page_fault_events(b: BareUnit) -> None:
    t = tree(b)
    b.set_dte(DEV, dte(t[0], suppress_events=True))
    fault(b, R, 0x1000)
    fault(b, R, 0x2000)  # SE: the second fault of the device is not logged
    assert len(b.events()) == 1
    b.send(InvalidateDevtabEntry(DEV))
    fault(b, R, 0x3000)
    assert len(b.events()) == 1
    b.set_dte(0x20, dte(t[0], suppress_all=True))
    fault(b, R, 0x1000, 0x20)
    assert b.events() == []
    assert b.unit.counters()["events_suppressed"] == 2


# ---- the command processor --------------------------------------------------------------------------------


def test_completion_wait_store_and_interrupt(b: BareUnit) -> None:
    sem = b.table() << 12
    b.send(CompletionWait(store=True, store_address=sem + 8, store_data=0xFEED_FACE_CAFE_BEEF))
    assert b.mem.read_u64(sem + 8) == 0xFEED_FACE_CAFE_BEEF
    assert not b.status() & regs.STATUS_COM_WAIT_INT
    b.send(CompletionWait(interrupt=True))
    assert b.status() & regs.STATUS_COM_WAIT_INT
    before = len(b.irqs)
    ctrl = b.unit.mmio.read(regs.CONTROL)
    b.unit.mmio.write(regs.CONTROL, ctrl | regs.CTRL_COM_WAIT_INT_EN)
    b.send(CompletionWait(interrupt=True))
    assert len(b.irqs) == before + 1
    b.unit.mmio.write(regs.STATUS, regs.STATUS_COM_WAIT_INT)  # RW1C
    assert not b.status() & regs.STATUS_COM_WAIT_INT


def test_every_command_is_executed_and_counted(b: BareUnit) -> None:
    b.send(
        CompletionWait(interrupt=True),
        InvalidateDevtabEntry(DEV),
        InvalidateIommuPages.for_order(DOM, 0x1000, 0),
        InvalidateIotlbPages(DEV, 0x1000, False),
        InvalidateIntTable(DEV),
        InvalidateIommuAll(),
    )
    c = b.unit.counters()
    assert c["commands"] == 6
    for key in ("cmd_completion_wait", "cmd_inv_devtab_entry", "cmd_inv_pages_page", "cmd_inv_iotlb_pages"):
        assert c[key] == 1
    assert (c["cmd_inv_int_table"], c["cmd_inv_iommu_all"]) == (1, 1)
    assert regs.ring_ptr(b.unit.mmio.read(regs.CMD_BUF_HEAD)) == 6


def test_illegal_command_halts_the_buffer_and_logs_its_address(b: BareUnit) -> None:
    sem = b.table() << 12
    bad = b.send_raw((0, 0x9000_0000, 0, 0))  # opcode 9 does not exist
    b.send(CompletionWait(store=True, store_address=sem, store_data=1))
    assert b.mem.read_u64(sem) == 0, "nothing after the illegal command ran"
    assert regs.ring_ptr(b.unit.mmio.read(regs.CMD_BUF_HEAD)) == 0, "the head stays on the bad command"
    assert not b.status() & regs.STATUS_CMD_BUF_RUN
    # ILLEGAL_COMMAND_ERROR: code 5 -> word 1 = 0x5000_0000; words 2-3 = the command's system address
    assert b.event_words(0) == (0, 0x5000_0000, bad & 0xFFFF_FFFF, bad >> 32)
    # software skips the command and restarts the buffer by toggling CmdBufEn
    b.unit.mmio.write(regs.CMD_BUF_HEAD, regs.ring_ptr_value(1), 8)
    ctrl = b.unit.mmio.read(regs.CONTROL)
    b.unit.mmio.write(regs.CONTROL, ctrl & ~regs.CTRL_CMD_BUF_EN)
    b.unit.mmio.write(regs.CONTROL, ctrl)
    assert b.mem.read_u64(sem) == 1
    assert b.status() & regs.STATUS_CMD_BUF_RUN


def test_invalidate_all_is_illegal_without_ia_sup() -> None:
    b = bare_unit(ia_sup=False)
    b.send(InvalidateIommuAll())
    assert b.events()[0].code == EventCode.ILLEGAL_COMMAND_ERROR
    assert not b.unit.mmio.read(regs.EXT_FEATURE, 8) & regs.EFR_IA_SUP


def test_command_buffer_wraps() -> None:
    b = bare_unit(cmd_entries=256)
    sem = b.table() << 12
    for n in range(1, 601):  # 600 commands through a 256-slot ring: the tail wraps twice
        b.send(CompletionWait(store=True, store_address=sem, store_data=n))
        assert b.mem.read_u64(sem) == n
    assert regs.ring_ptr(b.unit.mmio.read(regs.CMD_BUF_HEAD)) == 600 % 256
    assert b.unit.counters()["cmd_completion_wait"] == 600


def test_commands_wait_while_the_buffer_is_disabled(b: BareUnit) -> None:
    sem = b.table() << 12
    ctrl = b.unit.mmio.read(regs.CONTROL)
    b.unit.mmio.write(regs.CONTROL, ctrl & ~regs.CTRL_CMD_BUF_EN)
    b.send(CompletionWait(store=True, store_address=sem, store_data=7))
    assert b.mem.read_u64(sem) == 0
    b.unit.mmio.write(regs.CONTROL, ctrl)
    assert b.mem.read_u64(sem) == 7


# ---- the event log ------------------------------------------------------------------------------------------


def test_event_log_overflow_stops_logging_until_restarted() -> None:
    b = bare_unit(evt_entries=256, event_irq=False)
    t = tree(b)
    b.set_dte(DEV, dte(t[0]))
    for i in range(255):  # 256 slots, one always empty: 255 events fill the log
        fault(b, R, i << 12)
    assert regs.ring_ptr(b.unit.mmio.read(regs.EVT_LOG_TAIL)) == 255
    assert not b.status() & regs.STATUS_EVENT_OVERFLOW
    fault(b, R, 0xABC000)  # no room: dropped, overflow
    st = b.status()
    assert st & regs.STATUS_EVENT_OVERFLOW
    assert not st & regs.STATUS_EVENT_LOG_RUN
    assert b.events()[-1].address == 254 << 12  # the dropped event never reached memory
    fault(b, R, 0xDEF000)  # stopped: even with room now, nothing is written
    assert regs.ring_ptr(b.unit.mmio.read(regs.EVT_LOG_TAIL)) == 255
    c = b.unit.counters()
    assert (c["event_overflows"], c["events_dropped"]) == (1, 2)
    # restart: clear EventOverflow (RW1C) and toggle EventLogEn
    b.unit.mmio.write(regs.STATUS, regs.STATUS_EVENT_OVERFLOW)
    ctrl = b.unit.mmio.read(regs.CONTROL)
    b.unit.mmio.write(regs.CONTROL, ctrl & ~regs.CTRL_EVENT_LOG_EN)
    b.unit.mmio.write(regs.CONTROL, ctrl)
    assert b.status() & regs.STATUS_EVENT_LOG_RUN
    fault(b, W, 0x77000)
    assert b.events()[0].address == 0x77000


def test_overflow_raises_the_interrupt() -> None:
    b = bare_unit(evt_entries=256)
    seen: list[int] = []
    b.unit.irq_handler = lambda: seen.append(b.status())  # a handler that never drains the log
    t = tree(b)
    b.set_dte(DEV, dte(t[0]))
    for i in range(256):
        fault(b, R, i << 12)
    assert len(seen) == 256
    assert seen[-1] & regs.STATUS_EVENT_OVERFLOW


def test_unreadable_device_table_and_command_store_are_hardware_errors(b: BareUnit) -> None:
    beyond = 1 << 46  # just past the machine's 46-bit physical address space
    b.unit.mmio.write(regs.DEV_TAB_BASE, regs.dev_table_base_value(beyond, 1), 8)
    ev = fault(b, W, 0x1000, 0x10)
    # DEV_TAB_HARDWARE_ERROR (3), type master abort (1 << 9) | RW (0x020) = 0x220; address = DTE 0x10's
    assert b.event_words(0) == (0x10, 0x3220_0000, (beyond + 0x10 * 32) & 0xFFFF_FFFF, (beyond + 0x200) >> 32)
    assert ev.code == EventCode.DEV_TAB_HARDWARE_ERROR
    b.send(CompletionWait(store=True, store_address=beyond))
    # COMMAND_HARDWARE_ERROR (6), type master abort -> word 1 = 0x6200_0000; the command's own address
    assert b.event_words(1) == (0, 0x6200_0000, b.cmd & 0xFFFF_FFFF, b.cmd >> 32)
    assert not b.status() & regs.STATUS_CMD_BUF_RUN
