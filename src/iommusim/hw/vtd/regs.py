"""VT-d remapping-unit registers: offsets, bit fields, and the CAP/ECAP codecs.

This module is the "header file" both halves share: the unit model declares its register file from it and
the driver programs the unit through it.  Offsets and fields follow the VT-d specification's register
chapter (legacy, non-scalable mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from iommusim.errors import InvalidArgument

__all__ = [
    "CCMD",
    "FSTS",
    "GCMD",
    "GSTS",
    "IOTLB_REG",
    "IVA",
    "Cap",
    "Ecap",
    "Reg",
    "agaw_to_levels",
    "agaw_to_width",
    "width_to_agaw",
]


class Reg:
    """Register offsets (bytes from the unit's MMIO base)."""

    VER: Final = 0x00
    CAP: Final = 0x08
    ECAP: Final = 0x10
    GCMD: Final = 0x18
    GSTS: Final = 0x1C
    RTADDR: Final = 0x20
    CCMD: Final = 0x28
    FSTS: Final = 0x34
    FECTL: Final = 0x38
    FEDATA: Final = 0x3C
    FEADDR: Final = 0x40
    FEUADDR: Final = 0x44
    AFLOG: Final = 0x58
    PMEN: Final = 0x64
    IQH: Final = 0x80
    IQT: Final = 0x88
    IQA: Final = 0x90
    ICS: Final = 0x9C
    IECTL: Final = 0xA0
    IEDATA: Final = 0xA4
    IEADDR: Final = 0xA8
    IEUADDR: Final = 0xAC
    IRTA: Final = 0xB8


class GCMD:
    """Global command bits (write-only register; each bit asks for one thing)."""

    TE: Final = 1 << 31  # translation enable
    SRTP: Final = 1 << 30  # set root table pointer (one-shot)
    SFL: Final = 1 << 29
    EAFL: Final = 1 << 28
    WBF: Final = 1 << 27  # write-buffer flush (one-shot)
    QIE: Final = 1 << 26  # queued-invalidation enable
    IRE: Final = 1 << 25
    SIRTP: Final = 1 << 24
    CFI: Final = 1 << 23
    ONE_SHOT: Final = SRTP | SFL | WBF | SIRTP


class GSTS:
    """Global status bits, one per command."""

    TES: Final = 1 << 31
    RTPS: Final = 1 << 30
    FLS: Final = 1 << 29
    AFLS: Final = 1 << 28
    WBFS: Final = 1 << 27
    QIES: Final = 1 << 26
    IRES: Final = 1 << 25
    IRTPS: Final = 1 << 24
    CFIS: Final = 1 << 23
    #: status bits that mirror a persistent enable; software writes GCMD with these preserved
    PERSISTENT: Final = TES | QIES | IRES | CFIS


class CCMD:
    """Context command register (64-bit at 0x28)."""

    ICC: Final = 1 << 63
    CIRG_SHIFT: Final = 61  # requested granularity 62:61
    CAIG_SHIFT: Final = 59  # actual granularity 60:59
    FM_SHIFT: Final = 32  # function mask 33:32
    SID_SHIFT: Final = 16  # 31:16
    GLOBAL: Final = 1
    DOMAIN: Final = 2
    DEVICE: Final = 3


class IVA:
    """Invalidate-address register (64-bit at ECAP.IRO * 16)."""

    AM_MASK: Final = 0x3F
    IH: Final = 1 << 6
    ADDR_MASK: Final = ~0xFFF & ((1 << 64) - 1)


class IOTLB_REG:  # noqa: N801 - the specification's register name
    """IOTLB invalidate register (64-bit at IVA + 8)."""

    IVT: Final = 1 << 63
    IIRG_SHIFT: Final = 60  # requested granularity 61:60
    IAIG_SHIFT: Final = 57  # actual granularity 58:57
    DR: Final = 1 << 49
    DW: Final = 1 << 48
    DID_SHIFT: Final = 32  # 47:32
    GLOBAL: Final = 1
    DOMAIN: Final = 2
    PAGE: Final = 3


class FSTS:
    """Fault status register bits."""

    PFO: Final = 1 << 0  # primary fault overflow (RW1C)
    PPF: Final = 1 << 1  # primary pending fault (read-only: some record has F set)
    AFO: Final = 1 << 2
    APF: Final = 1 << 3
    IQE: Final = 1 << 4  # invalidation queue error (RW1C)
    ICE: Final = 1 << 5
    ITE: Final = 1 << 6
    FRI_SHIFT: Final = 8  # fault record index 15:8
    W1C: Final = PFO | AFO | APF | IQE | ICE | ITE


FECTL_IM: Final = 1 << 31  # interrupt mask
FECTL_IP: Final = 1 << 30  # interrupt pending (read-only)
IECTL_IM: Final = 1 << 31
IECTL_IP: Final = 1 << 30
ICS_IWC: Final = 1 << 0  # invalidation wait descriptor complete (RW1C)
IQA_QS_MASK: Final = 0x7
IQA_DW: Final = 1 << 11  # 256-bit descriptors (not supported by this model: must be 0)
IQ_INDEX_SHIFT: Final = 4  # head/tail registers hold the descriptor index << 4 (128-bit descriptors)
VER_1_0: Final = 0x10  # major 1, minor 0


def agaw_to_width(agaw: int) -> int:
    """30, 39, 48, 57 or 64 bits for AGAW codes 0..4."""
    return 30 + 9 * agaw


def width_to_agaw(width: int) -> int:
    """The AGAW code of an address width (rounding up to a whole level)."""
    if width < 30:
        raise InvalidArgument(f"an address width of {width} bits is below VT-d's smallest (30)")
    return (width - 30 + 8) // 9


def agaw_to_levels(agaw: int) -> int:
    return agaw + 2


@dataclass(frozen=True)
class Cap:
    """The capability register, field by field (bit positions in the comments)."""

    nd: int = 2  # 2:0 number of domains: 2**(4 + 2*nd)
    afl: bool = False  # 3 advanced fault logging
    rwbf: bool = False  # 4 required write-buffer flushing
    plmr: bool = False  # 5
    phmr: bool = False  # 6
    cm: bool = False  # 7 caching mode: not-present and erroneous entries may be cached
    sagaw: int = 0b00100  # 12:8 supported AGAWs (bit 1: 39-bit, 2: 48-bit, 3: 57-bit)
    mgaw: int = 48  # 21:16 holds MGAW - 1
    zlr: bool = False  # 22
    fro: int = 0x220  # 33:24 holds the fault-recording register offset / 16
    sllps: int = 0b11  # 37:34 second-level large pages: bit 0 2 MiB, bit 1 1 GiB
    psi: bool = True  # 39 page-selective invalidation
    nfr: int = 4  # 47:40 holds the number of fault-recording registers - 1
    mamv: int = 18  # 53:48 maximum address mask value for PSI
    dwd: bool = True  # 54 write draining
    drd: bool = True  # 55 read draining
    pi: bool = False  # 59 posted interrupts

    def encode(self) -> int:
        if self.fro & 0xF or not 0 < self.fro >> 4 < 1 << 10:
            raise InvalidArgument(f"fault-recording offset {self.fro:#x} must be a multiple of 16 below 16 KiB")
        if not 1 <= self.nfr <= 256:
            raise InvalidArgument("a unit has 1 to 256 fault-recording registers")
        return (
            (self.nd & 7)
            | int(self.afl) << 3
            | int(self.rwbf) << 4
            | int(self.plmr) << 5
            | int(self.phmr) << 6
            | int(self.cm) << 7
            | (self.sagaw & 0x1F) << 8
            | ((self.mgaw - 1) & 0x3F) << 16
            | int(self.zlr) << 22
            | ((self.fro >> 4) & 0x3FF) << 24
            | (self.sllps & 0xF) << 34
            | int(self.psi) << 39
            | ((self.nfr - 1) & 0xFF) << 40
            | (self.mamv & 0x3F) << 48
            | int(self.dwd) << 54
            | int(self.drd) << 55
            | int(self.pi) << 59
        )

    @classmethod
    def decode(cls, raw: int) -> Cap:
        return cls(
            nd=raw & 7,
            afl=bool(raw >> 3 & 1),
            rwbf=bool(raw >> 4 & 1),
            plmr=bool(raw >> 5 & 1),
            phmr=bool(raw >> 6 & 1),
            cm=bool(raw >> 7 & 1),
            sagaw=raw >> 8 & 0x1F,
            mgaw=(raw >> 16 & 0x3F) + 1,
            zlr=bool(raw >> 22 & 1),
            fro=(raw >> 24 & 0x3FF) << 4,
            sllps=raw >> 34 & 0xF,
            psi=bool(raw >> 39 & 1),
            nfr=(raw >> 40 & 0xFF) + 1,
            mamv=raw >> 48 & 0x3F,
            dwd=bool(raw >> 54 & 1),
            drd=bool(raw >> 55 & 1),
            pi=bool(raw >> 59 & 1),
        )

    @property
    def domains(self) -> int:
        return 1 << (4 + 2 * self.nd)

    def supports_agaw(self, agaw: int) -> bool:
        return bool(self.sagaw >> agaw & 1)

    @property
    def superpage_levels(self) -> frozenset[int]:
        """Levels at which a leaf may be written: 2 for 2 MiB pages, 3 for 1 GiB pages."""
        return frozenset(lv for lv, bit in ((2, 0), (3, 1)) if self.sllps >> bit & 1)


@dataclass(frozen=True)
class Ecap:
    """The extended capability register, field by field."""

    c: bool = True  # 0 page-walk coherency
    qi: bool = True  # 1 queued invalidation
    dt: bool = True  # 2 device-TLB (ATS) support
    ir: bool = False  # 3 interrupt remapping
    eim: bool = False  # 4
    pt: bool = True  # 6 pass-through translation type
    sc: bool = True  # 7 snoop control
    iro: int = 0x100  # 17:8 holds the IOTLB register offset / 16
    mhmv: int = 0  # 23:20

    def encode(self) -> int:
        if self.iro & 0xF or not 0 < self.iro >> 4 < 1 << 10:
            raise InvalidArgument(f"IOTLB register offset {self.iro:#x} must be a multiple of 16 below 16 KiB")
        return (
            int(self.c)
            | int(self.qi) << 1
            | int(self.dt) << 2
            | int(self.ir) << 3
            | int(self.eim) << 4
            | int(self.pt) << 6
            | int(self.sc) << 7
            | ((self.iro >> 4) & 0x3FF) << 8
            | (self.mhmv & 0xF) << 20
        )

    @classmethod
    def decode(cls, raw: int) -> Ecap:
        return cls(
            c=bool(raw & 1),
            qi=bool(raw >> 1 & 1),
            dt=bool(raw >> 2 & 1),
            ir=bool(raw >> 3 & 1),
            eim=bool(raw >> 4 & 1),
            pt=bool(raw >> 6 & 1),
            sc=bool(raw >> 7 & 1),
            iro=(raw >> 8 & 0x3FF) << 4,
            mhmv=raw >> 20 & 0xF,
        )
