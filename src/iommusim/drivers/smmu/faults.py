"""The SMMU's fault interrupt handlers (Xen's arm_smmu_context_fault and arm_smmu_global_fault).

A context fault: read FSR (nothing to do unless a fault bit is set), warn about the kinds Xen does not
expect, read FSYNR0 and FAR, log the unhandled fault with the faulting address, the syndrome and the bank
(Xen has no fault handler to report to, so every context fault is unhandled), clear FSR by writing back
what was read, and terminate a stalled transaction through RESUME.

A global fault: read sGFSR and the three syndrome registers, log them, clear sGFSR.

Both then count the fault against the device that caused it (``check_disable_device``), which the model
finds from the stream id the hardware recorded (CBFRSYNRA for a context fault, sGFSYNR1 for a global one);
Xen's SMMU handlers at the seed do not do this.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iommusim.hw.smmu import regs
from iommusim.iommu.devices import check_disable_device

if TYPE_CHECKING:
    from iommusim.drivers.smmu.device import ArmSmmu
    from iommusim.drivers.smmu.state import SmmuContext

__all__ = ["context_fault", "global_fault"]

#: Fault kinds Xen's handler calls unexpected (access flag, address size, TLB match conflict and lockdown).
FSR_IGN = regs.Fsr.AFF | regs.Fsr.ASF | regs.Fsr.TLBMCF | regs.Fsr.TLBLKF
#: Every FSR bit that means "there is a fault to handle".
FSR_FAULT = regs.Fsr.MULTI | regs.Fsr.SS | regs.Fsr.UUT | regs.Fsr.EF | regs.Fsr.PF | regs.Fsr.TF | FSR_IGN


def context_fault(smmu: ArmSmmu, ctx: SmmuContext) -> bool:
    """Handle a context bank's fault interrupt; False if the bank had nothing recorded (IRQ_NONE)."""
    n = ctx.cbndx
    fsr = smmu.cb_read(n, regs.CB_FSR)
    if not fsr & FSR_FAULT:
        return False
    if fsr & FSR_IGN:
        smmu.err_ratelimited(f"context fault of a kind not expected here (FSR {fsr:#x})")
    fsynr = smmu.cb_read(n, regs.CB_FSYNR0)
    iova = smmu.cb_read(n, regs.CB_FAR) | (smmu.cb_read(n, regs.CB_FAR + 4) << 32)
    access = "write" if fsynr & regs.Fsynr0.WNR else "read"
    smmu.err_ratelimited(f"context fault not handled: iova={iova:#010x} ({access}), fsynr={fsynr:#x}, cb={n}")
    smmu.cb_write(n, regs.CB_FSR, fsr)
    if fsr & regs.Fsr.SS:
        smmu.cb_write(n, regs.CB_RESUME, regs.RESUME_TERMINATE)
    sid = smmu.gr1_read(regs.gr1_cbfrsynra(n)) & regs.CBFRSYNRA_SID_MASK
    _count_fault(smmu, sid)
    return True


def global_fault(smmu: ArmSmmu) -> bool:
    """Handle the global fault interrupt; False if sGFSR was clear (IRQ_NONE)."""
    gfsr = smmu.gr0_read(regs.GR0_SGFSR)
    gfsynr0 = smmu.gr0_read(regs.GR0_SGFSYNR0)
    gfsynr1 = smmu.gr0_read(regs.GR0_SGFSYNR1)
    gfsynr2 = smmu.gr0_read(regs.GR0_SGFSYNR2)
    if not gfsr:
        return False
    smmu.err_ratelimited("global fault: this may be serious")
    smmu.err_ratelimited(
        f"\tsGFSR {gfsr:#010x}, sGFSYNR0 {gfsynr0:#010x}, sGFSYNR1 {gfsynr1:#010x}, sGFSYNR2 {gfsynr2:#010x}"
    )
    smmu.gr0_write(regs.GR0_SGFSR, gfsr)
    _count_fault(smmu, gfsynr1 & 0xFFFF)
    return True


def _count_fault(smmu: ArmSmmu, sid: int) -> None:
    dev = smmu.device_of_sid.get(sid)
    if dev is not None:
        check_disable_device(smmu.iommu, dev)
