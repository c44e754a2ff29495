"""Each fault the SMMU can raise, provoked by DMA and found in the right register with the right encoding.

Context faults (bank n): FSR TF 1, AFF 2, PF 3, EF 4, ASF 7, FORMAT 10:9 (2 = AArch64), SS 30, MULTI 31;
FAR = the faulting IPA; FSYNR0 PLVL 1:0 (ARM lookup level), WNR 4, PTWF 10; GR1 CBFRSYNRA[n] = stream id.
Global faults: sGFSR ICF 0, USF 1, SMCF 2, UCBF 3, MULTI 31; sGFAR = the address; sGFSYNR0 WNR 1;
sGFSYNR1 = stream id.  Xen's driver enables stall mode (SCTLR.CFCFG), so FSR.SS is set with every context
fault and its handler terminates the stalled transaction.
"""

from __future__ import annotations

import pytest
from smmu_helpers import DEV_A, DEV_B, guest_with, make_platform, mfn_of, page_addr, tap_irqs, unit_of

from iommusim.arm.p2m import FORMAT
from iommusim.drivers.smmu import ArmSmmu
from iommusim.errors import DmaFault
from iommusim.frames import Daddr, Gfn, Mfn
from iommusim.hw.smmu import SmmuFaultRecord, context_irq, regs
from iommusim.iommu import FAULT_THRESHOLD
from iommusim.machine import PciDevice, Sbdf
from iommusim.machine.p2m import P2mType

SS_FORMAT = (1 << 30) | (2 << 9)  # every context fault here: stalled, AArch64 format


def _record(exc: pytest.ExceptionInfo[DmaFault]) -> SmmuFaultRecord:
    rec = exc.value.record
    assert isinstance(rec, SmmuFaultRecord)
    return rec


