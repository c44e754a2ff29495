"""VT-d in-memory structures and their bit layouts: root and context entries, invalidation descriptors,
fault records and fault reasons (legacy mode, 128-bit entries and descriptors).

Each structure is a small frozen dataclass with ``encode() -> (lo, hi)`` and ``decode(lo, hi)``; ``lo`` is
bits 63:0 and ``hi`` bits 127:64, stored little-endian at the lower and higher address.  Decoders keep every
field, including ones a well-behaved driver leaves zero, so that the unit can check reserved bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Final

from iommusim.errors import InvalidArgument

__all__ = [
    "ContextEntry",
    "ContextInvDesc",
    "DescType",
    "DevIotlbInvDesc",
    "FaultReason",
    "FaultRecord",
    "IecInvDesc",
    "IotlbInvDesc",
    "RootEntry",
    "TranslationType",
    "WaitDesc",
    "context_reserved",
    "decode_descriptor",
    "root_reserved",
]

_ADDR: Final = ((1 << 64) - 1) & ~0xFFF


def _above(haw: int) -> int:
    """Bits 63:haw of a 64-bit word."""
    return ((1 << 64) - 1) & ~((1 << haw) - 1)


class TranslationType(IntEnum):
    """Context-entry T field (bits 3:2)."""

    MULTI_LEVEL = 0  # untranslated requests walk the second-level tables; translation requests blocked
    DEVICE_TLB = 1  # as 0, and translation requests from the device's ATS are served too
    PASS_THROUGH = 2  # untranslated requests use the address as is
    RESERVED = 3


class FaultReason(IntEnum):
    """Non-recoverable DMA-remapping fault reasons of the specification."""

    ROOT_NOT_PRESENT = 0x1
    CONTEXT_NOT_PRESENT = 0x2
    CONTEXT_INVALID = 0x3
    BEYOND_MGAW = 0x4
    WRITE_DENIED = 0x5
    READ_DENIED = 0x6
    NEXT_TABLE_INVALID = 0x7
    ROOT_TABLE_INVALID = 0x8
    CONTEXT_TABLE_INVALID = 0x9
    ROOT_RESERVED = 0xA
    CONTEXT_RESERVED = 0xB
    PTE_RESERVED = 0xC
    TRANSLATION_BLOCKED = 0xD

    @property
    def text(self) -> str:
        return _REASON_TEXT[self]


_REASON_TEXT: dict[FaultReason, str] = {
    FaultReason.ROOT_NOT_PRESENT: "root entry not present",
    FaultReason.CONTEXT_NOT_PRESENT: "context entry not present",
    FaultReason.CONTEXT_INVALID: "context entry programmed with invalid values",
    FaultReason.BEYOND_MGAW: "address beyond the guest address width",
    FaultReason.WRITE_DENIED: "write not permitted by the page tables",
    FaultReason.READ_DENIED: "read not permitted by the page tables",
    FaultReason.NEXT_TABLE_INVALID: "next-level table pointer leads nowhere",
    FaultReason.ROOT_TABLE_INVALID: "root table address leads nowhere",
    FaultReason.CONTEXT_TABLE_INVALID: "context table pointer leads nowhere",
    FaultReason.ROOT_RESERVED: "reserved bits set in the root entry",
    FaultReason.CONTEXT_RESERVED: "reserved bits set in the context entry",
    FaultReason.PTE_RESERVED: "reserved bits set in a page-table entry",
    FaultReason.TRANSLATION_BLOCKED: "translation request blocked by the context entry's type",
}


# -- root and context entries -------------------------------------------------------------------------


@dataclass(frozen=True)
class RootEntry:
    """One per bus: bit 0 P, bits 63:12 the context-table address; 11:1 and 127:64 reserved."""

    present: bool
    ctp: int  # context-table machine address (4 KiB aligned)
    lo_extra: int = 0  # bits 11:1 as found (reserved)
    hi: int = 0  # bits 127:64 as found (reserved)

    def encode(self) -> tuple[int, int]:
        if self.ctp & 0xFFF:
            raise InvalidArgument(f"context table address {self.ctp:#x} is not 4 KiB aligned")
        return (self.ctp & _ADDR) | (self.lo_extra & 0xFFE) | int(self.present), self.hi

    @classmethod
    def decode(cls, lo: int, hi: int) -> RootEntry:
        return cls(bool(lo & 1), lo & _ADDR, lo & 0xFFE, hi)


def root_reserved(lo: int, hi: int, haw: int) -> int:
    """Reserved bits set in a root entry (bits 11:1, 63:HAW, 127:64), as one mask over lo | hi << 64."""
    return (lo & (0xFFE | _above(haw))) | (hi << 64)


@dataclass(frozen=True)
class ContextEntry:
    """One per devfn.

    lo: bit 0 P, bit 1 FPD, bits 3:2 T, bits 11:4 reserved, bits 63:12 SLPTPTR;
    hi: bits 2:0 AW, bits 6:3 ignored, bit 7 reserved, bits 23:8 DID, bits 63:24 reserved.
    """

    present: bool
    fpd: bool = False
    t: int = TranslationType.MULTI_LEVEL
    slptptr: int = 0
    aw: int = 2
    did: int = 0
    lo_rsvd: int = 0  # bits 11:4 as found
    hi_ignored: int = 0  # bits 6:3 as found
    hi_rsvd: int = 0  # bit 7 and bits 63:24 as found

    def encode(self) -> tuple[int, int]:
        if self.slptptr & 0xFFF:
            raise InvalidArgument(f"second-level table pointer {self.slptptr:#x} is not 4 KiB aligned")
        if not 0 <= self.did < 1 << 16:
            raise InvalidArgument(f"domain id {self.did:#x} does not fit in 16 bits")
        lo = int(self.present) | int(self.fpd) << 1 | (self.t & 3) << 2
        lo |= (self.lo_rsvd & 0xFF0) | (self.slptptr & _ADDR)
        hi = (self.aw & 7) | (self.hi_ignored & 0x78) | (self.did << 8) | (self.hi_rsvd & ~0xFFFF7F)
        return lo, hi & ((1 << 64) - 1)

    @classmethod
    def decode(cls, lo: int, hi: int) -> ContextEntry:
        return cls(
            present=bool(lo & 1),
            fpd=bool(lo >> 1 & 1),
            t=lo >> 2 & 3,
            slptptr=lo & _ADDR,
            aw=hi & 7,
            did=hi >> 8 & 0xFFFF,
            lo_rsvd=lo & 0xFF0,
            hi_ignored=hi & 0x78,
            hi_rsvd=hi & ~0xFFFF7F & ((1 << 64) - 1),
        )


def context_reserved(lo: int, hi: int, haw: int) -> int:
    """Reserved bits set in a context entry: lo 11:4 and (unless pass-through) 63:HAW; hi bit 7 and 63:24."""
    lo_mask = 0xFF0
    if (lo >> 2 & 3) != TranslationType.PASS_THROUGH:
        lo_mask |= _above(haw)
    hi_mask = 0x80 | _above(24)
    return (lo & lo_mask) | ((hi & hi_mask) << 64)


# -- invalidation descriptors ---------------------------------------------------------------------------


class DescType(IntEnum):
    CONTEXT = 0x1
    IOTLB = 0x2
    DEV_IOTLB = 0x3
    IEC = 0x4
    WAIT = 0x5


@dataclass(frozen=True)
class ContextInvDesc:
    """Context-cache invalidate: lo type 3:0, G 5:4, DID 31:16, SID 47:32, FM 49:48; hi reserved."""

    granularity: int  # 1 global, 2 domain, 3 device
    did: int = 0
    sid: int = 0
    fm: int = 0
    rsvd: int = 0  # reserved bits as found (lo 15:6, 63:50, all of hi)

    RSVD_LO: ClassVar[int] = 0xFFC0 | (((1 << 64) - 1) & ~((1 << 50) - 1))

    def encode(self) -> tuple[int, int]:
        lo = DescType.CONTEXT | (self.granularity & 3) << 4 | (self.did & 0xFFFF) << 16
        lo |= (self.sid & 0xFFFF) << 32 | (self.fm & 3) << 48
        return lo, 0

    @classmethod
    def decode(cls, lo: int, hi: int) -> ContextInvDesc:
        rsvd = (lo & cls.RSVD_LO) | (hi << 64)
        return cls(lo >> 4 & 3, lo >> 16 & 0xFFFF, lo >> 32 & 0xFFFF, lo >> 48 & 3, rsvd)


@dataclass(frozen=True)
class IotlbInvDesc:
    """IOTLB invalidate: lo type 3:0, G 5:4, DW 6, DR 7, DID 31:16; hi AM 5:0, IH 6, ADDR 63:12."""

    granularity: int  # 1 global, 2 domain (DSI), 3 page (PSI)
    did: int = 0
    addr: int = 0
    am: int = 0
    ih: bool = False
    dw: bool = False
    dr: bool = False
    rsvd: int = 0  # reserved bits as found (lo 15:8, 63:32; hi 11:7)

    RSVD_LO: ClassVar[int] = 0xFF00 | (((1 << 64) - 1) & ~((1 << 32) - 1))
    RSVD_HI: ClassVar[int] = 0xF80

    def encode(self) -> tuple[int, int]:
        if self.addr & 0xFFF:
            raise InvalidArgument(f"invalidation address {self.addr:#x} is not 4 KiB aligned")
        lo = DescType.IOTLB | (self.granularity & 3) << 4 | int(self.dw) << 6 | int(self.dr) << 7
        lo |= (self.did & 0xFFFF) << 16
        hi = (self.am & 0x3F) | int(self.ih) << 6 | (self.addr & _ADDR)
        return lo, hi

    @classmethod
    def decode(cls, lo: int, hi: int) -> IotlbInvDesc:
        rsvd = (lo & cls.RSVD_LO) | ((hi & cls.RSVD_HI) << 64)
        return cls(
            granularity=lo >> 4 & 3,
            did=lo >> 16 & 0xFFFF,
            addr=hi & _ADDR,
            am=hi & 0x3F,
            ih=bool(hi >> 6 & 1),
            dw=bool(lo >> 6 & 1),
            dr=bool(lo >> 7 & 1),
            rsvd=rsvd,
        )


@dataclass(frozen=True)
class DevIotlbInvDesc:
    """Device-IOTLB invalidate: lo type 3:0, MIP 20:16, SID 47:32; hi S bit 0, ADDR 63:12.

    With S=1 the size is encoded in the address: the lowest clear bit at or above bit 12 marks the span
    (bit 12 clear: 8 KiB; bits 12 set and 13 clear: 16 KiB; ...).
    """

    sid: int
    addr: int = 0
    size: bool = False
    mip: int = 0
    rsvd: int = 0

    RSVD_LO: ClassVar[int] = 0xFFF0 | (0x7FF << 21) | (((1 << 64) - 1) & ~((1 << 48) - 1))
    RSVD_HI: ClassVar[int] = 0xFFE

    def encode(self) -> tuple[int, int]:
        lo = DescType.DEV_IOTLB | (self.mip & 0x1F) << 16 | (self.sid & 0xFFFF) << 32
        return lo, (self.addr & _ADDR) | int(self.size)

    @classmethod
    def decode(cls, lo: int, hi: int) -> DevIotlbInvDesc:
        rsvd = (lo & cls.RSVD_LO) | ((hi & cls.RSVD_HI) << 64)
        return cls(lo >> 32 & 0xFFFF, hi & _ADDR, bool(hi & 1), lo >> 16 & 0x1F, rsvd)

    def span(self) -> tuple[int, int]:
        """(base address, size in bytes) the descriptor covers."""
        if not self.size:
            return self.addr, 1 << 12
        page = self.addr >> 12
        zero = 0
        while page >> zero & 1:
            zero += 1
        size_shift = 12 + zero + 1
        return self.addr & ~((1 << size_shift) - 1), 1 << size_shift


@dataclass(frozen=True)
class IecInvDesc:
    """Interrupt-entry-cache invalidate: lo type 3:0, G bit 4, IM 31:27, IIDX 47:32 (no remapping here)."""

    global_: bool = True
    im: int = 0
    iidx: int = 0

    def encode(self) -> tuple[int, int]:
        lo = DescType.IEC | int(not self.global_) << 4 | (self.im & 0x1F) << 27 | (self.iidx & 0xFFFF) << 32
        return lo, 0

    @classmethod
    def decode(cls, lo: int, hi: int) -> IecInvDesc:
        return cls(not lo >> 4 & 1, lo >> 27 & 0x1F, lo >> 32 & 0xFFFF)


@dataclass(frozen=True)
class WaitDesc:
    """Invalidation wait: lo type 3:0, IF 4, SW 5, FN 6, status data 63:32; hi status address 63:2."""

    status_addr: int = 0
    status_data: int = 0
    sw: bool = True  # write status data to status address on completion
    if_: bool = False  # raise the invalidation-completion event
    fn: bool = True  # fence: later descriptors wait for this one
    rsvd: int = 0

    RSVD_LO: ClassVar[int] = 0xFFFFFF80
    RSVD_HI: ClassVar[int] = 0x3

    def encode(self) -> tuple[int, int]:
        if self.status_addr & 3:
            raise InvalidArgument(f"status address {self.status_addr:#x} is not 4-byte aligned")
        lo = DescType.WAIT | int(self.if_) << 4 | int(self.sw) << 5 | int(self.fn) << 6
        lo |= (self.status_data & 0xFFFF_FFFF) << 32
        return lo, self.status_addr & ~3 & ((1 << 64) - 1)

    @classmethod
    def decode(cls, lo: int, hi: int) -> WaitDesc:
        rsvd = (lo & cls.RSVD_LO) | ((hi & cls.RSVD_HI) << 64)
        return cls(hi & ~3, lo >> 32, bool(lo >> 5 & 1), bool(lo >> 4 & 1), bool(lo >> 6 & 1), rsvd)


Descriptor = ContextInvDesc | IotlbInvDesc | DevIotlbInvDesc | IecInvDesc | WaitDesc


def decode_descriptor(lo: int, hi: int) -> Descriptor | None:
    """The descriptor a queue slot holds, or None for a type this unit does not know."""
    kind = lo & 0xF
    if kind == DescType.CONTEXT:
        return ContextInvDesc.decode(lo, hi)
    if kind == DescType.IOTLB:
        return IotlbInvDesc.decode(lo, hi)
    if kind == DescType.DEV_IOTLB:
        return DevIotlbInvDesc.decode(lo, hi)
    if kind == DescType.IEC:
        return IecInvDesc.decode(lo, hi)
    if kind == DescType.WAIT:
        return WaitDesc.decode(lo, hi)
    return None


# -- fault records -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultRecord:
    """A primary fault-recording register (128 bits).

    lo: bits 63:12 FI, the faulting page address; hi: bits 15:0 SID, bits 39:32 FR (reason),
    bit 62 T (1: read request, 0: write request), bit 63 F (the record holds a fault).
    """

    fault: bool
    sid: int
    reason: int
    is_read: bool
    addr: int  # page-aligned faulting address

    def encode(self) -> tuple[int, int]:
        hi = (self.sid & 0xFFFF) | (self.reason & 0xFF) << 32 | int(self.is_read) << 62 | int(self.fault) << 63
        return self.addr & _ADDR, hi

    @classmethod
    def decode(cls, lo: int, hi: int) -> FaultRecord:
        return cls(bool(hi >> 63 & 1), hi & 0xFFFF, hi >> 32 & 0xFF, bool(hi >> 62 & 1), lo & _ADDR)

    @property
    def reason_text(self) -> str:
        try:
            return FaultReason(self.reason).text
        except ValueError:
            return "unknown fault reason"
