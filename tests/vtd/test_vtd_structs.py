"""Root and context entries, invalidation descriptors, fault records, CAP/ECAP: golden values by hand."""

from __future__ import annotations

from iommusim.hw.vtd.regs import Cap, Ecap, agaw_to_levels, agaw_to_width, width_to_agaw
from iommusim.hw.vtd.structs import (
    ContextEntry,
    ContextInvDesc,
    DevIotlbInvDesc,
    FaultRecord,
    IecInvDesc,
    IotlbInvDesc,
    RootEntry,
    TranslationType,
    WaitDesc,
    context_reserved,
    decode_descriptor,
    root_reserved,
)


def test_root_entry_golden() -> None:
    # P (bit 0) | CTP 0x1_2345_6000 in bits 63:12 -> lo 0x1_2345_6001, hi 0
    assert RootEntry(True, 0x1_2345_6000).encode() == (0x1_2345_6001, 0)
    r = RootEntry.decode(0x1_2345_6001, 0)
    assert (r.present, r.ctp) == (True, 0x1_2345_6000)
    # reserved: bits 11:1 (here bit 4 = 0x10), bits 63:HAW, all of the high word
    assert root_reserved(0x1_2345_6011, 0, 46) == 0x10
    assert root_reserved(0x1_2345_6001, 0, 32) == 0x1_0000_0000  # bit 32 is above a 32-bit HAW
    assert root_reserved(0x1_2345_6001, 1, 46) == 1 << 64


def test_context_entry_golden() -> None:
    # lo: P | T=0 (bits 3:2) | SLPTPTR 0x8_9ABC_D000 = 0x8_9ABC_D001
    # hi: AW=2 (bits 2:0) | DID 0x2A << 8 = 0x2A02
    e = ContextEntry(True, fpd=False, t=TranslationType.MULTI_LEVEL, slptptr=0x8_9ABC_D000, aw=2, did=0x2A)
    assert e.encode() == (0x8_9ABC_D001, 0x2A02)
    # pass-through (T=2 -> bits 3:2 = 10b = 0x8), AW=1, DID 0x1234: lo 0x9, hi 0x1234 << 8 | 1 = 0x12_3401
    assert ContextEntry(True, t=TranslationType.PASS_THROUGH, aw=1, did=0x1234).encode() == (0x9, 0x12_3401)
    # device-TLB type (T=1 -> 0x4) with FPD (bit 1 -> 0x2): lo 0x1000 | 0x4 | 0x2 | 0x1 = 0x1007
    assert ContextEntry(True, fpd=True, t=TranslationType.DEVICE_TLB, slptptr=0x1000, aw=3).encode() == (0x1007, 3)
    d = ContextEntry.decode(0x8_9ABC_D001, 0x2A02)
    assert (d.present, d.t, d.slptptr, d.aw, d.did) == (True, 0, 0x8_9ABC_D000, 2, 0x2A)


def test_context_reserved_bits() -> None:
    assert context_reserved(0x8_9ABC_D001, 0x2A02, 46) == 0
    assert context_reserved(0x8_9ABC_D011, 0x2A02, 46) == 0x10  # bit 4 of lo
    assert context_reserved(0x8_9ABC_D001, 0x2A82, 46) == 0x80 << 64  # hi bit 7
    assert context_reserved(0x8_9ABC_D001, 0x100_2A02, 46) == 0x100_0000 << 64  # hi bit 24
    assert context_reserved(0x8_9ABC_D001, 0x2A7A, 46) == 0  # hi bits 6:3 are ignored
    # a pointer above the HAW is reserved, except in a pass-through entry where it is not used
    assert context_reserved((1 << 40) | 1, 2, 39) == 1 << 40
    assert context_reserved((1 << 40) | 0x9, 2, 39) == 0


