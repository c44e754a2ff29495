"""Golden values for the SMMUv2 register encodings, and the values Xen's driver programs, read back by MMIO.

Field positions (SMMU architecture v2, as Xen's and Linux's arm-smmu drivers define them):
sCR0: CLIENTPD 0, GFRE 1, GFIE 2, GCFGFRE 4, GCFGFIE 5, USFCFG 10, VMIDPNE 11, PTM 12, FB 13, BSU 15:14,
SMCFCFG 21.  IDR0: NUMSMRG 7:0, NUMSIDB 12:9, CTTW 14, NUMIRPT 23:16, PTFS 25:24, SMS 27, S2TS 29.
IDR1: NUMCB 7:0, NUMS2CB 23:16, NUMPAGENDXB 30:28.  IDR2: IAS 3:0, OAS 7:4, UBS 11:8, PTFS_4K 12.
SMR: ID 14:0, MASK 30:16, VALID 31.  S2CR: CBNDX 7:0, TYPE 17:16.  CBAR: VMID 7:0, TYPE 17:16.
TCR (AArch64 stage 2): T0SZ 5:0, SL0 7:6, IRGN0 9:8, ORGN0 11:10, SH0 13:12, TG0 15:14, PS 18:16.
SCTLR: M 0, TRE 1, AFE 2, CFRE 5, CFIE 6, CFCFG 7.
"""

from __future__ import annotations

import pytest
from smmu_helpers import DEV_A, guest_with, make_platform, unit_of

from iommusim.hw.smmu import regs
from iommusim.hw.smmu.unit import SmmuConfig, SmmuV2
from iommusim.machine import Machine


