"""An SMMUv2 with stage-2 context banks: registers, stream matching, table walks, a VMID-tagged TLB, faults.

What a device's access goes through (``translate``):

1. sCR0.CLIENTPD set: the SMMU is out of the way (bypass).
2. Stream matching: every valid SMR whose ID equals the stream id in the bits its MASK does not cover
   matches.  No match: sCR0.USFCFG decides between bypass and an unidentified stream fault.  Several
   matches: with sCR0.SMCFCFG a stream match conflict fault, otherwise (UNPREDICTABLE) the model takes
   the lowest-numbered match and counts it.
3. The matching group's S2CR: bypass, fault (invalid context fault) or translate through context bank
   CBNDX (an unimplemented bank is an unimplemented context bank fault).
4. The context bank: CBAR must say stage-2 (the model implements no stage-1 contexts; other types give an
   invalid context fault); SCTLR.M = 0 means the bank does not translate (bypass).  CBAR.VMID tags the
   TLB.  The TLB is looked up first; on a miss the stage-2 walk starts from TTBR0 at the level and with
   the concatenation that TCR (AArch64 layout when CBA2R.VA64 is set, AArch32 LPAE otherwise) describes.
5. Faults are recorded in the bank's FSR/FAR/FSYNR0 (and the stream id in GR1's CBFRSYNRA), or, for
   global faults, in sGFSR/sGFAR/sGFSYNR0-2.  A fault that arrives while one is recorded only sets
   MULTI.  The fault interrupt (SCTLR.CFIE, sCR0.GFIE) calls the handler the driver connected to that
   line.  With SCTLR.CFCFG the faulting transaction stalls (FSR.SS) until software writes RESUME:
   terminate aborts it, retry translates it again.

TLB maintenance: TLBIVMID, TLBIALLNSNH, STLBIALL, TLBIALLH and a bank's TLBIIPAS2 are accepted when
written and guaranteed complete only by a sync; the model completes them exactly at the next sync (the
latest point the architecture allows), so an invalidation that is never synced is never seen.  After a
sync, sTLBGSTATUS.GSACTIVE reads as 1 for ``sync_polls`` reads.

Simplifications (each one stated where it matters): the fault report enables (CFRE/GFRE) do not turn an
abort into a RAZ/WI completion, the transaction always stops with ``DmaFault``; security state is
non-secure only; there is no walk cache (only final translations are cached).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import NoReturn

from iommusim.errors import BadAddress, DmaFault, InvalidArgument
from iommusim.frames import PAGE_SHIFT
from iommusim.hw.base import Translation
from iommusim.hw.fastbatch import BatchPlan, FastBatchMethods, IdentityPlan
from iommusim.hw.iotlb import Iotlb, IotlbEntry
from iommusim.hw.mmio import Register, RegisterBlock
from iommusim.hw.smmu import regs
from iommusim.hw.smmu.batch import SmmuPlan, bypassing_caches
from iommusim.hw.smmu.walk import S2FaultKind, S2Walk, walk_stage2
from iommusim.machine.memory import MachineMemory
from iommusim.pagetable.arm_s2 import S2Geometry, s2_geometry_aarch32, s2_geometry_aarch64
from iommusim.perms import Perm

__all__ = ["GLOBAL_IRQ", "SmmuConfig", "SmmuFaultRecord", "SmmuV2", "context_irq"]

GLOBAL_IRQ = 0


def context_irq(index: int) -> int:
    """The interrupt line of context interrupt ``index`` (on SMMUv2 the bank index)."""
    return 1 + index


IrqHandler = Callable[[], None]

_FSR_BIT = {
    S2FaultKind.TRANSLATION: regs.Fsr.TF,
    S2FaultKind.ACCESS_FLAG: regs.Fsr.AFF,
    S2FaultKind.PERMISSION: regs.Fsr.PF,
    S2FaultKind.ADDRESS_SIZE: regs.Fsr.ASF,
    S2FaultKind.EXTERNAL: regs.Fsr.EF,
}
_GFSR_NAME = {
    regs.Sgfsr.ICF: "invalid-context",
    regs.Sgfsr.USF: "unidentified-stream",
    regs.Sgfsr.SMCF: "stream-match-conflict",
    regs.Sgfsr.UCBF: "unimplemented-context-bank",
}
_MAX_RETRIES = 8


@dataclass(frozen=True)
class SmmuConfig:
    """What the implementation provides (the identification registers report it)."""

    name: str = "smmu0"
    context_banks: int = 8
    stream_match_registers: int = 16
    ias_bits: int = 48  # stage-2 input size
    oas_bits: int = 48  # output (physical) address size
    coherent_walk: bool = True  # IDR0.CTTW
    tlb_entries: int = 128
    tlb_page_shifts: tuple[int, ...] = (12, 21, 30)
    sync_polls: int = 1  # sTLBGSTATUS reads showing GSACTIVE after a sync
    sync_never_completes: bool = False  # a wedged SMMU (to exercise the driver's timeout)

    def __post_init__(self) -> None:
        if not 1 <= self.context_banks <= 128 or not 1 <= self.stream_match_registers <= 128:
            raise InvalidArgument("an SMMUv2 has 1-128 context banks and 1-128 stream match registers")


@dataclass(frozen=True)
class SmmuFaultRecord:
    """What the hardware recorded for a refused transaction (the ``DmaFault.record``)."""

    kind: str  # translation / access-flag / permission / address-size / external / unidentified-stream / ...
    stream_id: int
    address: int
    write: bool
    context_bank: int | None = None  # None: a global fault
    level: int | None = None  # ARM lookup level (context faults)
    multi: bool = False  # arrived while another fault was recorded: only MULTI was set
    stalled: bool = False  # the transaction stalled and was never resumed
    why: str = ""


@dataclass
class _Bank:
    regs: RegisterBlock
    sctlr: Register
    ttbr0: Register
    tcr: Register
    fsr: Register
    far: Register
    fsynr0: Register
    stalled: bool = False
    resume: int | None = None  # RESUME value written while stalled
    pending_ipas: list[int] = field(default_factory=list)


class SmmuMmio:
    """The SMMU's register window as the CPU sees it: GR0, GR1, then one page per context bank."""

    def __init__(self, unit: SmmuV2) -> None:
        self._unit = unit
        self.size = unit.window_size

    def _route(self, offset: int) -> tuple[RegisterBlock, int]:
        u = self._unit
        half = self.size // 2
        if 0 <= offset < regs.PAGE_SIZE:
            return u.gr0, offset
        if regs.PAGE_SIZE <= offset < 2 * regs.PAGE_SIZE:
            return u.gr1, offset - regs.PAGE_SIZE
        if half <= offset < self.size:
            n = (offset - half) // regs.CB_SIZE
            if n < len(u.banks):
                return u.banks[n].regs, (offset - half) % regs.CB_SIZE
        raise BadAddress(f"{u.name}: no register page at offset {offset:#x}")

    def read(self, offset: int, size: int = 4) -> int:
        block, off = self._route(offset)
        return block.read(off, size)

    def write(self, offset: int, value: int, size: int = 4) -> None:
        block, off = self._route(offset)
        block.write(off, value, size)


