"""Golden values for device-table entries, commands, events and register fields, worked out by hand.

Structures are shown as the specification's 32-bit words: word 0 holds bits 31:0, word 1 bits 63:32, ...
Commands keep their opcode in word 1 bits 31:28; events keep their code there.
"""

from __future__ import annotations

import pytest

from iommusim.drivers.amd.devtable import DeviceTable
from iommusim.hw.amd import regs
from iommusim.hw.amd.structs import (
    ALL_PAGES_ADDRESS,
    CompletionWait,
    Dte,
    Event,
    EventCode,
    EventFlag,
    IllegalCommand,
    InvalidateDevtabEntry,
    InvalidateIntTable,
    InvalidateIommuAll,
    InvalidateIommuPages,
    InvalidateIotlbPages,
    decode_command,
    dte_reserved_bits,
    invalidation_range,
)
from iommusim.machine import Machine

# ---- device table entry -----------------------------------------------------------------------------


def test_dte_golden() -> None:
    # V (bit 0) + TV (bit 1) = 0x3; mode 3 -> 3 << 9 = 0x600; root 0x1_2345_6000 in bits 51:12;
    # IR (bit 61) + IW (bit 62) = 0x6000_0000_0000_0000  ->  quadword 0 = 0x6000_0001_2345_6603
    # domain 7 in bits 79:64 -> word 2 = 7; I (bit 96) -> word 3 bit 0 = 1
    dte = Dte(valid=True, translation_valid=True, mode=3, root=0x1_2345_6000, ir=True, iw=True, domain_id=7, iotlb=True)
    assert dte.qwords()[0] == 0x6000_0001_2345_6603
    assert dte.words() == (0x2345_6603, 0x6000_0001, 0x0000_0007, 0x0000_0001, 0, 0, 0, 0)
    assert Dte.from_words(dte.words()) == dte


def test_dte_suppress_and_sysmgt_bits() -> None:
    # SE = bit 97 -> word 3 bit 1; SA = bit 98 -> word 3 bit 2; EX = bit 103 -> bit 7; SysMgt 105:104 -> bits 9:8
    dte = Dte(suppress_events=True, suppress_all=True, allow_exclusion=True, sysmgt=3)
    assert dte.words()[3] == 0b11_1000_0110
    assert Dte.from_words(dte.words()) == dte


def test_device_table_writes_dtes_like_xen() -> None:
    # Xen rewrites words 2, 1, 0: word 2 = domain id, word 1 = root[51:32] | IR (bit 29) | IW (bit 30),
    # word 0 = root[31:12] | mode << 9 | TV | V.  Root 0x1_2345_6000, domain 7, mode 3, valid:
    #   word 1 = 0x1 | 0x6000_0000 = 0x6000_0001, word 0 = 0x2345_6000 | 0x600 | 0x3 = 0x2345_6603
    m = Machine(ram_bytes=64 << 20)
    t = DeviceTable(m.memory, m.allocator, 0x301)
    t.allocate()
    # 0x301 entries * 32 bytes = 24 KiB -> 6 pages, rounded up to a power of two: 8
    assert (t.pages, t.entries) == (8, 1024)
    t.set_root_page_table(0x300, 0x1_2345_6000, 7, 3, True)
    assert [t.read_word(0x300, w) for w in range(4)] == [0x2345_6603, 0x6000_0001, 7, 0]
    t.set_iotlb(0x300, True)
    assert t.read_word(0x300, 3) == 1
    assert t.translation_valid(0x300)
    t.disable_translation(0x300)  # clears V and TV only: 0x2345_6600
    assert t.read_word(0x300, 0) == 0x2345_6600
    assert not t.translation_valid(0x300)
    # passthrough hardware domain: V = 0 but TV = 1
    t.set_root_page_table(0x10, 0x5000, 0, 4, False)
    assert t.read_word(0x10, 0) == 0x5000 | (4 << 9) | 0x2


def test_dte_reserved_bits() -> None:
    assert dte_reserved_bits(Dte(valid=True, mode=3, ir=True, iw=True, domain_id=0xFFFF).qwords()) == 0
    assert dte_reserved_bits((1 << 2, 0, 0, 0)) == 1 << 2  # bits 8:2
    assert dte_reserved_bits((1 << 55, 0, 0, 0)) == 1 << 55  # GV: no guest translation here
    assert dte_reserved_bits((0, 1 << 16, 0, 0)) == 1 << 16  # GCR3[30:15] in bits 95:80


# ---- commands ------------------------------------------------------------------------------------------


