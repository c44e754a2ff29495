"""AMD IOMMU in-memory structures: device-table entries, command-buffer commands and event-log entries.

Shared by the driver (which encodes DTEs and commands and decodes events) and the hardware model (which
does the opposite), like a header file.  Every structure is shown as the 32-bit words the specification
numbers (word 0 holds bits 31:0), because that is how Xen reads and writes them.  Layouts follow the AMD
I/O Virtualization Technology (IOMMU) specification: "Device Table Entry Format", "Command Buffer",
"Event Log".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

__all__ = [
    "ALL_PAGES_ADDRESS",
    "CMD_SIZE",
    "DTE_Q0_RESERVED",
    "DTE_Q1_RESERVED",
    "DTE_SIZE",
    "EVENT_SIZE",
    "Command",
    "CompletionWait",
    "Dte",
    "Event",
    "EventCode",
    "EventFlag",
    "IllegalCommand",
    "InvalidateDevtabEntry",
    "InvalidateIntTable",
    "InvalidateIommuAll",
    "InvalidateIommuPages",
    "InvalidateIotlbPages",
    "Opcode",
    "decode_command",
    "dte_reserved_bits",
    "invalidation_address",
    "invalidation_range",
    "qwords",
    "words32",
]

DTE_SIZE: Final = 32
CMD_SIZE: Final = 16
EVENT_SIZE: Final = 16
#: The address Xen puts in an invalidation to mean "every page of the domain" (S=1: bits 62:12 set).
ALL_PAGES_ADDRESS: Final = 0x7FFF_FFFF_FFFF_F000


def qwords(words: Sequence[int]) -> list[int]:
    """Pair 32-bit words into little-endian 64-bit quadwords (word 0 is the low half of quadword 0)."""
    return [(words[i] & 0xFFFF_FFFF) | ((words[i + 1] & 0xFFFF_FFFF) << 32) for i in range(0, len(words), 2)]


def words32(qws: Sequence[int]) -> tuple[int, ...]:
    out: list[int] = []
    for q in qws:
        out += [q & 0xFFFF_FFFF, (q >> 32) & 0xFFFF_FFFF]
    return tuple(out)


def _bits(hi: int, lo: int) -> int:
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)


# ====================================================================================================
# Device table entry (256 bits)
# ====================================================================================================

#: Quadword 0 bits the model's IOMMU treats as reserved: 8:2, the guest-translation and PPR fields 60:52
#: (the unit has no guest translation or PPR support) and 63.
DTE_Q0_RESERVED: Final = _bits(8, 2) | _bits(60, 52) | (1 << 63)
#: Quadword 1 (bits 127:64): the GCR3 pieces 95:80 and 127:107 (no guest translation) and bit 106.
DTE_Q1_RESERVED: Final = _bits(31, 16) | (1 << 42) | _bits(63, 43)


def dte_reserved_bits(qws: Sequence[int]) -> int:
    """Reserved bits set in quadwords 0 and 1 of a DTE (checked when V=1), folded into one int."""
    return (qws[0] & DTE_Q0_RESERVED) | (qws[1] & DTE_Q1_RESERVED)


@dataclass(frozen=True, slots=True)
class Dte:
    """One device table entry; ``extra_q2``/``extra_q3`` carry the interrupt-remapping half untouched."""

    valid: bool = False  # V, bit 0
    translation_valid: bool = False  # TV, bit 1
    mode: int = 0  # paging mode, bits 11:9 (0: no translation)
    root: int = 0  # page-table root pointer, bits 51:12 (a machine address)
    ir: bool = False  # bit 61
    iw: bool = False  # bit 62
    domain_id: int = 0  # bits 79:64
    iotlb: bool = False  # I, bit 96: the device may cache translations (ATS)
    suppress_events: bool = False  # SE, bit 97: suppress repeated IO_PAGE_FAULT events
    suppress_all: bool = False  # SA, bit 98: suppress all IO_PAGE_FAULT events
    ioctl: int = 0  # bits 100:99
    cache: bool = False  # bit 101
    snoop_disable: bool = False  # bit 102
    allow_exclusion: bool = False  # EX, bit 103
    sysmgt: int = 0  # bits 105:104
    extra_q0: int = 0  # bits of quadword 0 outside the named fields (reserved or guest fields)
    extra_q1: int = 0
    extra_q2: int = 0
    extra_q3: int = 0

    def qwords(self) -> tuple[int, int, int, int]:
        q0 = (
            int(self.valid)
            | (int(self.translation_valid) << 1)
            | ((self.mode & 7) << 9)
            | (self.root & _bits(51, 12))
            | (int(self.ir) << 61)
            | (int(self.iw) << 62)
            | self.extra_q0
        )
        q1 = (
            (self.domain_id & 0xFFFF)
            | (int(self.iotlb) << 32)
            | (int(self.suppress_events) << 33)
            | (int(self.suppress_all) << 34)
            | ((self.ioctl & 3) << 35)
            | (int(self.cache) << 37)
            | (int(self.snoop_disable) << 38)
            | (int(self.allow_exclusion) << 39)
            | ((self.sysmgt & 3) << 40)
            | self.extra_q1
        )
        return q0, q1, self.extra_q2, self.extra_q3

    def words(self) -> tuple[int, ...]:
        return words32(self.qwords())

    @classmethod
    def from_qwords(cls, qws: Sequence[int]) -> Dte:
        q0, q1, q2, q3 = (int(q) for q in qws)
        named0 = 0b11 | (7 << 9) | _bits(51, 12) | (3 << 61)
        named1 = 0xFFFF | _bits(41, 32)
        return cls(
            valid=bool(q0 & 1),
            translation_valid=bool(q0 & 2),
            mode=(q0 >> 9) & 7,
            root=q0 & _bits(51, 12),
            ir=bool(q0 >> 61 & 1),
            iw=bool(q0 >> 62 & 1),
            domain_id=q1 & 0xFFFF,
            iotlb=bool(q1 >> 32 & 1),
            suppress_events=bool(q1 >> 33 & 1),
            suppress_all=bool(q1 >> 34 & 1),
            ioctl=(q1 >> 35) & 3,
            cache=bool(q1 >> 37 & 1),
            snoop_disable=bool(q1 >> 38 & 1),
            allow_exclusion=bool(q1 >> 39 & 1),
            sysmgt=(q1 >> 40) & 3,
            extra_q0=q0 & ~named0,
            extra_q1=q1 & ~named1,
            extra_q2=q2,
            extra_q3=q3,
        )

    @classmethod
    def from_words(cls, words: Sequence[int]) -> Dte:
        return cls.from_qwords(qwords(words))


# ====================================================================================================
# Commands (128 bits; the opcode is in bits 63:60, i.e. bits 31:28 of word 1)
# ====================================================================================================


class Opcode(IntEnum):
    COMPLETION_WAIT = 0x1
    INVALIDATE_DEVTAB_ENTRY = 0x2
    INVALIDATE_IOMMU_PAGES = 0x3
    INVALIDATE_IOTLB_PAGES = 0x4
    INVALIDATE_INT_TABLE = 0x5
    PREFETCH_IOMMU_PAGES = 0x6
    COMPLETE_PPR_REQUEST = 0x7
    INVALIDATE_IOMMU_ALL = 0x8


def invalidation_address(daddr: int, order: int) -> tuple[int, bool]:
    """The (address, S) pair that invalidates 2**order pages at ``daddr``, the way Xen builds it.

    With S=1 the size is told by the first zero bit at or above bit 12: for order 9 the address gets bit
    20 cleared and bits 19:12 set, which reads back as 2 MiB.  ``ALL_PAGES_ADDRESS`` with S=1 covers the
    whole domain.  Order 0 gives S=0, a single page.
    """
    if daddr == ALL_PAGES_ADDRESS:
        return daddr, True
    if order == 0:
        return daddr & ~0xFFF, False
    mark = 1 << (order - 1 + 12)
    return ((daddr & ~mark) | (mark - 1)) & ~0xFFF, True


def invalidation_range(address: int, size_bit: bool) -> tuple[int, int]:
    """(base, size in bytes) an invalidation covers; size 2**64 means "every address"."""
    address &= ~0xFFF & ((1 << 64) - 1)
    if not size_bit:
        return address, 1 << 12
    field = address >> 12
    zero = (~field & (field + 1)).bit_length() - 1  # lowest zero bit of the address from bit 12 up
    shift = min(12 + zero + 1, 64)
    return address & ~((1 << shift) - 1) & ((1 << 64) - 1), 1 << shift


class IllegalCommand(Exception):
    """A command the unit refuses: unknown or unsupported opcode, or a reserved bit set."""


@dataclass(frozen=True, slots=True)
class CompletionWait:
    store: bool = False  # S: write store_data to store_address when every earlier command is done
    interrupt: bool = False  # I: set ComWaitInt (and interrupt if enabled)
    flush_queue: bool = False  # F
    store_address: int = 0  # 8-byte aligned, bits 51:3
    store_data: int = 0
    opcode = Opcode.COMPLETION_WAIT

    def words(self) -> tuple[int, int, int, int]:
        addr = self.store_address & _bits(51, 3)
        w0 = int(self.store) | (int(self.interrupt) << 1) | (int(self.flush_queue) << 2) | (addr & 0xFFFF_FFF8)
        w1 = (addr >> 32) | (self.opcode << 28)
        return w0, w1, self.store_data & 0xFFFF_FFFF, (self.store_data >> 32) & 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class InvalidateDevtabEntry:
    device_id: int
    opcode = Opcode.INVALIDATE_DEVTAB_ENTRY

    def words(self) -> tuple[int, int, int, int]:
        return self.device_id & 0xFFFF, self.opcode << 28, 0, 0


@dataclass(frozen=True, slots=True)
class InvalidateIommuPages:
    domain_id: int
    address: int  # bits 63:12
    size: bool = False  # S
    pde: bool = False  # PDE: page-directory entries too
    opcode = Opcode.INVALIDATE_IOMMU_PAGES

    @classmethod
    def for_order(cls, domain_id: int, daddr: int, order: int) -> InvalidateIommuPages:
        """Xen's encoding: S and PDE both set for a range or for the whole domain."""
        address, s = invalidation_address(daddr, order)
        return cls(domain_id, address, s, s)

    def words(self) -> tuple[int, int, int, int]:
        a = self.address & ~0xFFF
        w2 = int(self.size) | (int(self.pde) << 1) | (a & 0xFFFF_F000)
        return 0, (self.domain_id & 0xFFFF) | (self.opcode << 28), w2, (a >> 32) & 0xFFFF_FFFF

    def range(self) -> tuple[int, int]:
        return invalidation_range(self.address, self.size)