class SmmuV2(FastBatchMethods):
    """One SMMUv2 instance in front of some devices' stream ids."""

    def __init__(self, memory: MachineMemory, config: SmmuConfig | None = None) -> None:
        self.memory = memory
        self.config = cfg = config or SmmuConfig()
        self.name = cfg.name
        self._counters: Counter[str] = Counter()
        #: Held by a translation from TLB lookup to TLB fill, and by every register write with the
        #: invalidations it runs: a TLB sync never completes while a walk that read the old entries has
        #: yet to cache its result.
        self.lock = threading.RLock()
        self.tlb = Iotlb(cfg.tlb_entries, page_shifts=cfg.tlb_page_shifts, counters=self._counters)
        self._irq: dict[int, IrqHandler] = {}
        self._pending: list[tuple[str, int, int]] = []  # accepted, not yet completed invalidations
        self._sync_polls_left = 0
        self._smr_cache: list[tuple[int, regs.Smr]] | None = None
        self._oas_bits = cfg.oas_bits
        pages = 2
        while pages < max(2, cfg.context_banks):
            pages *= 2
        self._numpagendxb = pages.bit_length() - 2  # pages = 2 ** (NUMPAGENDXB + 1)
        self.window_size = 2 * pages * regs.PAGE_SIZE
        self.gr0 = self._build_gr0()
        self.gr1 = self._build_gr1()
        self.banks = [self._build_bank(n) for n in range(cfg.context_banks)]
        self.mmio = SmmuMmio(self)

    # -- identification ----------------------------------------------------------------------------------

    def idr0(self) -> regs.Idr0:
        cfg = self.config
        return regs.Idr0(
            numsmrg=cfg.stream_match_registers,
            numsidb=15,
            cttw=cfg.coherent_walk,
            numirpt=cfg.context_banks,
            ptfs=2,  # AArch64 descriptors only
            sms=True,
            s2ts=True,
        )

    def idr1(self) -> regs.Idr1:
        n = self.config.context_banks
        return regs.Idr1(numcb=n, nums2cb=n, numpagendxb=self._numpagendxb)

    def idr2(self) -> regs.Idr2:
        return regs.Idr2(
            ias=regs.size_to_id_bits(self.config.ias_bits),
            oas=regs.size_to_id_bits(self.config.oas_bits),
            ubs=regs.size_to_id_bits(48),
            ptfs_4k=True,
        )

    # -- register files ------------------------------------------------------------------------------------

    def _build_gr0(self) -> RegisterBlock:
        cfg = self.config
        b = RegisterBlock(f"{cfg.name}.gr0", regs.PAGE_SIZE, lock=self.lock)
        scr0_bits = 0xFFFF_FFFF & ~(regs.Scr0.STALLD | regs.Scr0.GSE)
        self._scr0 = b.add(
            Register("sCR0", regs.GR0_SCR0, 4, reset=regs.Scr0.CLIENTPD | regs.Scr0.SMCFCFG, writable=scr0_bits)
        )
        b.add(Register("sCR1", regs.GR0_SCR1, 4, writable=0xFFFF_FFFF))
        b.add(Register("sACR", regs.GR0_SACR, 4, writable=0xFFFF_FFFF))
        b.add(Register("IDR0", regs.GR0_IDR0, 4, reset=self.idr0().encode()))
        b.add(Register("IDR1", regs.GR0_IDR1, 4, reset=self.idr1().encode()))
        b.add(Register("IDR2", regs.GR0_IDR2, 4, reset=self.idr2().encode()))
        for name, off in (
            ("IDR3", regs.GR0_IDR3),
            ("IDR4", regs.GR0_IDR4),
            ("IDR5", regs.GR0_IDR5),
            ("IDR6", regs.GR0_IDR6),
        ):
            b.add(Register(name, off, 4))
        b.add(Register("IDR7", regs.GR0_IDR7, 4, reset=0x10))  # implementation version 1.0
        self._sgfar = b.add(Register("sGFAR", regs.GR0_SGFAR, 8))
        self._sgfsr = b.add(Register("sGFSR", regs.GR0_SGFSR, 4, w1c=regs.Sgfsr.W1C))
        b.add(Register("sGFSRRESTORE", regs.GR0_SGFSRRESTORE, 4, writable=regs.Sgfsr.W1C, on_write=self._gfsr_restore))
        self._sgfsynr0 = b.add(Register("sGFSYNR0", regs.GR0_SGFSYNR0, 4))
        self._sgfsynr1 = b.add(Register("sGFSYNR1", regs.GR0_SGFSYNR1, 4))
        self._sgfsynr2 = b.add(Register("sGFSYNR2", regs.GR0_SGFSYNR2, 4))
        for name, off in (
            ("STLBIALL", regs.GR0_STLBIALL),
            ("TLBIALLNSNH", regs.GR0_TLBIALLNSNH),
            ("TLBIALLH", regs.GR0_TLBIALLH),
        ):
            b.add(Register(name, off, 4, writable=0xFFFF_FFFF, on_write=self._tlbi_all))
        b.add(Register("TLBIVMID", regs.GR0_TLBIVMID, 4, writable=0xFFFF, on_write=self._tlbi_vmid))
        b.add(Register("sTLBGSYNC", regs.GR0_STLBGSYNC, 4, writable=0xFFFF_FFFF, on_write=self._tlb_sync))
        b.add(Register("sTLBGSTATUS", regs.GR0_STLBGSTATUS, 4, on_read=self._tlb_status))
        self._smrs: list[Register] = []
        self._s2crs: list[Register] = []
        smr_bits = regs.SMR_VALID | (regs.SMR_ID_MASK << regs.SMR_MASK_SHIFT) | regs.SMR_ID_MASK
        for n in range(cfg.stream_match_registers):
            self._smrs.append(
                b.add(Register(f"SMR{n}", regs.gr0_smr(n), 4, writable=smr_bits, on_write=self._smr_written))
            )
            fault = regs.S2cr(regs.S2crType.FAULT).encode()
            self._s2crs.append(b.add(Register(f"S2CR{n}", regs.gr0_s2cr(n), 4, reset=fault, writable=0xFFFF_FFFF)))
        return b

    def _build_gr1(self) -> RegisterBlock:
        b = RegisterBlock(f"{self.config.name}.gr1", regs.PAGE_SIZE, lock=self.lock)
        self._cbars: list[Register] = []
        self._cba2rs: list[Register] = []
        self._cbfrsynras: list[Register] = []
        for n in range(self.config.context_banks):
            self._cbars.append(b.add(Register(f"CBAR{n}", regs.gr1_cbar(n), 4, writable=0xFFFF_FFFF)))
            self._cbfrsynras.append(b.add(Register(f"CBFRSYNRA{n}", regs.gr1_cbfrsynra(n), 4)))
            self._cba2rs.append(b.add(Register(f"CBA2R{n}", regs.gr1_cba2r(n), 4, writable=0xFFFF_0001)))
        return b

    def _build_bank(self, n: int) -> _Bank:
        b = RegisterBlock(f"{self.config.name}.cb{n}", regs.CB_SIZE, lock=self.lock)
        rw32 = 0xFFFF_FFFF
        rw64 = (1 << 64) - 1
        sctlr = b.add(Register("SCTLR", regs.CB_SCTLR, 4, writable=rw32))
        b.add(Register("ACTLR", regs.CB_ACTLR, 4, writable=rw32))
        b.add(Register("RESUME", regs.CB_RESUME, 4, writable=rw32, on_write=self._bank_hook(self._resume, n)))
        b.add(Register("TCR2", regs.CB_TCR2, 4, writable=rw32))
        ttbr0 = b.add(Register("TTBR0", regs.CB_TTBR0, 8, writable=rw64))
        b.add(Register("TTBR1", regs.CB_TTBR1, 8, writable=rw64))
        tcr = b.add(Register("TCR", regs.CB_TCR, 4, writable=rw32))
        b.add(Register("CONTEXTIDR", regs.CB_CONTEXTIDR, 4, writable=rw32))
        b.add(Register("MAIR0", regs.CB_MAIR0, 4, writable=rw32))
        b.add(Register("MAIR1", regs.CB_MAIR1, 4, writable=rw32))
        b.add(Register("PAR", regs.CB_PAR, 8))
        fsr = b.add(Register("FSR", regs.CB_FSR, 4, w1c=regs.Fsr.W1C))
        b.add(
            Register("FSRRESTORE", regs.CB_FSRRESTORE, 4, writable=rw32, on_write=self._bank_hook(self._fsr_restore, n))
        )
        far = b.add(Register("FAR", regs.CB_FAR, 8, writable=rw64))
        fsynr0 = b.add(Register("FSYNR0", regs.CB_FSYNR0, 4, writable=rw32))
        b.add(Register("FSYNR1", regs.CB_FSYNR1, 4, writable=rw32))
        b.add(Register("IPAFAR", regs.CB_IPAFAR, 8, writable=rw64))
        b.add(Register("TLBIIPAS2", regs.CB_TLBIIPAS2, 8, writable=rw64, on_write=self._bank_hook(self._tlbi_ipa, n)))
        b.add(Register("TLBSYNC", regs.CB_TLBSYNC, 4, writable=rw32, on_write=self._tlb_sync))
        b.add(Register("TLBSTATUS", regs.CB_TLBSTATUS, 4, on_read=self._tlb_status))
        return _Bank(b, sctlr, ttbr0, tcr, fsr, far, fsynr0)

    # -- register side effects -----------------------------------------------------------------------------

    @staticmethod
    def _bank_hook(fn: Callable[[int, int], int], n: int) -> Callable[[int, int], int]:
        """A register write hook that knows which context bank it belongs to."""

        def hook(_old: int, new: int) -> int:
            return fn(n, new)

        return hook

    def _smr_written(self, _old: int, new: int) -> int:
        self._smr_cache = None
        return new

    def _gfsr_restore(self, _old: int, new: int) -> int:
        self._sgfsr.value = new & regs.Sgfsr.W1C
        return 0

    def _fsr_restore(self, n: int, value: int) -> int:
        self.banks[n].fsr.value = value & regs.Fsr.W1C
        return 0

    def _tlbi_all(self, _old: int, _new: int) -> int:
        self._pending.append(("all", 0, 0))
        self._counters["tlbi_all_accepted"] += 1
        return 0

    def _tlbi_vmid(self, _old: int, new: int) -> int:
        self._pending.append(("vmid", new & 0xFF, 0))
        self._counters["tlbi_vmid_accepted"] += 1
        return 0

    def _tlbi_ipa(self, n: int, value: int) -> int:
        # the IPA is given in units of 4 KiB (bits 35:0 hold IPA[47:12])
        vmid = regs.Cbar.decode(self._cbars[n].value).vmid
        self._pending.append(("ipa", vmid, (value & ((1 << 36) - 1)) << PAGE_SHIFT))
        self._counters["tlbi_ipa_accepted"] += 1
        return 0

    def _tlb_sync(self, _old: int, _new: int) -> int:
        """Complete every accepted invalidation; the status reads active for a few polls."""
        for kind, vmid, ipa in self._pending:
            if kind == "all":
                self.tlb.invalidate_all()
            elif kind == "vmid":
                self.tlb.invalidate_tag(vmid)
            else:
                self.tlb.invalidate_range(vmid, ipa, 1 << PAGE_SHIFT)
        self._counters["tlb_syncs"] += 1
        self._counters["invalidations_completed"] += len(self._pending)
        self._pending.clear()
        self._sync_polls_left = self.config.sync_polls
        return 0

    def _tlb_status(self, _stored: int) -> int:
        if self.config.sync_never_completes:
            return regs.STLBGSTATUS_GSACTIVE
        if self._sync_polls_left > 0:
            self._sync_polls_left -= 1
            return regs.STLBGSTATUS_GSACTIVE
        return 0

    def _resume(self, n: int, value: int) -> int:
        bank = self.banks[n]
        if bank.stalled:
            bank.resume = value & regs.RESUME_TERMINATE
            bank.stalled = False
        else:
            self._counters["resume_ignored"] += 1
        return 0

    # -- interrupts -------------------------------------------------------------------------------------------

    def connect_irq(self, line: int, handler: IrqHandler | None) -> None:
        """Wire an interrupt line to a handler (``None`` disconnects it)."""
        if handler is None:
            self._irq.pop(line, None)
        else:
            self._irq[line] = handler

    def irq_handler(self, line: int) -> IrqHandler | None:
        """What is connected to an interrupt line (for tools that tap it)."""
        return self._irq.get(line)

    def _raise_irq(self, line: int) -> None:
        handler = self._irq.get(line)
        self._counters["irq_global" if line == GLOBAL_IRQ else "irq_context"] += 1
        if handler is None:
            self._counters["irq_unhandled"] += 1
            return
        handler()

    # -- the bus side ----------------------------------------------------------------------------------------

    def counters(self) -> Mapping[str, int]:
        return dict(self._counters)

    def _bypass(self, daddr: int, why: str) -> Translation:
        self._counters[f"bypass_{why}"] += 1
        return Translation(daddr, PAGE_SHIFT, Perm.RW, False)

    def _matching_groups(self, sid: int) -> list[int]:
        if self._smr_cache is None:
            self._smr_cache = [(n, s) for n, r in enumerate(self._smrs) if (s := regs.Smr.decode(r.value)).valid]
        return [n for n, smr in self._smr_cache if smr.matches(sid)]

    def translate(self, source_id: int, daddr: int, access: Perm) -> Translation:
        with self.lock:
            return self._translate(source_id, daddr, access)

    def _translate(self, source_id: int, daddr: int, access: Perm) -> Translation:
        self._counters["translations"] += 1
        write = bool(access & Perm.W)
        scr0 = self._scr0.value
        if scr0 & regs.Scr0.CLIENTPD:
            return self._bypass(daddr, "client_disabled")
        sid = source_id & regs.SMR_ID_MASK
        groups = self._matching_groups(sid)
        if not groups:
            if scr0 & regs.Scr0.USFCFG:
                self._global_fault(regs.Sgfsr.USF, sid, daddr, write, "no stream match register matches")
            return self._bypass(daddr, "unmatched_stream")
        if len(groups) > 1:
            if scr0 & regs.Scr0.SMCFCFG:
                self._global_fault(regs.Sgfsr.SMCF, sid, daddr, write, f"stream match groups {groups} all match")
            self._counters["smr_conflict_unpredictable"] += 1
        s2cr = regs.S2cr.decode(self._s2crs[groups[0]].value)
        if s2cr.type == regs.S2crType.BYPASS:
            return self._bypass(daddr, "s2cr")
        if s2cr.type != regs.S2crType.TRANSLATE:
            self._global_fault(regs.Sgfsr.ICF, sid, daddr, write, f"stream mapping group {groups[0]} is set to fault")
        if s2cr.cbndx >= len(self.banks):
            self._global_fault(regs.Sgfsr.UCBF, sid, daddr, write, f"context bank {s2cr.cbndx} is not implemented")
        return self._translate_in_bank(s2cr.cbndx, sid, daddr, access, 0)

    def _geometry(self, n: int) -> tuple[S2Geometry | None, int]:
        """The walk a bank's TCR describes and its effective output size."""
        tcr = self.banks[n].tcr.value
        if self._cba2rs[n].value & regs.CBA2R_VA64:
            t = regs.Tcr.decode(tcr)
            geom = s2_geometry_aarch64(t.t0sz, t.sl0) if t.tg0 == 0 else None
            oas = min(regs.id_bits_to_size(t.ps), self._oas_bits)
        else:
            geom = s2_geometry_aarch32(*regs.Tcr.aarch32_fields(tcr))
            oas = min(40, self._oas_bits)
        if geom is not None and geom.ipa_bits > self.config.ias_bits:
            geom = None
        return geom, oas

    def _translate_in_bank(self, n: int, sid: int, daddr: int, access: Perm, retries: int) -> Translation:
        bank = self.banks[n]
        write = bool(access & Perm.W)
        cbar = regs.Cbar.decode(self._cbars[n].value)
        if cbar.type != regs.CbarType.S2_TRANS:
            self._global_fault(regs.Sgfsr.ICF, sid, daddr, write, f"context bank {n} is not a stage-2 context")
        sctlr = bank.sctlr.value
        if not sctlr & regs.Sctlr.M:
            return self._bypass(daddr, "context_disabled")
        vmid = cbar.vmid
        hit = self.tlb.lookup(vmid, daddr)
        if hit is not None:
            if access & ~hit.perms:
                level = 3 - (hit.page_shift - PAGE_SHIFT) // 9
                outcome = S2Walk(S2FaultKind.PERMISSION, level, why="cached translation forbids the access")
                return self._context_fault(n, sid, daddr, access, outcome, retries)
            return Translation(hit.translate(daddr), hit.page_shift, hit.perms, True)
        geom, oas = self._geometry(n)
        outcome = walk_stage2(self.memory, bank.ttbr0.value, geom, daddr, oas, affd=bool(sctlr & regs.Sctlr.AFFD))
        self._counters["walks"] += 1
        self._counters["walk_reads"] += outcome.reads
        if outcome.fault is not None:
            return self._context_fault(n, sid, daddr, access, outcome, retries)
        shift = outcome.page_shift
        if shift not in self.tlb.page_shifts:  # a size the TLB does not hold: cache the 4 KiB piece
            base = outcome.out | (daddr & ((1 << shift) - 1) & ~((1 << PAGE_SHIFT) - 1))
            shift, out = PAGE_SHIFT, base
        else:
            out = outcome.out
        entry = IotlbEntry(vmid, daddr >> shift, shift, out, outcome.perms)
        self.tlb.insert(entry)
        if access & ~outcome.perms:
            denied = S2Walk(S2FaultKind.PERMISSION, outcome.level, raw=outcome.raw, why="S2AP forbids the access")
            return self._context_fault(n, sid, daddr, access, denied, retries)
        return Translation(entry.translate(daddr), shift, outcome.perms, False)

    # -- fault recording ---------------------------------------------------------------------------------------

    def _global_fault(self, bit: int, sid: int, address: int, write: bool, why: str) -> NoReturn:
        gfsr = self._sgfsr.value
        multi = bool(gfsr & regs.Sgfsr.FAULT_BITS)
        if multi:
            self._sgfsr.value = gfsr | regs.Sgfsr.MULTI
        else:
            self._sgfsr.value = gfsr | bit
            self._sgfar.value = address
            self._sgfsynr0.value = regs.Sgfsynr0.WNR if write else 0
            self._sgfsynr1.value = sid & 0xFFFF
            self._sgfsynr2.value = 0
        kind = _GFSR_NAME[bit]
        self._counters[f"fault_{kind}"] += 1
        record = SmmuFaultRecord(kind, sid, address, write, multi=multi, why=why)
        if self._scr0.value & regs.Scr0.GFIE:
            self._raise_irq(GLOBAL_IRQ)
        raise DmaFault(f"{self.name}: stream {sid:#x}: {kind} fault at {address:#x}: {why}", record=record)

    def _context_fault(self, n: int, sid: int, ipa: int, access: Perm, outcome: S2Walk, retries: int) -> Translation:
        assert outcome.fault is not None
        bank = self.banks[n]
        write = bool(access & Perm.W)
        sctlr = bank.sctlr.value
        fsr = bank.fsr.value
        multi = bool(fsr & regs.Fsr.FAULT_BITS)
        if multi:
            fsr |= regs.Fsr.MULTI
        else:
            va64 = bool(self._cba2rs[n].value & regs.CBA2R_VA64)
            fsr |= _FSR_BIT[outcome.fault] | ((2 if va64 else 1) << regs.Fsr.FORMAT_SHIFT)
            bank.far.value = ipa
            bank.fsynr0.value = regs.Fsynr0.encode(outcome.level, write, outcome.during_fetch)
            self._cbfrsynras[n].value = sid & regs.CBFRSYNRA_SID_MASK
        stall = bool(sctlr & regs.Sctlr.CFCFG)
        if stall:
            fsr |= regs.Fsr.SS
            bank.stalled = True
            bank.resume = None
        bank.fsr.value = fsr
        kind = outcome.fault.value
        self._counters[f"fault_{kind}"] += 1
        if sctlr & regs.Sctlr.CFIE:
            self._raise_irq(context_irq(n))
        stalled = False
        if stall:
            action = bank.resume
            bank.resume = None
            if action is None:
                stalled = True
                self._counters["stalls_unresumed"] += 1
            elif action & regs.RESUME_TERMINATE:
                self._counters["stalls_terminated"] += 1
            elif retries < _MAX_RETRIES:
                self._counters["stalls_retried"] += 1
                return self._translate_in_bank(n, sid, ipa, access, retries + 1)
        record = SmmuFaultRecord(kind, sid, ipa, write, n, outcome.level, multi, stalled, outcome.why)
        raise DmaFault(
            f"{self.name}: context bank {n}, stream {sid:#x}: {kind} fault at IPA {ipa:#x} "
            f"(level {outcome.level}): {outcome.why}",
            record=record,
        )

    # -- many translations at once (``iommusim.hw.batch.BatchTranslator``) ---------------------------------

    def _bypassing_caches(self) -> AbstractContextManager[None]:
        return bypassing_caches(self)

    def _batch_plan(self, source_id: int) -> BatchPlan | None:
        """The stream's translating stage-2 bank, or its bypass, when nothing before the TLB refuses it;
        else None to let ``translate`` answer."""
        volatile = bool(self._irq)
        scr0 = self._scr0.value

        def bypass(why: str, conflict: bool = False) -> IdentityPlan:
            counts = {"translations": 1, f"bypass_{why}": 1}
            if conflict:
                counts["smr_conflict_unpredictable"] = 1
            return IdentityPlan(self._counters, counts, volatile=volatile)

        if scr0 & regs.Scr0.CLIENTPD:
            return bypass("client_disabled")
        groups = self._matching_groups(source_id & regs.SMR_ID_MASK)
        if not groups:
            return None if scr0 & regs.Scr0.USFCFG else bypass("unmatched_stream")
        if len(groups) > 1 and scr0 & regs.Scr0.SMCFCFG:
            return None
        conflict = len(groups) > 1
        s2cr = regs.S2cr.decode(self._s2crs[groups[0]].value)
        if s2cr.type == regs.S2crType.BYPASS:
            return bypass("s2cr", conflict)
        if s2cr.type != regs.S2crType.TRANSLATE or s2cr.cbndx >= len(self.banks):
            return None
        n = s2cr.cbndx
        if regs.Cbar.decode(self._cbars[n].value).type != regs.CbarType.S2_TRANS:
            return None
        if not self.banks[n].sctlr.value & regs.Sctlr.M:
            return bypass("context_disabled", conflict)
        geom, oas = self._geometry(n)
        if geom is None:
            return None
        if self.banks[n].ttbr0.value & ~((geom.root_pages << PAGE_SHIFT) - 1) >= 1 << oas:
            return None
        return SmmuPlan(self, n, geom, oas, conflict=conflict)