def test_completion_wait_golden() -> None:
    # S (bit 0) + I (bit 1) = 0x3; store address 0x1234_5678_9AB8: bits 31:3 in word 0 -> 0x5678_9AB8 | 3,
    # bits 51:32 in word 1 -> 0x1234, opcode 1 -> 0x1000_0000; data low/high in words 2/3
    cmd = CompletionWait(store=True, interrupt=True, store_address=0x1234_5678_9AB8, store_data=0x1122_3344_5566_7788)
    assert cmd.words() == (0x5678_9ABB, 0x1000_1234, 0x5566_7788, 0x1122_3344)
    assert decode_command(cmd.words()) == cmd


def test_invalidate_devtab_entry_golden() -> None:
    assert InvalidateDevtabEntry(0x0300).words() == (0x0000_0300, 0x2000_0000, 0, 0)
    assert decode_command((0x300, 0x2000_0000, 0, 0)) == InvalidateDevtabEntry(0x300)


def test_invalidate_iommu_pages_single_page() -> None:
    # order 0: S = PDE = 0; address 0xABCD_E000 in word 2 bits 31:12; domain 5 in word 1; opcode 3
    cmd = InvalidateIommuPages.for_order(5, 0xABCD_E000, 0)
    assert cmd.words() == (0, 0x3000_0005, 0xABCD_E000, 0)
    assert cmd.range() == (0xABCD_E000, 0x1000)


def test_invalidate_iommu_pages_2m() -> None:
    # order 9 at 0x1234_5000: mark = 1 << (9 - 1 + 12) = 1 << 20; clear bit 20 (0x1234_5000 has it set)
    # and set bits 19:0 -> 0x122F_FFFF, keep 63:12 -> 0x122F_F000; S = PDE = 1 -> word 2 = 0x122F_F003.
    # The first zero bit from bit 12 up is bit 20, so the size is 2**21 and the base 0x1220_0000.
    cmd = InvalidateIommuPages.for_order(1, 0x1234_5000, 9)
    assert cmd.words() == (0, 0x3000_0001, 0x122F_F003, 0)
    assert cmd.range() == (0x1220_0000, 0x20_0000)


def test_invalidate_iommu_pages_1g() -> None:
    # order 18 at 0x1_4567_8000: mark = 1 << 29; bit 29 of 0x1_4567_8000 is clear already;
    # bits 28:12 set -> 0x1_5FFF_F000; S = PDE = 1; word 3 = 0x1.  Size 2**30, base 0x1_4000_0000.
    cmd = InvalidateIommuPages.for_order(1, 0x1_4567_8000, 18)
    assert cmd.words() == (0, 0x3000_0001, 0x5FFF_F003, 0x1)
    assert cmd.range() == (0x1_4000_0000, 1 << 30)


def test_invalidate_iommu_pages_whole_domain() -> None:
    # the sentinel 0x7FFF_FFFF_FFFF_F000 sets bits 62:12; with S = PDE = 1 word 2 = 0xFFFF_F003 and
    # word 3 = 0x7FFF_FFFF; the first zero bit is bit 63, so it covers 2**64 bytes: everything.
    cmd = InvalidateIommuPages.for_order(9, ALL_PAGES_ADDRESS, 0)
    assert cmd.words() == (0, 0x3000_0009, 0xFFFF_F003, 0x7FFF_FFFF)
    assert cmd.range() == (0, 1 << 64)


def test_invalidate_iotlb_pages_golden() -> None:
    # device 0x300 in word 0 bits 15:0, Maxpend 32 in bits 31:24 -> 0x2000_0300;
    # queue id 0x300 in word 1 bits 15:0, opcode 4 -> 0x4000_0300; S in word 2 bit 0
    cmd = InvalidateIotlbPages(0x300, 0x122F_F000, True, maxpend=32, queue_id=0x300)
    assert cmd.words() == (0x2000_0300, 0x4000_0300, 0x122F_F001, 0)
    assert decode_command(cmd.words()) == cmd
    assert cmd.range() == (0x1220_0000, 0x20_0000)


def test_invalidate_int_table_and_all_golden() -> None:
    assert InvalidateIntTable(0x300).words() == (0x300, 0x5000_0000, 0, 0)
    assert InvalidateIommuAll().words() == (0, 0x8000_0000, 0, 0)
    assert decode_command((0, 0x8000_0000, 0, 0)) == InvalidateIommuAll()