@dataclass(frozen=True, slots=True)
class InvalidateIotlbPages:
    device_id: int
    address: int
    size: bool = False
    maxpend: int = 0
    queue_id: int = 0
    opcode = Opcode.INVALIDATE_IOTLB_PAGES

    def words(self) -> tuple[int, int, int, int]:
        a = self.address & ~0xFFF
        w0 = (self.device_id & 0xFFFF) | ((self.maxpend & 0xFF) << 24)
        w1 = (self.queue_id & 0xFFFF) | (self.opcode << 28)
        return w0, w1, int(self.size) | (a & 0xFFFF_F000), (a >> 32) & 0xFFFF_FFFF

    def range(self) -> tuple[int, int]:
        return invalidation_range(self.address, self.size)


@dataclass(frozen=True, slots=True)
class InvalidateIntTable:
    device_id: int
    opcode = Opcode.INVALIDATE_INT_TABLE

    def words(self) -> tuple[int, int, int, int]:
        return self.device_id & 0xFFFF, self.opcode << 28, 0, 0


@dataclass(frozen=True, slots=True)
class InvalidateIommuAll:
    opcode = Opcode.INVALIDATE_IOMMU_ALL

    def words(self) -> tuple[int, int, int, int]:
        return 0, self.opcode << 28, 0, 0


