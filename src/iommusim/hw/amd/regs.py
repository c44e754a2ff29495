"""AMD IOMMU MMIO register map: offsets and bit fields, shared by the hardware model and the driver.

This is the model's equivalent of a register header file: the driver imports it to program the unit,
the unit to decode what the driver wrote.  Offsets and bits follow the AMD I/O Virtualization Technology
(IOMMU) specification, "MMIO Registers".
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BASE_ADDR_MASK",
    "CAP_EFR_SUP",
    "CAP_IOTLB_SUP",
    "CAP_NP_CACHE",
    "CMD_BUF_BASE",
    "CMD_BUF_HEAD",
    "CMD_BUF_TAIL",
    "CONTROL",
    "CTRL_CMD_BUF_EN",
    "CTRL_COHERENT",
    "CTRL_COM_WAIT_INT_EN",
    "CTRL_EVENT_INT_EN",
    "CTRL_EVENT_LOG_EN",
    "CTRL_HT_TUN_EN",
    "CTRL_IOMMU_EN",
    "CTRL_ISOC",
    "CTRL_PASS_PW",
    "CTRL_RES_PASS_PW",
    "CTRL_WRITABLE",
    "DEV_TAB_BASE",
    "DEV_TAB_SIZE_MASK",
    "EFR_GT_SUP",
    "EFR_HATS_SHIFT",
    "EFR_IA_SUP",
    "EFR_PPR_SUP",
    "EFR_PREF_SUP",
    "EVT_LOG_BASE",
    "EVT_LOG_HEAD",
    "EVT_LOG_TAIL",
    "EXCL_ALLOW",
    "EXCL_BASE",
    "EXCL_ENABLE",
    "EXCL_LIMIT",
    "EXT_FEATURE",
    "MMIO_SIZE",
    "RING_LEN_MASK",
    "RING_LEN_SHIFT",
    "RING_PTR_MASK",
    "STATUS",
    "STATUS_CMD_BUF_RUN",
    "STATUS_COM_WAIT_INT",
    "STATUS_EVENT_LOG_INT",
    "STATUS_EVENT_LOG_RUN",
    "STATUS_EVENT_OVERFLOW",
    "STATUS_W1C",
    "dev_table_base_value",
    "entries_of_ring",
    "hats_for_levels",
    "levels_for_hats",
    "ring_base_value",
    "ring_ptr",
    "ring_ptr_value",
]

# -- offsets ------------------------------------------------------------------------------------------
DEV_TAB_BASE: Final = 0x0000  # device table base address (51:12) and size in 4 KiB pages minus one (8:0)
CMD_BUF_BASE: Final = 0x0008  # command buffer base (51:12) and ComLen (59:56): log2 of the entry count
EVT_LOG_BASE: Final = 0x0010  # event log base (51:12) and EventLen (59:56)
CONTROL: Final = 0x0018
EXCL_BASE: Final = 0x0020  # exclusion range base (51:12), Allow (1), ExEn (0)
EXCL_LIMIT: Final = 0x0028  # exclusion range limit (51:12); bits 11:0 read as ones
EXT_FEATURE: Final = 0x0030  # extended feature register (read only)
CMD_BUF_HEAD: Final = 0x2000
CMD_BUF_TAIL: Final = 0x2008
EVT_LOG_HEAD: Final = 0x2010
EVT_LOG_TAIL: Final = 0x2018
STATUS: Final = 0x2020
MMIO_SIZE: Final = 0x4000  # 16 KiB of MMIO per IOMMU

# -- field masks ----------------------------------------------------------------------------------------
BASE_ADDR_MASK: Final = ((1 << 52) - 1) & ~0xFFF
DEV_TAB_SIZE_MASK: Final = 0x1FF
RING_LEN_SHIFT: Final = 56
RING_LEN_MASK: Final = 0xF << RING_LEN_SHIFT
RING_PTR_MASK: Final = ((1 << 19) - 1) & ~0xF  # head/tail pointers: bits 18:4, a byte offset of 16-byte slots

# -- control register (0x18) ------------------------------------------------------------------------------
CTRL_IOMMU_EN: Final = 1 << 0
CTRL_HT_TUN_EN: Final = 1 << 1
CTRL_EVENT_LOG_EN: Final = 1 << 2
CTRL_EVENT_INT_EN: Final = 1 << 3
CTRL_COM_WAIT_INT_EN: Final = 1 << 4
CTRL_INV_TIMEOUT_MASK: Final = 7 << 5
CTRL_PASS_PW: Final = 1 << 8
CTRL_RES_PASS_PW: Final = 1 << 9
CTRL_COHERENT: Final = 1 << 10
CTRL_ISOC: Final = 1 << 11
CTRL_CMD_BUF_EN: Final = 1 << 12
#: Bits the model lets software write (PPR, guest translation and later features are absent).
CTRL_WRITABLE: Final = (1 << 13) - 1

# -- status register (0x2020) ------------------------------------------------------------------------------
STATUS_EVENT_OVERFLOW: Final = 1 << 0  # RW1C
STATUS_EVENT_LOG_INT: Final = 1 << 1  # RW1C
STATUS_COM_WAIT_INT: Final = 1 << 2  # RW1C
STATUS_EVENT_LOG_RUN: Final = 1 << 3  # read only
STATUS_CMD_BUF_RUN: Final = 1 << 4  # read only
STATUS_W1C: Final = STATUS_EVENT_OVERFLOW | STATUS_EVENT_LOG_INT | STATUS_COM_WAIT_INT

# -- exclusion range ------------------------------------------------------------------------------------------
EXCL_ENABLE: Final = 1 << 0
EXCL_ALLOW: Final = 1 << 1

# -- extended feature register (0x30) ----------------------------------------------------------------------
EFR_PREF_SUP: Final = 1 << 0
EFR_PPR_SUP: Final = 1 << 1
EFR_GT_SUP: Final = 1 << 4
EFR_IA_SUP: Final = 1 << 6  # INVALIDATE_IOMMU_ALL is implemented
EFR_HATS_SHIFT: Final = 10  # host address translation size: 0 = 4 levels, 1 = 5, 2 = 6

# -- PCI capability header (read by firmware/driver from config space) ------------------------------------
CAP_IOTLB_SUP: Final = 1 << 24  # remote IOTLBs (ATS) supported
CAP_NP_CACHE: Final = 1 << 26  # not-present entries may be cached
CAP_EFR_SUP: Final = 1 << 27


def ring_base_value(maddr: int, entries: int) -> int:
    """The value of a command-buffer or event-log base register: address plus log2(entries) in 59:56.

    A 512-entry ring at 0x1234_5000 is 0x1234_5000 | (9 << 56) = 0x0900_0000_1234_5000.
    """
    if entries & (entries - 1) or not 256 <= entries <= 32768:
        raise ValueError(f"a ring holds a power of two from 256 to 32768 entries, not {entries}")
    return (maddr & BASE_ADDR_MASK) | ((entries.bit_length() - 1) << RING_LEN_SHIFT)


def entries_of_ring(base_value: int) -> int:
    """Entries of a ring from its base register (0 when the length code is one of the reserved 0..7)."""
    code = (base_value & RING_LEN_MASK) >> RING_LEN_SHIFT
    return 1 << code if code >= 8 else 0


def dev_table_base_value(maddr: int, pages: int) -> int:
    """Device-table base register: base address plus (pages - 1) in bits 8:0."""
    if not 1 <= pages <= 512:
        raise ValueError(f"a device table is 1 to 512 pages, not {pages}")
    return (maddr & BASE_ADDR_MASK) | (pages - 1)


def ring_ptr(value: int) -> int:
    """Slot index held in a head or tail pointer register."""
    return (value & RING_PTR_MASK) >> 4


def ring_ptr_value(index: int) -> int:
    return (index << 4) & RING_PTR_MASK


def hats_for_levels(levels: int) -> int:
    if not 4 <= levels <= 6:
        raise ValueError(f"host page tables have 4, 5 or 6 levels, not {levels}")
    return levels - 4


def levels_for_hats(hats: int) -> int:
    return 4 + (hats & 3) if hats & 3 != 3 else 4
