"""One SMMU as the driver sees it (Xen's struct arm_smmu_device): probe, reset, TLB maintenance, context banks
and stream mapping, all through the register window.

Xen forces stage-2 translation and shares the CPU's p2m: a context bank's TTBR0 is the domain's p2m root
and its TCR describes the p2m's shape (input size from the p2m's IPA size, start level from the p2m's root
level, 4 KiB granule, inner-shareable write-back walks).  The seed hard-codes the start level to lookup
level 1 (SL0 = 1), which is wrong for a p2m rooted at level 0 (IPA sizes above 43 bits); the model uses
the p2m's root level as 9ae1197582 does, and the quirk ``smmu-sl0-level1`` brings the seed value back.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from enum import IntFlag
from typing import TYPE_CHECKING

from iommusim.console import LogLevel
from iommusim.drivers.smmu.firmware import SmmuNode
from iommusim.drivers.smmu.state import MasterCfg, SmmuContext
from iommusim.errors import AlreadyExists, InvalidArgument, IommuError, NoDevice
from iommusim.hw.smmu import regs
from iommusim.machine.pci import PciDevice

if TYPE_CHECKING:
    from iommusim.arm.vtcr import P2mLayout
    from iommusim.iommu.layer import Iommu

__all__ = ["ArmSmmu", "NoSpace", "SmmuFeature"]

_PHYS_MASK_SHIFT = 48  # Xen's PADDR_BITS on arm64


class NoSpace(IommuError):
    """ENOSPC: no free context bank or stream match register."""

    errno_value = errno.ENOSPC


class SmmuFeature(IntFlag):
    COHERENT_WALK = 1 << 0
    STREAM_MATCH = 1 << 1
    TRANS_S1 = 1 << 2
    TRANS_S2 = 1 << 3
    TRANS_NESTED = 1 << 4


class ArmSmmu:
    """The driver's state for one SMMU, and every register sequence it runs on it."""

    #: Polls of sTLBGSTATUS before a sync is declared stuck (1 us apart, as Xen's TLB_LOOP_TIMEOUT).
    TLB_LOOP_TIMEOUT = 1_000_000

    def __init__(self, node: SmmuNode, iommu: Iommu, layout: P2mLayout) -> None:
        self.node = node
        self.iommu = iommu
        self.layout = layout
        self.mmio = node.mmio
        self.name = node.path
        self.version = 2
        self.features = SmmuFeature(0)
        self.pgshift = 12
        self.num_mapping_groups = 0
        self.num_context_banks = 0
        self.num_s2_context_banks = 0
        self.s1_output_size = 0
        self.s2_input_size = 0
        self.s2_output_size = 0
        self.context_map: set[int] = set()
        self.smr_map: set[int] = set()
        #: stream id -> device, from the node's "mmu-masters" (to name the device behind a fault)
        self.device_of_sid: dict[int, PciDevice] = {}

    # -- register access -----------------------------------------------------------------------------------

    @property
    def _gr1(self) -> int:
        return 1 << self.pgshift

    def _cb(self, n: int) -> int:
        return self.mmio.size // 2 + (n << self.pgshift)

    def gr0_read(self, off: int) -> int:
        return self.mmio.read(off)

    def gr0_write(self, off: int, value: int) -> None:
        self.mmio.write(off, value & 0xFFFF_FFFF)

    def gr1_write(self, off: int, value: int) -> None:
        self.mmio.write(self._gr1 + off, value & 0xFFFF_FFFF)

    def gr1_read(self, off: int) -> int:
        return self.mmio.read(self._gr1 + off)

    def cb_read(self, n: int, off: int) -> int:
        return self.mmio.read(self._cb(n) + off)

    def cb_write(self, n: int, off: int, value: int) -> None:
        self.mmio.write(self._cb(n) + off, value & 0xFFFF_FFFF)

    # -- console ---------------------------------------------------------------------------------------------

    def notice(self, text: str) -> None:
        self.iommu.console.printk(LogLevel.INFO, f"smmu: {self.name}: {text}")

    def warn(self, text: str) -> None:
        self.iommu.console.printk(LogLevel.WARNING, f"smmu: {self.name}: {text}")

    def err(self, text: str) -> None:
        self.iommu.console.printk(LogLevel.ERR, f"smmu: {self.name}: {text}")

    def err_ratelimited(self, text: str) -> None:
        self.iommu.console.printk_ratelimited(LogLevel.ERR, f"smmu: {self.name}: {text}")

    # -- probe (arm_smmu_device_cfg_probe) ---------------------------------------------------------------------

    def probe(self) -> None:
        """Read the identification registers and size the driver's tables; NoDevice if it cannot serve Xen."""
        self.notice("reading the identification registers")
        self.notice(f"SMMUv{self.version}:")
        idr0 = regs.Idr0.decode(self.gr0_read(regs.GR0_IDR0))
        # Xen forces stage 2: stage-1 and nested translation are ignored even when present
        if idr0.s2ts:
            self.features |= SmmuFeature.TRANS_S2
            self.notice("\tstage-2 translation")
        if not self.features & (SmmuFeature.TRANS_S1 | SmmuFeature.TRANS_S2):
            self.err("\tneither stage-1 nor stage-2 translation")
            raise NoDevice(f"{self.name}: no usable translation stage")
        if idr0.cttw:
            self.features |= SmmuFeature.COHERENT_WALK
            self.notice("\tcoherent table walks")
        if idr0.sms:
            self.features |= SmmuFeature.STREAM_MATCH
            self.num_mapping_groups = idr0.numsmrg
            if not self.num_mapping_groups:
                self.err("stream matching is advertised with no stream match registers")
                raise NoDevice(f"{self.name}: no SMRs")
            probe = (regs.SMR_ID_MASK << regs.SMR_MASK_SHIFT) | regs.SMR_ID_MASK
            self.gr0_write(regs.gr0_smr(0), probe)
            smr = regs.Smr.decode(self.gr0_read(regs.gr0_smr(0)))
            if smr.mask & smr.id != smr.id:
                self.err(f"SMR mask bits ({smr.mask:#x}) do not cover the ID field ({smr.id:#x})")
                raise NoDevice(f"{self.name}: SMR mask narrower than its ID")
            self.notice(f"\tstream matching: {self.num_mapping_groups} register groups, mask {smr.mask:#x}")
        else:
            self.num_mapping_groups = idr0.numsidb
        idr1 = regs.Idr1.decode(self.gr0_read(regs.GR0_IDR1))
        self.pgshift = 16 if idr1.pagesize else 12
        size = (1 << (idr1.numpagendxb + 1)) * (2 << self.pgshift)
        if size != self.mmio.size:
            self.warn(f"register space of {size:#x} bytes does not match the {self.mmio.size:#x}-byte window")
        self.num_s2_context_banks = idr1.nums2cb
        self.num_context_banks = idr1.numcb
        if self.num_s2_context_banks > self.num_context_banks:
            self.err("more stage-2 context banks than context banks")
            raise NoDevice(f"{self.name}: impossible number of stage-2 context banks")
        self.notice(f"\t{self.num_context_banks} context banks ({self.num_s2_context_banks} stage-2 only)")
        idr2 = regs.Idr2.decode(self.gr0_read(regs.GR0_IDR2))
        ias = regs.id_bits_to_size(idr2.ias)
        self.s1_output_size = min(_PHYS_MASK_SHIFT, ias)
        if ias < self.layout.ipa_bits:
            self.err(f"the p2m's IPA size is not supported (p2m {self.layout.ipa_bits} bits, SMMU {ias} bits)")
            raise NoDevice(f"{self.name}: input size {ias} below the p2m's {self.layout.ipa_bits}")
        self.s2_input_size = self.layout.ipa_bits
        self.s2_output_size = min(_PHYS_MASK_SHIFT, regs.id_bits_to_size(idr2.oas))
        if not idr2.ptfs_4k:
            self.err("the CPU's 4 KiB page size is not supported")
            raise NoDevice(f"{self.name}: no 4 KiB granule")
        self.notice(f"\tstage 2: {self.s2_input_size}-bit IPA to {self.s2_output_size}-bit PA")

    # -- reset (arm_smmu_device_reset) ----------------------------------------------------------------------------

    def reset(self, *, usfcfg_bypass: bool = False) -> None:
        """Clear faults, invalidate the stream table and the TLB, then enable the SMMU as Xen configures it."""
        gfsr = self.gr0_read(regs.GR0_SGFSR)
        self.gr0_write(regs.GR0_SGFSR, gfsr)
        # every SMR invalid; every S2CR faults (unlike Linux, Xen does not let unconfigured streams bypass)
        for i in range(self.num_mapping_groups):
            self.gr0_write(regs.gr0_smr(i), 0)
            self.gr0_write(regs.gr0_s2cr(i), regs.S2cr(regs.S2crType.FAULT).encode())
        for i in range(self.num_context_banks):
            self.cb_write(i, regs.CB_SCTLR, 0)
            self.cb_write(i, regs.CB_FSR, regs.Fsr.W1C)
        self.gr0_write(regs.GR0_STLBIALL, 0)
        self.gr0_write(regs.GR0_TLBIALLH, 0)
        self.gr0_write(regs.GR0_TLBIALLNSNH, 0)
        s = regs.Scr0
        reg = self.gr0_read(regs.GR0_SCR0)
        reg |= s.GFRE | s.GFIE | s.GCFGFRE | s.GCFGFIE  # report and interrupt on global faults
        reg |= s.VMIDPNE | s.PTM  # no broadcast TLB maintenance
        reg &= ~(s.CLIENTPD | s.USFCFG)
        if not usfcfg_bypass:
            reg |= s.USFCFG  # Xen: a stream no SMR matches faults
        reg &= ~s.FB
        reg &= ~s.BSU_MASK
        self.tlb_sync()
        self.gr0_write(regs.GR0_SCR0, reg)

    # -- TLB maintenance --------------------------------------------------------------------------------------------

    def tlb_sync(self) -> None:
        """Start a global sync and wait for sTLBGSTATUS.GSACTIVE to clear, 1 us per poll."""
        self.gr0_write(regs.GR0_STLBGSYNC, 0)
        count = 0
        while self.gr0_read(regs.GR0_STLBGSTATUS) & regs.STLBGSTATUS_GSACTIVE:
            count += 1
            if count == self.TLB_LOOP_TIMEOUT:
                self.err_ratelimited("TLB sync did not complete; the SMMU may be deadlocked")
                return
            self.iommu.machine.clock.advance(1_000)

    def tlb_inv_context(self, ctx: SmmuContext) -> None:
        """Invalidate everything the TLB holds for a stage-2 context's VMID, then sync."""
        self.gr0_write(regs.GR0_TLBIVMID, ctx.vmid)
        self.tlb_sync()

    # -- context banks ------------------------------------------------------------------------------------------------

    def init_domain_context(self, ctx: SmmuContext, irq_handler: Callable[[], None]) -> None:
        """Finalise a context at its first attach: take the first free bank and program it for stage 2."""
        bank = next((i for i in range(self.num_context_banks) if i not in self.context_map), None)
        if bank is None:
            raise NoSpace(f"{self.name}: no free context bank")
        self.context_map.add(bank)
        ctx.cbndx = bank
        ctx.irptndx = bank  # SMMUv2: one context interrupt per bank
        ctx.smmu = self
        self.init_context_bank(ctx)
        self.node.irqs.connect_irq(self.node.context_irq_base + ctx.irptndx, irq_handler)

    def init_context_bank(self, ctx: SmmuContext) -> None:
        """CBAR, CBA2R, TTBR0 = the p2m root, TCR = the p2m's shape, then SCTLR to enable translation."""
        n = ctx.cbndx
        self.gr1_write(regs.gr1_cbar(n), regs.Cbar(regs.CbarType.S2_TRANS, vmid=ctx.vmid).encode())
        self.gr1_write(regs.gr1_cba2r(n), regs.CBA2R_VA64)
        p2m = ctx.domain.p2m
        root = getattr(p2m, "root_maddr", None)
        if not isinstance(root, int):
            raise InvalidArgument(f"{ctx.domain} has no stage-2 p2m in memory for the SMMU to walk")
        self.notice(f"d{ctx.domain.domid}: p2m root at {root:#x}")
        self.cb_write(n, regs.CB_TTBR0, root & 0xFFFF_FFFF)
        self.cb_write(n, regs.CB_TTBR0 + 4, root >> 32)
        sl0 = 1 if self.iommu.config.quirk("smmu-sl0-level1") else 2 - self.layout.root_level
        tcr = regs.Tcr(
            t0sz=64 - self.s2_input_size,
            sl0=sl0,
            irgn0=1,  # write-back write-allocate
            orgn0=1,
            sh0=3,  # inner shareable
            tg0=0,  # 4 KiB
            ps=regs.size_to_id_bits(self.s2_output_size),
            eae=True,
        )
        self.cb_write(n, regs.CB_TCR, tcr.encode())
        s = regs.Sctlr
        self.cb_write(n, regs.CB_SCTLR, s.CFCFG | s.CFIE | s.CFRE | s.M | s.AFE | s.TRE)

    def destroy_domain_context(self, ctx: SmmuContext) -> None:
        """Disable the bank, drop its TLB entries, release its interrupt and give the bank back."""
        self.cb_write(ctx.cbndx, regs.CB_SCTLR, 0)
        self.tlb_inv_context(ctx)
        self.node.irqs.connect_irq(self.node.context_irq_base + ctx.irptndx, None)
        self.context_map.discard(ctx.cbndx)
        ctx.smmu = None

    # -- stream mapping -----------------------------------------------------------------------------------------------

    def configure_smrs(self, cfg: MasterCfg) -> None:
        """Take one free SMR per stream id (exact match, no mask) and make them valid."""
        if not self.features & SmmuFeature.STREAM_MATCH:
            return
        if cfg.smrs is not None:
            raise AlreadyExists(f"{self.name}: the master's SMRs are already configured")
        frame = self.iommu.machine.allocator.alloc(f"{self.name}:smrs")
        chosen: list[int] = []
        for _sid in cfg.streamids:
            idx = next((i for i in range(self.num_mapping_groups) if i not in self.smr_map and i not in chosen), None)
            if idx is None:
                self.err(f"no free stream match register for {len(cfg.streamids)} stream id(s)")
                self.iommu.machine.allocator.free(frame)
                raise NoSpace(f"{self.name}: no free SMR")
            chosen.append(idx)
        self.smr_map.update(chosen)
        for idx, sid in zip(chosen, cfg.streamids, strict=True):
            self.gr0_write(regs.gr0_smr(idx), regs.Smr(sid, mask=0).encode())
        cfg.smrs = chosen
        cfg.smrs_frame = frame

    def free_smrs(self, cfg: MasterCfg) -> None:
        """Invalidate the master's SMRs (writing ~VALID) and give them back."""
        if cfg.smrs is None:
            return
        for idx in cfg.smrs:
            self.gr0_write(regs.gr0_smr(idx), ~regs.SMR_VALID)
            self.smr_map.discard(idx)
        cfg.smrs = None
        if cfg.smrs_frame is not None:
            self.iommu.machine.allocator.free(cfg.smrs_frame)
            cfg.smrs_frame = None

    def domain_add_master(self, ctx: SmmuContext, cfg: MasterCfg) -> None:
        """Route the master's streams to the context bank: SMRs first, then each S2CR to translate."""
        try:
            self.configure_smrs(cfg)
        except AlreadyExists:
            return  # devices of one group share their SMRs
        for i, sid in enumerate(cfg.streamids):
            idx = cfg.smrs[i] if cfg.smrs is not None else sid
            self.gr0_write(regs.gr0_s2cr(idx), regs.S2cr(regs.S2crType.TRANSLATE, ctx.cbndx).encode())

    def domain_remove_master(self, ctx: SmmuContext, cfg: MasterCfg) -> None:
        """Route the master's streams to fault (Xen never lets a detached stream bypass), then free the SMRs."""
        if self.features & SmmuFeature.STREAM_MATCH and cfg.smrs is None:
            return
        for i, sid in enumerate(cfg.streamids):
            idx = cfg.smrs[i] if cfg.smrs is not None else sid
            self.gr0_write(regs.gr0_s2cr(idx), regs.S2cr(regs.S2crType.FAULT).encode())
        self.free_smrs(cfg)