Command = (
    CompletionWait
    | InvalidateDevtabEntry
    | InvalidateIommuPages
    | InvalidateIotlbPages
    | InvalidateIntTable
    | InvalidateIommuAll
)

# Reserved bits of each command as (quadword 0 mask, quadword 1 mask); the opcode field is excluded.
# PASID and guest (GN) fields count as reserved: the model's unit has no guest translation.
_RESERVED: dict[Opcode, tuple[int, int]] = {
    Opcode.COMPLETION_WAIT: (_bits(59, 52), 0),
    Opcode.INVALIDATE_DEVTAB_ENTRY: (_bits(59, 16), _bits(63, 0)),
    Opcode.INVALIDATE_IOMMU_PAGES: (_bits(31, 0) | _bits(59, 48), _bits(11, 2)),
    Opcode.INVALIDATE_IOTLB_PAGES: (_bits(23, 16) | _bits(59, 48), _bits(11, 1)),
    Opcode.INVALIDATE_INT_TABLE: (_bits(59, 16), _bits(63, 0)),
    Opcode.INVALIDATE_IOMMU_ALL: (_bits(59, 0), _bits(63, 0)),
}


def decode_command(words: Sequence[int], *, ia_sup: bool = True) -> Command:
    """Decode one command as the unit does; raises ``IllegalCommand`` for anything it must refuse."""
    q0, q1 = qwords(words)
    code = (q0 >> 60) & 0xF
    try:
        op = Opcode(code)
    except ValueError:
        raise IllegalCommand(f"undefined opcode {code:#x}") from None
    if op in (Opcode.PREFETCH_IOMMU_PAGES, Opcode.COMPLETE_PPR_REQUEST) or (
        op == Opcode.INVALIDATE_IOMMU_ALL and not ia_sup
    ):
        raise IllegalCommand(f"{op.name} is not supported by this IOMMU")
    r0, r1 = _RESERVED[op]
    if q0 & r0 or q1 & r1:
        raise IllegalCommand(f"{op.name} with reserved bits set ({q0 & r0:#x}, {q1 & r1:#x})")
    if op == Opcode.COMPLETION_WAIT:
        return CompletionWait(
            store=bool(q0 & 1),
            interrupt=bool(q0 & 2),
            flush_queue=bool(q0 & 4),
            store_address=q0 & _bits(51, 3),
            store_data=q1,
        )
    if op == Opcode.INVALIDATE_DEVTAB_ENTRY:
        return InvalidateDevtabEntry(q0 & 0xFFFF)
    if op == Opcode.INVALIDATE_IOMMU_PAGES:
        return InvalidateIommuPages((q0 >> 32) & 0xFFFF, q1 & ~0xFFF, bool(q1 & 1), bool(q1 & 2))
    if op == Opcode.INVALIDATE_IOTLB_PAGES:
        return InvalidateIotlbPages(
            q0 & 0xFFFF, q1 & ~0xFFF, bool(q1 & 1), maxpend=(q0 >> 24) & 0xFF, queue_id=(q0 >> 32) & 0xFFFF
        )
    if op == Opcode.INVALIDATE_INT_TABLE:
        return InvalidateIntTable(q0 & 0xFFFF)
    return InvalidateIommuAll()