def _cb(unit: SmmuV2, n: int, off: int, size: int = 4) -> int:
    return unit.mmio.read(unit.mmio.size // 2 + n * regs.CB_SIZE + off, size)


def test_codecs_golden() -> None:
    # SMR for stream 0x300, exact match: VALID 1 << 31 | ID 0x300 -> 0x8000_0300
    assert regs.Smr(0x300).encode() == 0x8000_0300
    # mask 0x00F0 ignores bits 7:4: 0x0F0 << 16 = 0x00F0_0000
    smr = regs.Smr.decode(0x80F0_0300)
    assert (smr.id, smr.mask, smr.valid) == (0x300, 0xF0, True)
    assert smr.matches(0x3A0)
    assert not smr.matches(0x301)
    assert not regs.Smr.decode(0x7FFF_FFFF).matches(0x300)  # ~VALID: matches nothing
    # S2CR: translate to bank 3 -> 0x3; bypass -> 1 << 16; fault -> 2 << 16
    assert regs.S2cr(regs.S2crType.TRANSLATE, 3).encode() == 0x3
    assert regs.S2cr(regs.S2crType.BYPASS).encode() == 0x1_0000
    assert regs.S2cr(regs.S2crType.FAULT).encode() == 0x2_0000
    # CBAR stage 2 (type 0), VMID 5 -> 0x5; a stage-1 type 1 << 16 decodes as such
    assert regs.Cbar(regs.CbarType.S2_TRANS, vmid=5).encode() == 0x5
    assert regs.Cbar.decode(0x1_0007).type == regs.CbarType.S1_TRANS_S2_BYPASS
    # address size encodings 0..5 = 32, 36, 40, 42, 44, 48 bits
    assert [regs.id_bits_to_size(i) for i in range(7)] == [32, 36, 40, 42, 44, 48, 48]
    assert regs.size_to_id_bits(46) == 4
    with pytest.raises(ValueError, match="no SMMU"):
        regs.size_to_id_bits(31)


def test_identification_registers_golden() -> None:
    unit = SmmuV2(Machine(ram_bytes=64 << 20).memory, SmmuConfig(oas_bits=40))
    # IDR0: NUMSMRG 16 = 0x10 | NUMSIDB 15 << 9 = 0x1E00 | CTTW 0x4000 | NUMIRPT 8 << 16 = 0x8_0000
    #       | PTFS 2 << 24 = 0x200_0000 | SMS 1 << 27 = 0x800_0000 | S2TS 1 << 29 = 0x2000_0000 = 0x2A08_5E10
    assert unit.mmio.read(regs.GR0_IDR0) == 0x2A08_5E10
    # IDR1: 8 banks need 8 pages per half: 2 ** (NUMPAGENDXB + 1) = 8 -> NUMPAGENDXB 2 << 28 = 0x2000_0000
    #       | NUMS2CB 8 << 16 | NUMCB 8 = 0x2008_0008; the window is 2 halves x 8 pages x 4 KiB = 0x10000
    assert unit.mmio.read(regs.GR0_IDR1) == 0x2008_0008
    assert unit.mmio.size == 0x1_0000
    # IDR2: IAS 48 -> 5, OAS 40 -> 2 << 4 = 0x20, UBS 48 -> 5 << 8 = 0x500, PTFS_4K 0x1000 -> 0x1525
    assert unit.mmio.read(regs.GR0_IDR2) == 0x1525
    # reset: CLIENTPD (bit 0) and SMCFCFG (bit 21) -> 0x0020_0001; every S2CR faults (0x2_0000)
    assert unit.mmio.read(regs.GR0_SCR0) == 0x0020_0001
    assert unit.mmio.read(regs.gr0_s2cr(5)) == 0x2_0000
    assert regs.Idr0.decode(0x2A08_5E10) == unit.idr0()
    assert regs.Idr1.decode(0x2008_0008) == unit.idr1()
    assert regs.Idr2.decode(0x1525) == unit.idr2()


def test_scr0_after_xen_reset() -> None:
    p = make_platform()
    # from 0x0020_0001: set GFRE 0x2 | GFIE 0x4 | GCFGFRE 0x10 | GCFGFIE 0x20 | VMIDPNE 0x800 | PTM 0x1000
    # and USFCFG 0x400, clear CLIENTPD: 0x0020_0000 + 0x36 + 0x1C00 = 0x0020_1C36
    assert unit_of(p).mmio.read(regs.GR0_SCR0) == 0x0020_1C36
    # with the bypass option USFCFG stays clear: 0x0020_1836
    assert unit_of(make_platform(usfcfg_bypass=True)).mmio.read(regs.GR0_SCR0) == 0x0020_1836


def test_context_bank_programmed_as_xen_does() -> None:
    p = make_platform()
    g = guest_with(p, DEV_A)
    unit = unit_of(p)
    # the hardware domain has no device behind the SMMU, so the guest gets bank 0 and VMID 0 + 1
    # SMR0 = VALID | stream 0x300; S2CR0 = translate to bank 0 = 0x0
    assert unit.mmio.read(regs.gr0_smr(0)) == 0x8000_0300
    assert unit.mmio.read(regs.gr0_s2cr(0)) == 0x0
    # CBAR0: stage 2 (type 0) | VMID 1; CBA2R0: VA64
    assert unit.mmio.read(regs.PAGE_SIZE + regs.gr1_cbar(0)) == 0x1
    assert unit.mmio.read(regs.PAGE_SIZE + regs.gr1_cba2r(0)) == 0x1
    # TTBR0 = the guest p2m's root (its 2 concatenated level-1 tables)
    assert g.p2m is not None
    assert _cb(unit, 0, regs.CB_TTBR0, 8) == g.p2m.root_maddr  # type: ignore[attr-defined]
    # TCR: T0SZ 64 - 40 = 24 = 0x18 | SL0 1 << 6 = 0x40 | IRGN0 1 << 8 | ORGN0 1 << 10 | SH0 3 << 12
    #      | TG0 4K 0 | PS 40 bits = 2 << 16 | bit 31 (EAE) = 0x8002_3558, the same value as VTCR_EL2
    assert _cb(unit, 0, regs.CB_TCR) == 0x8002_3558 == p.layout.vtcr  # type: ignore[union-attr]
    # SCTLR: CFCFG 0x80 | CFIE 0x40 | CFRE 0x20 | AFE 0x4 | TRE 0x2 | M 0x1 = 0xE7
    assert _cb(unit, 0, regs.CB_SCTLR) == 0xE7


def test_detach_writes_fault_and_invalid_smr() -> None:
    p = make_platform()
    g = guest_with(p, DEV_A)
    unit = unit_of(p)
    p.ops.reassign_device(g, None, p.device(DEV_A).sbdf.devfn, p.device(DEV_A))
    # S2CR0 back to fault (2 << 16); SMR0 written with ~VALID = 0x7FFF_FFFF reads back 0x7FFF_7FFF because
    # bit 15 lies between the 15-bit ID and MASK fields and is not implemented; the bank is disabled
    assert unit.mmio.read(regs.gr0_s2cr(0)) == 0x2_0000
    assert unit.mmio.read(regs.gr0_smr(0)) == 0x7FFF_7FFF
    assert _cb(unit, 0, regs.CB_SCTLR) == 0


def test_sl0_follows_the_p2m_root_level_and_the_quirk_brings_back_level_1() -> None:
    # PARange 48: T0SZ 16 = 0x10, root at level 0 -> SL0 2 = 0x80, PS 48 = 5 << 16 -> 0x8005_3590
    p = make_platform(ipa_bits=48)
    guest_with(p, DEV_A)
    assert _cb(unit_of(p), 0, regs.CB_TCR) == 0x8005_3590
    # the seed hard-codes SL0 = 1: 0x8005_3550
    q = make_platform(ipa_bits=48, quirks=("smmu-sl0-level1",))
    guest_with(q, DEV_A)
    assert _cb(unit_of(q), 0, regs.CB_TCR) == 0x8005_3550


def test_mmio_refuses_unimplemented_pages() -> None:
    unit = SmmuV2(Machine(ram_bytes=64 << 20).memory, SmmuConfig(context_banks=2))
    # 2 banks: 2 pages per half, window 0x4000; page 2 (0x2000) is the first context bank
    assert unit.mmio.size == 0x4000
    unit.mmio.write(0x2000 + regs.CB_CONTEXTIDR, 0x1234)
    assert unit.mmio.read(0x2000 + regs.CB_CONTEXTIDR) == 0x1234
    from iommusim.errors import BadAddress

    with pytest.raises(BadAddress):
        unit.mmio.read(0x4000)


def test_hardware_model_sees_only_memory_and_registers() -> None:
    """Rule 1: the SMMU model imports nothing of the driver, the generic layer or the platform."""
    import ast
    from pathlib import Path

    import iommusim.hw.smmu as hw

    forbidden = ("iommusim.drivers", "iommusim.iommu", "iommusim.platform", "iommusim.arm")
    for path in Path(hw.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(forbidden), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith(forbidden), f"{path.name} imports {alias.name}"