@pytest.mark.parametrize(
    ("words", "why"),
    [
        ((0, 0x0000_0000, 0, 0), "undefined opcode 0x0"),
        ((0, 0x9000_0000, 0, 0), "undefined opcode 0x9"),
        ((0, 0x6000_0000, 0, 0), "PREFETCH"),  # no PreFSup
        ((0, 0x7000_0000, 0, 0), "COMPLETE_PPR"),  # no PPRSup
        ((0x300, 0x2000_0001, 0, 0), "reserved"),  # INVALIDATE_DEVTAB_ENTRY bits 59:32
        ((0x1, 0x3000_0005, 0xABCD_E000, 0), "reserved"),  # a PASID without guest translation
        ((0, 0x3000_0005, 0xABCD_E004, 0), "reserved"),  # GN without guest translation
        ((0, 0x1010_0000, 0, 0), "reserved"),  # COMPLETION_WAIT bits 59:52
    ],
)
def test_illegal_commands(words: tuple[int, int, int, int], why: str) -> None:
    with pytest.raises(IllegalCommand, match=why):
        decode_command(words)


def test_invalidate_all_needs_ia_sup() -> None:
    with pytest.raises(IllegalCommand, match="not supported"):
        decode_command((0, 0x8000_0000, 0, 0), ia_sup=False)


def test_invalidation_range_edge_cases() -> None:
    assert invalidation_range(0x5000, False) == (0x5000, 0x1000)
    # bit 12 clear with S=1: first zero at bit 12 -> 2**13 bytes
    assert invalidation_range(0x6000, True) == (0x6000, 0x2000)
    # every address bit set: no zero bit, the whole space
    assert invalidation_range((1 << 64) - 0x1000, True) == (0, 1 << 64)


# ---- events ---------------------------------------------------------------------------------------------


def test_io_page_fault_event_golden() -> None:
    # device 0x300 -> word 0; domain 1 in word 1 bits 15:0; flags PR (0x010) | RW (0x020) = 0x030 in
    # bits 27:16 -> 0x0030_0000; code 2 in bits 31:28 -> 0x2000_0000: word 1 = 0x2030_0001
    ev = Event(EventCode.IO_PAGE_FAULT, 0x300, 1, EventFlag.PR | EventFlag.RW, 0x1_DEAD_B000)
    assert ev.words() == (0x300, 0x2030_0001, 0xDEAD_B000, 0x1)
    assert Event.from_words(ev.words()) == ev
    assert ev.is_write


def test_other_event_codes_golden() -> None:
    # ILLEGAL_DEV_TABLE_ENTRY: RZ (0x080) -> 0x0080_0000 | 1 << 28
    assert Event(EventCode.ILLEGAL_DEV_TABLE_ENTRY, 0x10, 0, EventFlag.RZ, 0x2000).words() == (
        0x10,
        0x1080_0000,
        0x2000,
        0,
    )
    # ILLEGAL_COMMAND_ERROR carries only the command's address
    assert Event(EventCode.ILLEGAL_COMMAND_ERROR, address=0x3F_F000).words() == (0, 0x5000_0000, 0x3F_F000, 0)
    # PAGE_TAB_HARDWARE_ERROR: type master abort (1) in flags bits 10:9 -> 0x200 -> word 1 bits 26:25
    ev = Event(EventCode.PAGE_TAB_HARDWARE_ERROR, 0x300, 4, 0x200, 0x40_0000_0008)
    assert ev.words() == (0x300, 0x4200_0004, 0x8, 0x40)
    assert ev.hw_error_type == 1
    assert Event(EventCode.DEV_TAB_HARDWARE_ERROR).words()[1] == 0x3000_0000
    assert Event(EventCode.COMMAND_HARDWARE_ERROR).words()[1] == 0x6000_0000
    assert Event(EventCode.IOTLB_INV_TIMEOUT).words()[1] == 0x7000_0000
    assert Event(EventCode.INVALID_DEVICE_REQUEST).words()[1] == 0x8000_0000
    assert Event.from_words((0, 0, 0, 0)) is None  # an unwritten slot


# ---- register fields ------------------------------------------------------------------------------------


def test_register_fields() -> None:
    # 512 entries -> ComLen = log2(512) = 9 in bits 59:56 -> 0x0900_0000_0000_0000
    assert regs.ring_base_value(0x1234_5000, 512) == 0x0900_0000_1234_5000
    assert regs.entries_of_ring(0x0900_0000_1234_5000) == 512
    assert regs.entries_of_ring(0x0700_0000_1234_5000) == 0  # lengths below 256 are reserved
    # 8 pages -> size field 7 in bits 8:0
    assert regs.dev_table_base_value(0x8000_0000, 8) == 0x8000_0007
    # slot 5 -> byte offset 0x50 in bits 18:4
    assert regs.ring_ptr_value(5) == 0x50
    assert regs.ring_ptr(0x50) == 5
    assert (regs.hats_for_levels(4), regs.hats_for_levels(6)) == (0, 2)
    with pytest.raises(ValueError, match="power of two"):
        regs.ring_base_value(0, 100)