# ====================================================================================================
# Event log entries (128 bits; the event code is in bits 63:60)
# ====================================================================================================


class EventCode(IntEnum):
    ILLEGAL_DEV_TABLE_ENTRY = 0x1
    IO_PAGE_FAULT = 0x2
    DEV_TAB_HARDWARE_ERROR = 0x3
    PAGE_TAB_HARDWARE_ERROR = 0x4
    ILLEGAL_COMMAND_ERROR = 0x5
    COMMAND_HARDWARE_ERROR = 0x6
    IOTLB_INV_TIMEOUT = 0x7
    INVALID_DEVICE_REQUEST = 0x8


class EventFlag(IntEnum):
    """Bits of the 12-bit flags field (event bits 59:48, word 1 bits 27:16)."""

    GN = 0x001  # guest (nested) translation
    NX = 0x002  # no-execute
    US = 0x004  # user/supervisor
    I = 0x008  # noqa: E741 - the specification's name: an interrupt request, not a memory access
    PR = 0x010  # the faulting page (or entry) was present
    RW = 0x020  # 1 = write access, 0 = read
    PE = 0x040  # permission denied
    RZ = 0x080  # a reserved bit was set (0 with PR=1: an invalid level encoding)
    TR = 0x100  # a translation request (ATS) rather than a transaction


#: Hardware-error events carry a Type in flags bits 10:9: 1 master abort, 2 target abort, 3 data error.
HW_ERROR_MASTER_ABORT: Final = 1
HW_ERROR_TARGET_ABORT: Final = 2
HW_ERROR_DATA_ERROR: Final = 3


@dataclass(frozen=True, slots=True)
class Event:
    """One event-log entry.

    Every event the model raises fits one layout: device id in bits 15:0, domain id (IO_PAGE_FAULT and
    PAGE_TAB_HARDWARE_ERROR) in bits 47:32, flags in 59:48, code in 63:60 and an address in 127:64 (the
    faulting DMA address, the entry's system address, or the command's system address).
    """

    code: int  # an EventCode value; unknown codes decode as themselves
    device_id: int = 0
    domain_id: int = 0
    flags: int = 0
    address: int = 0

    def words(self) -> tuple[int, int, int, int]:
        w1 = (self.domain_id & 0xFFFF) | ((self.flags & 0xFFF) << 16) | ((int(self.code) & 0xF) << 28)
        return self.device_id & 0xFFFF, w1, self.address & 0xFFFF_FFFF, (self.address >> 32) & 0xFFFF_FFFF

    @classmethod
    def from_words(cls, words: Sequence[int]) -> Event | None:
        """Decode an entry; None for an all-zero code (a slot the hardware has not written yet)."""
        w0, w1, w2, w3 = (int(w) & 0xFFFF_FFFF for w in words)
        code = w1 >> 28
        if code == 0:
            return None
        return cls(code, w0 & 0xFFFF, w1 & 0xFFFF, (w1 >> 16) & 0xFFF, w2 | (w3 << 32))

    @property
    def name(self) -> str:
        try:
            return EventCode(self.code).name
        except ValueError:
            return f"EVENT_{self.code:#x}"

    @property
    def is_write(self) -> bool:
        return bool(self.flags & EventFlag.RW)

    @property
    def hw_error_type(self) -> int:
        return (self.flags >> 9) & 3