def test_context_cache_descriptor_golden() -> None:
    # device-selective (G=3 -> 0x30), DID 5 (<< 16 = 0x5_0000), SID 03:00.0 = 0x300 (<< 32), FM 0, type 1:
    # 0x1 | 0x30 | 0x5_0000 | 0x300_0000_0000 = 0x0000_0300_0005_0031
    assert ContextInvDesc(3, did=5, sid=0x300).encode() == (0x0000_0300_0005_0031, 0)
    assert ContextInvDesc(1).encode() == (0x11, 0)  # global: type 1 | G=1 << 4
    # domain-selective DID 0x2A: 0x1 | 0x20 | 0x2A << 16 = 0x2A_0021; FM 3 at bits 49:48 adds 0x3_0000_0000_0000
    assert ContextInvDesc(2, did=0x2A).encode() == (0x2A_0021, 0)
    assert ContextInvDesc(3, did=1, sid=0x10, fm=3).encode()[0] == 0x3_0010_0001_0031
    d = decode_descriptor(0x0000_0300_0005_0031, 0)
    assert d == ContextInvDesc(3, 5, 0x300, 0, 0)
    assert ContextInvDesc.decode(0x0000_0300_0005_0071, 0).rsvd == 0x40  # bit 6 is reserved


def test_iotlb_descriptor_golden() -> None:
    # PSI (G=3 -> 0x30), DW (bit 6 -> 0x40), DR (bit 7 -> 0x80), DID 7 (<< 16 -> 0x7_0000), type 2:
    # lo = 0x2 | 0x30 | 0x40 | 0x80 | 0x7_0000 = 0x7_00F2; hi = address 0x1234_5000 | AM 0 | IH 0
    assert IotlbInvDesc(3, did=7, addr=0x1234_5000, dw=True, dr=True).encode() == (0x7_00F2, 0x1234_5000)
    # AM 9 (2 MiB worth of pages) with IH (bit 6 -> 0x40) at 0x4000_0000: hi = 0x4000_0000 | 0x40 | 0x9
    assert IotlbInvDesc(3, did=7, addr=0x4000_0000, am=9, ih=True).encode()[1] == 0x4000_0049
    # DSI DID 0x2A: 0x2 | 2 << 4 | 0x2A << 16 = 0x2A_0022; global: 0x2 | 1 << 4 = 0x12
    assert IotlbInvDesc(2, did=0x2A).encode() == (0x2A_0022, 0)
    assert IotlbInvDesc(1).encode() == (0x12, 0)
    d = decode_descriptor(0x7_00F2, 0x4000_0049)
    assert isinstance(d, IotlbInvDesc)
    assert (d.granularity, d.did, d.addr, d.am, d.ih, d.dw, d.dr, d.rsvd) == (3, 7, 0x4000_0000, 9, True, 1, 1, 0)
    assert IotlbInvDesc.decode(0x7_01F2, 0).rsvd == 0x100  # lo bit 8 reserved
    assert IotlbInvDesc.decode(0x7_00F2, 0x80).rsvd == 0x80 << 64  # hi bit 7 reserved


def test_device_iotlb_descriptor_golden() -> None:
    # type 3 | SID 0x300 << 32 = 0x0000_0300_0000_0003; one page: hi = address, S = 0
    assert DevIotlbInvDesc(0x300, 0x1234_5000).encode() == (0x0000_0300_0000_0003, 0x1234_5000)
    # eight pages at 0x1234_0000 (order 3): S=1, bit 12+3-1 = 14 clear, bits 13:12 set -> 0x1234_3000 | 1
    desc = DevIotlbInvDesc(0x300, 0x1234_3000, size=True)
    assert desc.encode()[1] == 0x1234_3001
    # the first clear bit from 12 up is bit 14, so the span is 2**(14+1) = 32 KiB from 0x1234_0000
    assert desc.span() == (0x1234_0000, 0x8000)
    assert DevIotlbInvDesc(0x300, 0x1234_5000).span() == (0x1234_5000, 0x1000)
    # MIP 0x1F at bits 20:16 -> 0x1F_0000
    assert DevIotlbInvDesc(0x300, 0, mip=0x1F).encode()[0] == 0x0000_0300_001F_0003