def _cb(p: object, off: int, bank: int = 0) -> int:
    unit = unit_of(p)  # type: ignore[arg-type]
    return unit.mmio.read(unit.mmio.size // 2 + bank * regs.CB_SIZE + off)


def test_translation_fault_recorded_logged_cleared_and_counted() -> None:
    p = make_platform()
    guest_with(p, DEV_A, memory=8 << 20)
    dev = p.device(DEV_A)
    with tap_irqs(unit_of(p)) as tap, pytest.raises(DmaFault) as exc:
        p.machine.dma.write(dev, page_addr(0x3000) + 0x18, b"x")  # gfn 0x3000: beyond the guest's 8 MiB
    snap = tap.seen[-1]
    # FSR: TF 0x2 | FORMAT 2 << 9 = 0x400 | SS 0x4000_0000 = 0x4000_0402
    assert snap.fsr == 0x4000_0402
    assert snap.far == 0x300_0018
    # gfn 0x3000 lies in the first GiB, whose level-2 table exists; its level-3 table does not, so the
    # level-2 entry is the invalid one: PLVL 2 | WNR 0x10 = 0x12
    assert snap.fsynr0 == 0x12
    assert snap.cbfrsynra == 0x300
    rec = _record(exc)
    assert (rec.kind, rec.context_bank, rec.level, rec.write) == ("translation", 0, 2, True)
    # the handler cleared FSR (write-one-to-clear) after logging Xen's fields
    assert _cb(p, regs.CB_FSR) == 0
    assert p.machine.console.grep("context fault not handled: iova=0x03000018 (write), fsynr=0x12, cb=0")
    assert dev.fault_count == 1


def test_translation_fault_levels_and_input_range() -> None:
    p = make_platform()
    guest_with(p, DEV_A, memory=8 << 20)
    dev = p.device(DEV_A)
    unit = unit_of(p)
    with tap_irqs(unit) as tap:
        # a page missing inside an existing level-3 table: PLVL 3
        p.guest_unmap(p.machine.domains[1], Gfn(5))
        with pytest.raises(DmaFault):
            p.machine.dma.read(dev, page_addr(5), 1)
        assert tap.seen[-1].fsynr0 == 0x3
        # IPA 1 GiB: the level-1 entry of the concatenated root is empty: PLVL 1
        with pytest.raises(DmaFault):
            p.machine.dma.read(dev, Daddr(1 << 30), 1)
        assert tap.seen[-1].fsynr0 == 0x1
        # beyond the 40-bit input size: a translation fault reported at level 0
        with pytest.raises(DmaFault) as exc:
            p.machine.dma.read(dev, Daddr(1 << 40), 1)
        assert tap.seen[-1].fsynr0 == 0x0
        assert tap.seen[-1].far == 1 << 40
        assert "input size" in _record(exc).why


def test_permission_fault() -> None:
    p = make_platform()
    g = guest_with(p, DEV_A, memory=8 << 20)
    dev = p.device(DEV_A)
    p.guest_map(g, Gfn(7), Mfn(mfn_of(g, 7)), type=P2mType.RAM_RO)
    assert p.machine.dma.read(dev, page_addr(7), 1) is not None
    with tap_irqs(unit_of(p)) as tap, pytest.raises(DmaFault) as exc:
        p.machine.dma.write(dev, page_addr(7), b"w")
    # FSR: PF 0x8 | 0x4000_0400 = 0x4000_0408; FSYNR0: PLVL 3 | WNR 0x10 = 0x13
    assert (tap.seen[-1].fsr, tap.seen[-1].fsynr0) == (0x4000_0408, 0x13)
    assert _record(exc).kind == "permission"
    # the refused write was served from the TLB's cached read-only translation: no second walk
    assert unit_of(p).counters()["iotlb_hits"] >= 1


def test_access_flag_fault() -> None:
    p = make_platform()
    g = guest_with(p, DEV_A, memory=8 << 20)
    dev = p.device(DEV_A)
    assert g.p2m is not None
    # clear AF (bit 10) in the page descriptor of gfn 9 behind Xen's back (Xen always sets it)
    table = g.p2m.table.table_for(9, 1)  # type: ignore[attr-defined]
    assert table is not None
    raw = p.machine.memory.load_word(table.value, 9)
    p.machine.memory.store_word(table.value, 9, raw & ~(1 << 10))
    with tap_irqs(unit_of(p)) as tap, pytest.raises(DmaFault) as exc:
        p.machine.dma.read(dev, page_addr(9), 1)
    # FSR: AFF 0x4 | 0x4000_0400 = 0x4000_0404; level 3 read: FSYNR0 0x3
    assert (tap.seen[-1].fsr, tap.seen[-1].fsynr0) == (0x4000_0404, 0x3)
    assert _record(exc).kind == "access-flag"
    # Xen's handler flags this kind as unexpected before reporting it
    assert p.machine.console.grep("not expected here (FSR 0x40000404)")


def test_address_size_fault() -> None:
    p = make_platform()  # output size 40 bits
    g = guest_with(p, DEV_A, memory=8 << 20)
    dev = p.device(DEV_A)
    # a guest frame mapped at machine frame 2**28, i.e. address 2**40: beyond the 40-bit output size
    p.guest_map(g, Gfn(11), Mfn(1 << 28))
    with tap_irqs(unit_of(p)) as tap, pytest.raises(DmaFault) as exc:
        p.machine.dma.read(dev, page_addr(11), 1)
    # FSR: ASF 0x80 | 0x4000_0400 = 0x4000_0480; at the page (level 3)
    assert (tap.seen[-1].fsr, tap.seen[-1].fsynr0) == (0x4000_0480, 0x3)
    assert _record(exc).kind == "address-size"


def test_external_fault_on_a_descriptor_fetch() -> None:
    p = make_platform(oas_bits=48)  # the SMMU may address 48 bits; the machine has 46
    g = guest_with(p, DEV_A, memory=8 << 20)
    dev = p.device(DEV_A)
    assert g.p2m is not None
    # point the first GiB's level-2 table pointer at 2**47, inside the output size, outside memory
    root = g.p2m.root.value  # type: ignore[attr-defined]
    p.machine.memory.store_word(root, 0, FORMAT.table_entry(1 << 47, 3))
    p.iommu.iotlb_flush_all(g)
    with tap_irqs(unit_of(p)) as tap, pytest.raises(DmaFault) as exc:
        p.machine.dma.read(dev, page_addr(1), 1)
    # FSR: EF 0x10 | 0x4000_0400; FSYNR0: PLVL 2 | PTWF 1 << 10 = 0x402
    assert (tap.seen[-1].fsr, tap.seen[-1].fsynr0) == (0x4000_0410, 0x402)
    assert _record(exc).kind == "external"


def test_multi_when_a_fault_is_already_recorded() -> None:
    p = make_platform()
    guest_with(p, DEV_A, memory=8 << 20)
    unit, dev = unit_of(p), p.device(DEV_A)
    unit.connect_irq(context_irq(0), None)  # nobody clears FSR
    with pytest.raises(DmaFault):
        p.machine.dma.read(dev, Daddr(0x7000_0000), 1)
    with pytest.raises(DmaFault) as exc:
        p.machine.dma.write(dev, Daddr(0x7100_0000), b"1")
    # the first fault's record stays (FAR, FSYNR0); the second only adds MULTI (bit 31)
    assert _cb(p, regs.CB_FSR) == 0xC000_0402
    assert _cb(p, regs.CB_FAR) == 0x7000_0000
    assert _cb(p, regs.CB_FSYNR0) == 0x1
    assert _record(exc).multi
    # unanswered, the transaction stays stalled
    assert _record(exc).stalled


def test_stalled_transaction_retried_after_the_fault_is_fixed() -> None:
    p = make_platform()
    g = guest_with(p, DEV_A, memory=8 << 20)
    unit, dev, m = unit_of(p), p.device(DEV_A), p.machine
    target = mfn_of(g, 1)
    m.memory.write_bytes(target << 12, b"fixed")
    base = unit.mmio.size // 2

    def handler() -> None:
        # a fault handler that maps the page and asks for a retry instead of terminating
        p.guest_map(g, Gfn(0x1800), Mfn(target))
        unit.mmio.write(base + regs.CB_FSR, unit.mmio.read(base + regs.CB_FSR))
        unit.mmio.write(base + regs.CB_RESUME, 0)

    unit.connect_irq(context_irq(0), handler)
    assert m.dma.read(dev, page_addr(0x1800), 5) == b"fixed"
    assert unit.counters()["stalls_retried"] == 1


def test_unidentified_stream_fault_and_the_bypass_option() -> None:
    p = make_platform()
    p.create_hardware_domain(32 << 20)
    dev = p.device(DEV_B)  # a passthrough device, not assigned: no SMR matches stream 0x400
    with tap_irqs(unit_of(p), banks=range(0)) as tap, pytest.raises(DmaFault) as exc:
        p.machine.dma.write(dev, Daddr(0x1234_5000), b"?")
    snap = tap.seen[-1]
    # sGFSR USF 0x2; sGFAR the address; sGFSYNR0 WNR (bit 1) = 0x2; sGFSYNR1 the stream id 0x400
    assert (snap.gfsr, snap.gfar, snap.gfsynr0, snap.gfsynr1) == (0x2, 0x1234_5000, 0x2, 0x400)
    assert _record(exc).kind == "unidentified-stream"
    assert unit_of(p).mmio.read(regs.GR0_SGFSR) == 0  # cleared by the handler
    assert p.machine.console.grep("sGFSR 0x00000002, sGFSYNR0 0x00000002, sGFSYNR1 0x00000400")
    # with USFCFG clear the stream bypasses: the device reaches machine address 0x1234_5000 itself
    q = make_platform(usfcfg_bypass=True)
    q.create_hardware_domain(32 << 20)
    q.machine.dma.write(q.device(DEV_B), Daddr(0x1234_5000), b"!")
    assert q.machine.memory.read_bytes(0x1234_5000, 1) == b"!"


def test_stream_match_conflict_fault() -> None:
    # two devices the device tree gives the same stream id 0x77: both attached -> two SMRs match
    a = PciDevice(Sbdf.parse(DEV_A), stream_ids=(0x77,))
    b = PciDevice(Sbdf.parse(DEV_B), stream_ids=(0x77,))
    p = make_platform(a, b, dom0_devices=[DEV_B])
    d0 = p.create_hardware_domain(32 << 20)
    g = p.create_guest(1, 8 << 20)
    p.iommu.assign_device(g, a)
    with tap_irqs(unit_of(p), banks=range(0)) as tap, pytest.raises(DmaFault) as exc:
        p.machine.dma.read(a, page_addr(1), 1)
    # sGFSR SMCF 0x4, read: sGFSYNR0 0, stream 0x77
    assert (tap.seen[-1].gfsr, tap.seen[-1].gfsynr0, tap.seen[-1].gfsynr1) == (0x4, 0x0, 0x77)
    assert _record(exc).kind == "stream-match-conflict"
    # with SMCFCFG clear the architecture leaves it UNPREDICTABLE; the model takes the lowest group, SMR0,
    # which dom0's device took first: the guest's device now reaches dom0's memory
    unit = unit_of(p)
    unit.mmio.write(regs.GR0_SCR0, unit.mmio.read(regs.GR0_SCR0) & ~regs.Scr0.SMCFCFG)
    frame = d0.extents[0].mfn.value
    p.machine.memory.write_bytes(frame << 12, b"d0")
    assert p.machine.dma.read(a, Daddr(frame << 12), 2) == b"d0"
    assert unit.counters()["smr_conflict_unpredictable"] == 1


def test_invalid_context_and_unimplemented_bank_faults() -> None:
    p = make_platform()
    p.create_hardware_domain(32 << 20)
    unit, dev = unit_of(p), p.device(DEV_B)
    # a driver that validates an SMR but leaves its S2CR at fault: invalid context fault
    unit.mmio.write(regs.gr0_smr(3), regs.Smr(0x400).encode())
    with tap_irqs(unit, banks=range(0)) as tap, pytest.raises(DmaFault) as exc:
        p.machine.dma.read(dev, Daddr(0x1000), 1)
    assert tap.seen[-1].gfsr == 0x1  # ICF
    assert _record(exc).kind == "invalid-context"
    # an S2CR that translates through bank 200 of an 8-bank SMMU: unimplemented context bank fault
    unit.mmio.write(regs.gr0_s2cr(3), regs.S2cr(regs.S2crType.TRANSLATE, 200).encode())
    with tap_irqs(unit, banks=range(0)) as tap, pytest.raises(DmaFault) as exc:
        p.machine.dma.read(dev, Daddr(0x1000), 1)
    assert tap.seen[-1].gfsr == 0x8  # UCBF
    assert _record(exc).kind == "unimplemented-context-bank"
    # an S2CR set to bypass lets the stream through untranslated
    unit.mmio.write(regs.gr0_s2cr(3), regs.S2cr(regs.S2crType.BYPASS).encode())
    p.machine.dma.write(dev, Daddr(0x1000), b"b")
    assert p.machine.memory.read_bytes(0x1000, 1) == b"b"


def test_global_multi() -> None:
    p = make_platform()
    p.create_hardware_domain(32 << 20)
    unit = unit_of(p)
    unit.connect_irq(0, None)
    for addr in (0x1000, 0x2000):
        with pytest.raises(DmaFault):
            p.machine.dma.read(p.device(DEV_B), Daddr(addr), 1)
    # USF 0x2 | MULTI 0x8000_0000; sGFAR keeps the first address
    assert unit.mmio.read(regs.GR0_SGFSR) == 0x8000_0002
    assert unit.mmio.read(regs.GR0_SGFAR) == 0x1000


def test_repeated_faults_switch_bus_mastering_off() -> None:
    p = make_platform()
    guest_with(p, DEV_A, memory=8 << 20)
    dev = p.device(DEV_A)
    for i in range(FAULT_THRESHOLD):
        with pytest.raises(DmaFault):
            p.machine.dma.read(dev, page_addr(0x5000 + i), 1)
    assert not dev.bus_master
    assert p.machine.console.grep("disabling bus mastering")


def test_sl0_quirk_breaks_a_level0_p2m() -> None:
    # a 48-bit IPA p2m is rooted at lookup level 0; the driver tells the SMMU so (SL0 = 2)
    p = make_platform(ipa_bits=48)
    g = guest_with(p, DEV_A, memory=8 << 20)
    p.machine.memory.write_bytes(mfn_of(g, 1) << 12, b"L0")
    assert p.machine.dma.read(p.device(DEV_A), page_addr(1), 2) == b"L0"
    # with the seed's SL0 = 1, T0SZ 16 and a level-1 start do not describe a walk: every access faults
    q = make_platform(ipa_bits=48, quirks=("smmu-sl0-level1",))
    guest_with(q, DEV_A, memory=8 << 20)
    with pytest.raises(DmaFault) as exc:
        q.machine.dma.read(q.device(DEV_A), page_addr(1), 2)
    rec = _record(exc)
    assert (rec.kind, rec.level) == ("translation", 0)
    assert "do not describe" in rec.why


def test_tlb_sync_timeout_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ArmSmmu, "TLB_LOOP_TIMEOUT", 50)
    p = make_platform(sync_polls=10**9)
    # the reset's sync already gives up after 50 polls of 1 us each
    assert p.machine.console.grep("TLB sync did not complete; the SMMU may be deadlocked")
    assert p.machine.clock.ns >= 49_000
