"""SMMUv2 register map and field encodings: the "header file" the driver and the hardware model share.

The SMMU's MMIO window is split in two halves.  The first half is the global space: page 0 (GR0) holds the
global control, identification, fault, TLB-maintenance and stream-mapping registers, page 1 (GR1) the
context-bank attribute registers.  The second half holds one page per context bank.  Pages are 4 KiB
(IDR1.PAGESIZE = 0); each half has ``2 ** (IDR1.NUMPAGENDXB + 1)`` pages.

Offsets and fields follow the ARM SMMU architecture v2 (IHI 0062) as drivers use them (Xen's and Linux's
arm-smmu drivers define the same values); the decoders here are what the hardware model obeys.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final

__all__ = [
    "CB_SIZE",
    "PAGE_SIZE",
    "Cbar",
    "CbarType",
    "Fsr",
    "Fsynr0",
    "Idr0",
    "Idr1",
    "Idr2",
    "S2cr",
    "S2crType",
    "Scr0",
    "Sctlr",
    "Sgfsr",
    "Smr",
    "Tcr",
    "id_bits_to_size",
    "size_to_id_bits",
]

PAGE_SIZE: Final = 4096
CB_SIZE: Final = PAGE_SIZE  # one page per context bank

# ---------------------------------------------------------------------------------------------------------
# GR0: global register space 0
# ---------------------------------------------------------------------------------------------------------
GR0_SCR0: Final = 0x000
GR0_SCR1: Final = 0x004
GR0_SACR: Final = 0x010
GR0_IDR0: Final = 0x020
GR0_IDR1: Final = 0x024
GR0_IDR2: Final = 0x028
GR0_IDR3: Final = 0x02C
GR0_IDR4: Final = 0x030
GR0_IDR5: Final = 0x034
GR0_IDR6: Final = 0x038
GR0_IDR7: Final = 0x03C
GR0_SGFAR: Final = 0x040  # 64-bit
GR0_SGFSR: Final = 0x048
GR0_SGFSRRESTORE: Final = 0x04C
GR0_SGFSYNR0: Final = 0x050
GR0_SGFSYNR1: Final = 0x054
GR0_SGFSYNR2: Final = 0x058
GR0_STLBIALL: Final = 0x060
GR0_TLBIVMID: Final = 0x064
GR0_TLBIALLNSNH: Final = 0x068
GR0_TLBIALLH: Final = 0x06C
GR0_STLBGSYNC: Final = 0x070
GR0_STLBGSTATUS: Final = 0x074
GR0_SMR_BASE: Final = 0x800
GR0_S2CR_BASE: Final = 0xC00


def gr0_smr(n: int) -> int:
    return GR0_SMR_BASE + (n << 2)


def gr0_s2cr(n: int) -> int:
    return GR0_S2CR_BASE + (n << 2)


STLBGSTATUS_GSACTIVE: Final = 1 << 0

# ---------------------------------------------------------------------------------------------------------
# GR1: context bank attribute registers
# ---------------------------------------------------------------------------------------------------------
GR1_CBAR_BASE: Final = 0x000
GR1_CBFRSYNRA_BASE: Final = 0x400
GR1_CBA2R_BASE: Final = 0x800


def gr1_cbar(n: int) -> int:
    return GR1_CBAR_BASE + (n << 2)


def gr1_cbfrsynra(n: int) -> int:
    return GR1_CBFRSYNRA_BASE + (n << 2)


def gr1_cba2r(n: int) -> int:
    return GR1_CBA2R_BASE + (n << 2)


CBA2R_VA64: Final = 1 << 0  # the context uses the AArch64 translation format
CBFRSYNRA_SID_MASK: Final = 0xFFFF

# ---------------------------------------------------------------------------------------------------------
# Context bank registers (offsets within a bank's page)
# ---------------------------------------------------------------------------------------------------------
CB_SCTLR: Final = 0x00
CB_ACTLR: Final = 0x04
CB_RESUME: Final = 0x08
CB_TCR2: Final = 0x10
CB_TTBR0: Final = 0x20  # 64-bit
CB_TTBR1: Final = 0x28  # 64-bit
CB_TCR: Final = 0x30
CB_CONTEXTIDR: Final = 0x34
CB_MAIR0: Final = 0x38
CB_MAIR1: Final = 0x3C
CB_PAR: Final = 0x50  # 64-bit
CB_FSR: Final = 0x58
CB_FSRRESTORE: Final = 0x5C
CB_FAR: Final = 0x60  # 64-bit
CB_FSYNR0: Final = 0x68
CB_FSYNR1: Final = 0x6C
CB_IPAFAR: Final = 0x70  # 64-bit
CB_TLBIIPAS2: Final = 0x630  # 64-bit
CB_TLBSYNC: Final = 0x7F0
CB_TLBSTATUS: Final = 0x7F4

RESUME_TERMINATE: Final = 1 << 0  # 0 = retry the stalled transaction, 1 = terminate it


def id_bits_to_size(code: int) -> int:
    """IDR2.IAS/OAS/UBS and TCR.PS size encodings: 0..5 = 32, 36, 40, 42, 44, 48 bits (6+ read as 48)."""
    return (32, 36, 40, 42, 44, 48)[min(code, 5)]


def size_to_id_bits(bits: int) -> int:
    """The largest encoding whose size does not exceed ``bits``."""
    sizes = (32, 36, 40, 42, 44, 48)
    if bits < 32:
        raise ValueError(f"no SMMU address-size encoding for {bits} bits")
    return max(i for i, s in enumerate(sizes) if s <= bits)


def _field(value: int, shift: int, width: int) -> int:
    return (value >> shift) & ((1 << width) - 1)


# ---------------------------------------------------------------------------------------------------------
# sCR0
# ---------------------------------------------------------------------------------------------------------
class Scr0:
    CLIENTPD: Final = 1 << 0  # client transactions bypass the SMMU
    GFRE: Final = 1 << 1  # global fault report enable (abort returned to the client)
    GFIE: Final = 1 << 2  # global fault interrupt enable
    EXIDENABLE: Final = 1 << 3
    GCFGFRE: Final = 1 << 4
    GCFGFIE: Final = 1 << 5
    STALLD: Final = 1 << 8
    GSE: Final = 1 << 9
    USFCFG: Final = 1 << 10  # unmatched stream: 0 = bypass, 1 = unidentified stream fault
    VMIDPNE: Final = 1 << 11
    PTM: Final = 1 << 12
    FB: Final = 1 << 13
    BSU_SHIFT: Final = 14
    BSU_MASK: Final = 3 << 14
    SMCFCFG: Final = 1 << 21  # several SMRs match: 1 = stream match conflict fault
    VMID16EN: Final = 1 << 31


# ---------------------------------------------------------------------------------------------------------
# Identification registers
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Idr0:
    numsmrg: int = 0  # stream mapping register groups (7:0)
    numsidb: int = 0  # stream id bits (12:9)
    cttw: bool = False  # coherent translation table walks (14)
    numirpt: int = 0  # context interrupts (23:16)
    ptfs: int = 0  # 25:24: 0 = v7+v8 formats, 1 = no AArch32 short, 2 = AArch64 only
    atosns: bool = False  # 26
    sms: bool = False  # stream matching support (27)
    nts: bool = False  # nested translation (28)
    s2ts: bool = False  # stage 2 translation (29)
    s1ts: bool = False  # stage 1 translation (30)
    ses: bool = False  # security extensions (31)

    def encode(self) -> int:
        return (
            (self.numsmrg & 0xFF)
            | (self.numsidb & 0xF) << 9
            | int(self.cttw) << 14
            | (self.numirpt & 0xFF) << 16
            | (self.ptfs & 3) << 24
            | int(self.atosns) << 26
            | int(self.sms) << 27
            | int(self.nts) << 28
            | int(self.s2ts) << 29
            | int(self.s1ts) << 30
            | int(self.ses) << 31
        )

    @classmethod
    def decode(cls, v: int) -> Idr0:
        return cls(
            numsmrg=_field(v, 0, 8),
            numsidb=_field(v, 9, 4),
            cttw=bool(v >> 14 & 1),
            numirpt=_field(v, 16, 8),
            ptfs=_field(v, 24, 2),
            atosns=bool(v >> 26 & 1),
            sms=bool(v >> 27 & 1),
            nts=bool(v >> 28 & 1),
            s2ts=bool(v >> 29 & 1),
            s1ts=bool(v >> 30 & 1),
            ses=bool(v >> 31 & 1),
        )


@dataclass(frozen=True, slots=True)
class Idr1:
    numcb: int = 0  # context banks (7:0)
    numssdndxb: int = 0  # 11:8
    ssdtp: int = 0  # 13:12
    smcd: bool = False  # 15
    nums2cb: int = 0  # stage-2-only context banks (23:16)
    numpagendxb: int = 0  # 30:28: each half of the window has 2**(n+1) pages
    pagesize: bool = False  # 31: 64 KiB register pages

    def encode(self) -> int:
        return (
            (self.numcb & 0xFF)
            | (self.numssdndxb & 0xF) << 8
            | (self.ssdtp & 3) << 12
            | int(self.smcd) << 15
            | (self.nums2cb & 0xFF) << 16
            | (self.numpagendxb & 7) << 28
            | int(self.pagesize) << 31
        )

    @classmethod
    def decode(cls, v: int) -> Idr1:
        return cls(
            numcb=_field(v, 0, 8),
            numssdndxb=_field(v, 8, 4),
            ssdtp=_field(v, 12, 2),
            smcd=bool(v >> 15 & 1),
            nums2cb=_field(v, 16, 8),
            numpagendxb=_field(v, 28, 3),
            pagesize=bool(v >> 31 & 1),
        )


@dataclass(frozen=True, slots=True)
class Idr2:
    ias: int = 0  # input (IPA) size encoding (3:0)
    oas: int = 0  # output (PA) size encoding (7:4)
    ubs: int = 0  # upstream bus size encoding (11:8)
    ptfs_4k: bool = False  # 12
    ptfs_16k: bool = False  # 13
    ptfs_64k: bool = False  # 14
    vmid16: bool = False  # 15

    def encode(self) -> int:
        return (
            (self.ias & 0xF)
            | (self.oas & 0xF) << 4
            | (self.ubs & 0xF) << 8
            | int(self.ptfs_4k) << 12
            | int(self.ptfs_16k) << 13
            | int(self.ptfs_64k) << 14
            | int(self.vmid16) << 15
        )

    @classmethod
    def decode(cls, v: int) -> Idr2:
        return cls(
            ias=_field(v, 0, 4),
            oas=_field(v, 4, 4),
            ubs=_field(v, 8, 4),
            ptfs_4k=bool(v >> 12 & 1),
            ptfs_16k=bool(v >> 13 & 1),
            ptfs_64k=bool(v >> 14 & 1),
            vmid16=bool(v >> 15 & 1),
        )


# ---------------------------------------------------------------------------------------------------------
# Stream mapping: SMR and S2CR
# ---------------------------------------------------------------------------------------------------------
SMR_VALID: Final = 1 << 31
SMR_ID_MASK: Final = 0x7FFF  # ID (14:0) and MASK (30:16) are 15 bits wide here
SMR_MASK_SHIFT: Final = 16


@dataclass(frozen=True, slots=True)
class Smr:
    """Stream match register: a stream id matches when it equals ID in every bit MASK does not cover."""

    id: int
    mask: int = 0
    valid: bool = True

    def encode(self) -> int:
        return (int(self.valid) << 31) | (self.mask & 0x7FFF) << 16 | (self.id & 0x7FFF)

    @classmethod
    def decode(cls, v: int) -> Smr:
        return cls(id=v & 0x7FFF, mask=(v >> 16) & 0x7FFF, valid=bool(v >> 31 & 1))

    def matches(self, sid: int) -> bool:
        return self.valid and not ((sid ^ self.id) & ~self.mask & 0x7FFF)


class S2crType(IntEnum):
    TRANSLATE = 0
    BYPASS = 1
    FAULT = 2
    RESERVED = 3


@dataclass(frozen=True, slots=True)
class S2cr:
    """Stream-to-context register: what happens to a matched stream."""

    type: S2crType
    cbndx: int = 0  # context bank index (7:0), for TRANSLATE

    def encode(self) -> int:
        return (int(self.type) << 16) | (self.cbndx & 0xFF)

    @classmethod
    def decode(cls, v: int) -> S2cr:
        return cls(S2crType((v >> 16) & 3), v & 0xFF)


# ---------------------------------------------------------------------------------------------------------
# CBAR
# ---------------------------------------------------------------------------------------------------------
class CbarType(IntEnum):
    S2_TRANS = 0
    S1_TRANS_S2_BYPASS = 1
    S1_TRANS_S2_FAULT = 2
    S1_TRANS_S2_TRANS = 3


@dataclass(frozen=True, slots=True)
class Cbar:
    type: CbarType
    vmid: int = 0  # 7:0 (stage-2 contexts)
    irptndx: int = 0  # 31:24 (SMMUv1; SMMUv2 uses the bank index)

    def encode(self) -> int:
        return (self.irptndx & 0xFF) << 24 | int(self.type) << 16 | (self.vmid & 0xFF)

    @classmethod
    def decode(cls, v: int) -> Cbar:
        return cls(CbarType((v >> 16) & 3), v & 0xFF, (v >> 24) & 0xFF)


# ---------------------------------------------------------------------------------------------------------
# Context bank control, translation control and fault registers
# ---------------------------------------------------------------------------------------------------------
class Sctlr:
    M: Final = 1 << 0  # translation enabled (0: the stage-2 context bypasses)
    TRE: Final = 1 << 1
    AFE: Final = 1 << 2
    AFFD: Final = 1 << 3  # access flag fault disable
    E: Final = 1 << 4
    CFRE: Final = 1 << 5  # context fault report enable (abort returned to the client)
    CFIE: Final = 1 << 6  # context fault interrupt enable
    CFCFG: Final = 1 << 7  # context fault: 0 = terminate, 1 = stall
    HUPCF: Final = 1 << 8
    ASIDPNE: Final = 1 << 12


@dataclass(frozen=True, slots=True)
class Tcr:
    """A stage-2 context's TCR in the AArch64 (VTCR_EL2-like) layout, used when CBA2R.VA64 is set.

    T0SZ 5:0, SL0 7:6, IRGN0 9:8, ORGN0 11:10, SH0 13:12, TG0 15:14 (0 = 4 KiB), PS 18:16 (the output
    size encoding); Xen also sets bit 31 (EAE in the AArch32 view), which this layout ignores.
    """

    t0sz: int
    sl0: int
    irgn0: int = 1
    orgn0: int = 1
    sh0: int = 3
    tg0: int = 0
    ps: int = 0
    eae: bool = False

    def encode(self) -> int:
        return (
            (self.t0sz & 0x3F)
            | (self.sl0 & 3) << 6
            | (self.irgn0 & 3) << 8
            | (self.orgn0 & 3) << 10
            | (self.sh0 & 3) << 12
            | (self.tg0 & 3) << 14
            | (self.ps & 7) << 16
            | int(self.eae) << 31
        )

    @classmethod
    def decode(cls, v: int) -> Tcr:
        return cls(
            t0sz=v & 0x3F,
            sl0=(v >> 6) & 3,
            irgn0=(v >> 8) & 3,
            orgn0=(v >> 10) & 3,
            sh0=(v >> 12) & 3,
            tg0=(v >> 14) & 3,
            ps=(v >> 16) & 7,
            eae=bool(v >> 31 & 1),
        )

    @staticmethod
    def aarch32_fields(v: int) -> tuple[int, int, int]:
        """(T0SZ, S, SL0) of the AArch32 long-descriptor VTCR layout (T0SZ 3:0 signed, S bit 4, SL0 7:6)."""
        return v & 0xF, (v >> 4) & 1, (v >> 6) & 3


class Fsr:
    TF: Final = 1 << 1  # translation fault
    AFF: Final = 1 << 2  # access flag fault
    PF: Final = 1 << 3  # permission fault
    EF: Final = 1 << 4  # external fault
    TLBMCF: Final = 1 << 5
    TLBLKF: Final = 1 << 6
    ASF: Final = 1 << 7  # address size fault
    UUT: Final = 1 << 8
    FORMAT_SHIFT: Final = 9  # 10:9: 0 AArch32 short, 1 AArch32 long, 2 AArch64 descriptor format
    SS: Final = 1 << 30  # a transaction is stalled
    MULTI: Final = 1 << 31  # a fault arrived while one was already recorded
    FAULT_BITS: Final = TF | AFF | PF | EF | TLBMCF | TLBLKF | ASF | UUT
    W1C: Final = FAULT_BITS | SS | MULTI | (3 << 9)


class Fsynr0:
    PLVL_MASK: Final = 3  # 1:0 lookup level of the fault (ARM numbering)
    WNR: Final = 1 << 4  # write not read
    PNU: Final = 1 << 5
    IND: Final = 1 << 6
    NSATTR: Final = 1 << 8
    PTWF: Final = 1 << 10  # the fault happened fetching a descriptor
    AFR: Final = 1 << 11
    S1CBNDX_SHIFT: Final = 16

    @staticmethod
    def encode(level: int, write: bool, ptwf: bool = False) -> int:
        return (level & 3) | (Fsynr0.WNR if write else 0) | (Fsynr0.PTWF if ptwf else 0)


class Sgfsr:
    ICF: Final = 1 << 0  # invalid context fault (e.g. a stream mapped to "fault")
    USF: Final = 1 << 1  # unidentified stream fault (no SMR matched)
    SMCF: Final = 1 << 2  # stream match conflict fault (several SMRs matched)
    UCBF: Final = 1 << 3  # unimplemented context bank fault
    UCIF: Final = 1 << 4  # unimplemented context interrupt fault
    CAF: Final = 1 << 5  # configuration access fault
    EF: Final = 1 << 6  # external fault
    PF: Final = 1 << 7
    UUT: Final = 1 << 8
    MULTI: Final = 1 << 31
    FAULT_BITS: Final = ICF | USF | SMCF | UCBF | UCIF | CAF | EF | PF | UUT
    W1C: Final = FAULT_BITS | MULTI


class Sgfsynr0:
    NESTED: Final = 1 << 0
    WNR: Final = 1 << 1
    PNU: Final = 1 << 2
    IND: Final = 1 << 3
    NSSTATE: Final = 1 << 4
    NSATTR: Final = 1 << 5