def test_iec_and_wait_descriptor_golden() -> None:
    assert IecInvDesc().encode() == (0x4, 0)  # global interrupt-entry cache invalidation: G = 0
    # index-selective (G bit 4 -> 0x10), IM 2 at bits 31:27 -> 0x1000_0000, IIDX 0x10 at 47:32 -> 0x10_0000_0000:
    # 0x4 | 0x10 | 0x1000_0000 | 0x10_0000_0000 = 0x10_1000_0014
    assert IecInvDesc(global_=False, im=2, iidx=0x10).encode() == (0x10_1000_0014, 0)
    # wait: type 5 | SW (bit 5 -> 0x20) | FN (bit 6 -> 0x40) | status data 1 << 32 = 0x1_0000_0065
    # hi: the status address 0x7FFF_F000 (bits 63:2)
    assert WaitDesc(0x7FFF_F000, 1, sw=True, if_=False, fn=True).encode() == (0x1_0000_0065, 0x7FFF_F000)
    # IF (bit 4) alone: 0x5 | 0x10 = 0x15
    assert WaitDesc(0, 0, sw=False, if_=True, fn=False).encode() == (0x15, 0)
    w = decode_descriptor(0x1_0000_0065, 0x7FFF_F004)
    assert w == WaitDesc(0x7FFF_F004, 1, True, False, True, 0)
    assert decode_descriptor(0x6, 0) is None  # PASID-IOTLB type: not a legacy-mode descriptor


def test_fault_record_golden() -> None:
    # read fault, reason 6, SID 0x300, page 0x10000:
    # lo = 0x10000; hi = SID 0x300 | reason 6 << 32 | T (read) 1 << 62 | F 1 << 63 = 0xC000_0006_0000_0300
    rec = FaultRecord(True, 0x300, 6, True, 0x10000)
    assert rec.encode() == (0x10000, 0xC000_0006_0000_0300)
    assert FaultRecord.decode(0x10000, 0xC000_0006_0000_0300) == rec
    # a write fault (T = 0), reason 5: hi = 0x8000_0005_0000_0300
    assert FaultRecord(True, 0x300, 5, False, 0x10000).encode()[1] == 0x8000_0005_0000_0300
    assert rec.reason_text == "read not permitted by the page tables"


def test_cap_golden() -> None:
    # ND 2 -> 0x2; SAGAW 0b00110 << 8 -> 0x600; MGAW-1 = 47 = 0x2F << 16 -> 0x2F_0000;
    # FRO 0x200/16 = 0x20 << 24 -> 0x2000_0000; SLLPS 0b11 << 34 -> 0xC_0000_0000; PSI 1 << 39 -> 0x80_0000_0000;
    # NFR-1 = 7 << 40 -> 0x700_0000_0000; MAMV 9 << 48 -> 0x9_0000_0000_0000; DWD/DRD bits 54/55 -> 0xC0_..._0000
    # total: 0x00C9_078C_202F_0602
    cap = Cap(nd=2, sagaw=0b00110, mgaw=48, fro=0x200, sllps=0b11, psi=True, nfr=8, mamv=9, dwd=True, drd=True)
    assert cap.encode() == 0x00C9_078C_202F_0602
    assert Cap.decode(0x00C9_078C_202F_0602) == cap
    assert cap.domains == 256
    assert cap.superpage_levels == frozenset({2, 3})
    # CM is bit 7 and RWBF bit 4
    assert Cap(cm=True, rwbf=True, fro=0x200).encode() & 0x90 == 0x90


def test_ecap_golden() -> None:
    # C (0x1) | QI (0x2) | DT (0x4) | PT (0x40) | SC (0x80) | IRO 0x100/16 = 0x10 << 8 (0x1000) = 0x10C7
    ecap = Ecap(c=True, qi=True, dt=True, ir=False, eim=False, pt=True, sc=True, iro=0x100)
    assert ecap.encode() == 0x10C7
    assert Ecap.decode(0x10C7) == ecap


def test_width_conversions() -> None:
    # agaw = (width - 30) / 9, levels = agaw + 2
    assert [width_to_agaw(w) for w in (30, 39, 48, 57)] == [0, 1, 2, 3]
    assert width_to_agaw(46) == 2  # rounds up to a whole level
    assert [agaw_to_levels(a) for a in (1, 2, 3)] == [3, 4, 5]
    assert agaw_to_width(2) == 48
