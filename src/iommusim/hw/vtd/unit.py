"""One VT-d DMA-remapping unit (a DRHD): registers, table walks from memory, caches, invalidation, faults.

The unit knows nothing of the driver.  It holds a register file (``regs``) that software programs by MMIO,
reads root, context and second-level tables from machine memory when a device's request misses its caches,
obeys only the invalidations it is sent (the context and IOTLB command registers, or descriptors in the
invalidation queue in memory), and records faults in its fault-recording registers, raising its fault
interrupt through an ``InterruptLine`` that software may connect a handler to.

Requests arrive as (source id, address, access).  With translation disabled (GSTS.TES=0) they reach memory
untranslated.  Otherwise: context (cache, else root table -> context table), then the address-width
check, IOTLB, not-present cache (caching mode only), and a walk (starting from the paging-structure cache
when it holds the level-2 entry) with permissions ANDed over the levels.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from functools import partial

from iommusim.errors import DmaFault
from iommusim.frames import PAGE_SHIFT
from iommusim.hw.base import Translation
from iommusim.hw.fastbatch import BatchPlan, FastBatchMethods, IdentityPlan
from iommusim.hw.iotlb import Iotlb, IotlbEntry
from iommusim.hw.mmio import Register, RegisterBlock
from iommusim.hw.vtd.batch import VtdPlan, bypassing_caches
from iommusim.hw.vtd.caches import (
    AtsEntry,
    ContextCache,
    CtxInfo,
    DeviceTlb,
    NegativeCache,
    PagingStructureCache,
    PdeEntry,
)
from iommusim.hw.vtd.regs import (
    CCMD,
    FECTL_IM,
    FECTL_IP,
    FSTS,
    GCMD,
    GSTS,
    ICS_IWC,
    IECTL_IM,
    IECTL_IP,
    IOTLB_REG,
    IQ_INDEX_SHIFT,
    IQA_DW,
    IQA_QS_MASK,
    IVA,
    VER_1_0,
    Cap,
    Ecap,
    Reg,
    agaw_to_levels,
    agaw_to_width,
)
from iommusim.hw.vtd.structs import (
    ContextEntry,
    ContextInvDesc,
    DevIotlbInvDesc,
    FaultReason,
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
from iommusim.machine.memory import MachineMemory
from iommusim.pagetable.format import EntryKind
from iommusim.pagetable.vtd import VtdSecondLevelFormat
from iommusim.perms import Perm

__all__ = ["InterruptLine", "VtdUnit"]

_U64 = (1 << 64) - 1


class InterruptLine:
    """An interrupt the unit raises (an MSI in reality); software connects the handler it wants called."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.handler: Callable[[], None] | None = None
        self.raised = 0

    def connect(self, handler: Callable[[], None] | None) -> None:
        self.handler = handler

    def fire(self) -> None:
        self.raised += 1
        if self.handler is not None:
            self.handler()


class _Fault(Exception):
    """Internal: a translation stopped with a fault reason."""

    def __init__(self, reason: FaultReason, fpd: bool = False) -> None:
        super().__init__(reason.name)
        self.reason = reason
        self.fpd = fpd


class VtdUnit(FastBatchMethods):
    """A DMA-remapping hardware unit in front of some PCI devices."""

    def __init__(
        self,
        name: str,
        memory: MachineMemory,
        *,
        cap: Cap | None = None,
        ecap: Ecap | None = None,
        haw: int = 46,
        dram_limit: int | None = None,
        iotlb_entries: int = 1024,
        context_cache_entries: int = 256,
        pde_cache_entries: int = 64,
        negative_entries: int = 256,
        device_tlb_entries: int = 64,
    ) -> None:
        self.name = name
        self.memory = memory
        self.cap = cap or Cap()
        self.ecap = ecap or Ecap()
        self.haw = haw
        #: first machine address with no memory behind it (the platform's address decoder)
        self.dram_limit = memory.limit if dram_limit is None else dram_limit
        self.fmt = VtdSecondLevelFormat(
            haw=haw, superpage_levels=self.cap.superpage_levels, snoop_control=self.ecap.sc, device_tlb=self.ecap.dt
        )
        self.counters_: Counter[str] = Counter()
        shifts = (12, *sorted(9 * (lv - 1) + 12 for lv in self.cap.superpage_levels))
        self.iotlb = Iotlb(iotlb_entries, page_shifts=shifts, counters=self.counters_)
        self.context_cache = ContextCache(context_cache_entries, self.counters_)
        self.pde_cache = PagingStructureCache(pde_cache_entries, self.counters_)
        self.negative = NegativeCache(negative_entries, self.counters_)
        self.device_tlb = DeviceTlb(device_tlb_entries, self.counters_)
        self.fault_irq = InterruptLine(f"{name}-fault")
        self.inv_irq = InterruptLine(f"{name}-invalidation")
        #: a hung unit: the invalidation queue is not processed (to show software's timeout)
        self.stall_queue = False
        self._root_table: int | None = None  # latched by SRTP
        self._next_frcd = 0
        #: Held by a translation from cache lookup to cache fill, and by every register write with the
        #: invalidations it runs: an invalidation never completes while a walk that read the old entries
        #: has yet to cache its result (the hardware's guarantee that "done" means done).
        self.lock = threading.RLock()
        self.regs = self._make_registers()

    # -- registers ------------------------------------------------------------------------------------

    def _make_registers(self) -> RegisterBlock:
        cap, ecap = self.cap, self.ecap
        frcd_end = cap.fro + 16 * cap.nfr
        size = max(0x1000, frcd_end, ecap.iro + 16)
        rb = RegisterBlock(self.name, size, lock=self.lock)
        rb.add(Register("VER", Reg.VER, 4, reset=VER_1_0))
        rb.add(Register("CAP", Reg.CAP, 8, reset=cap.encode()))
        rb.add(Register("ECAP", Reg.ECAP, 8, reset=ecap.encode()))
        rb.add(Register("GCMD", Reg.GCMD, 4, writable=0xFFFF_FFFF, on_write=self._on_gcmd))
        rb.add(Register("GSTS", Reg.GSTS, 4))
        rb.add(Register("RTADDR", Reg.RTADDR, 8, writable=_U64 & ~0x3FF))
        rb.add(Register("CCMD", Reg.CCMD, 8, writable=_U64, on_write=self._on_ccmd))
        rb.add(Register("FSTS", Reg.FSTS, 4, w1c=FSTS.W1C, on_read=self._read_fsts))
        rb.add(Register("FECTL", Reg.FECTL, 4, reset=FECTL_IM, writable=FECTL_IM, on_write=self._on_fectl))
        rb.add(Register("FEDATA", Reg.FEDATA, 4, writable=0xFFFF_FFFF))
        rb.add(Register("FEADDR", Reg.FEADDR, 4, writable=0xFFFF_FFFC))
        rb.add(Register("FEUADDR", Reg.FEUADDR, 4, writable=0xFFFF_FFFF))
        rb.add(Register("PMEN", Reg.PMEN, 4, writable=1 << 31, on_write=lambda _o, n: n | (n >> 31)))
        rb.add(Register("IQH", Reg.IQH, 8))
        rb.add(Register("IQT", Reg.IQT, 8, writable=0x7FFF0, on_write=self._on_iqt))
        rb.add(Register("IQA", Reg.IQA, 8, writable=(_U64 & ~0xFFF) | IQA_DW | IQA_QS_MASK))
        rb.add(Register("ICS", Reg.ICS, 4, w1c=ICS_IWC))
        rb.add(Register("IECTL", Reg.IECTL, 4, reset=IECTL_IM, writable=IECTL_IM, on_write=self._on_iectl))
        rb.add(Register("IEDATA", Reg.IEDATA, 4, writable=0xFFFF_FFFF))
        rb.add(Register("IEADDR", Reg.IEADDR, 4, writable=0xFFFF_FFFC))
        rb.add(Register("IEUADDR", Reg.IEUADDR, 4, writable=0xFFFF_FFFF))
        rb.add(Register("IVA", ecap.iro, 8, writable=(IVA.ADDR_MASK | IVA.IH | IVA.AM_MASK)))
        rb.add(Register("IOTLB", ecap.iro + 8, 8, writable=_U64, on_write=self._on_iotlb_reg))
        for i in range(cap.nfr):
            rb.add(Register(f"FRCD{i}_LO", cap.fro + 16 * i, 8))
            rb.add(Register(f"FRCD{i}_HI", cap.fro + 16 * i + 8, 8, w1c=1 << 63))
        return rb

    def _gsts(self) -> int:
        return self.regs.get("GSTS")

    def _set_gsts(self, bits: int, on: bool) -> None:
        v = self._gsts()
        self.regs.set("GSTS", (v | bits) if on else (v & ~bits))

    @property
    def translation_enabled(self) -> bool:
        return bool(self._gsts() & GSTS.TES)

    @property
    def qi_enabled(self) -> bool:
        return bool(self._gsts() & GSTS.QIES)

    def _on_gcmd(self, _old: int, cmd: int) -> int:
        status = self._gsts()
        if cmd & GCMD.SRTP:
            self._root_table = self.regs.get("RTADDR") & ~0xFFF & _U64
            self._set_gsts(GSTS.RTPS, True)
            self.counters_["set_root_pointer"] += 1
        if cmd & GCMD.WBF:
            self.counters_["write_buffer_flushes"] += 1
        if bool(cmd & GCMD.TE) != bool(status & GSTS.TES):
            self._set_gsts(GSTS.TES, bool(cmd & GCMD.TE))
            self.counters_["translation_enables" if cmd & GCMD.TE else "translation_disables"] += 1
        if bool(cmd & GCMD.QIE) != bool(status & GSTS.QIES):
            if cmd & GCMD.QIE and self.ecap.qi:
                self.regs.set("IQH", 0)
                self._set_gsts(GSTS.QIES, True)
            elif not cmd & GCMD.QIE:
                self._set_gsts(GSTS.QIES, False)
        if bool(cmd & GCMD.IRE) != bool(status & GSTS.IRES) and self.ecap.ir:
            self._set_gsts(GSTS.IRES, bool(cmd & GCMD.IRE))
        if cmd & GCMD.SIRTP and self.ecap.ir:
            self._set_gsts(GSTS.IRTPS, True)
        return 0  # GCMD reads as zero

    def _read_fsts(self, stored: int) -> int:
        ppf = any(self.regs.get(f"FRCD{i}_HI") >> 63 for i in range(self.cap.nfr))
        return (stored & ~FSTS.PPF) | (FSTS.PPF if ppf else 0)

    def _on_fectl(self, old: int, new: int) -> int:
        if old & FECTL_IM and not new & FECTL_IM and old & FECTL_IP:
            new &= ~FECTL_IP
            self.regs["FECTL"].value = new
            self.fault_irq.fire()
            return new
        return new | (old & FECTL_IP)

    def _on_iectl(self, old: int, new: int) -> int:
        if old & IECTL_IM and not new & IECTL_IM and old & IECTL_IP:
            new &= ~IECTL_IP
            self.regs["IECTL"].value = new
            self.inv_irq.fire()
            return new
        return new | (old & IECTL_IP)

    # -- register-based invalidation --------------------------------------------------------------------

    def _on_ccmd(self, _old: int, value: int) -> int:
        if not value & CCMD.ICC:
            return value
        if self.qi_enabled:
            self.counters_["register_invalidation_ignored"] += 1
            return value & ~CCMD.ICC
        gran = value >> CCMD.CIRG_SHIFT & 3
        did = value & 0xFFFF
        sid = value >> CCMD.SID_SHIFT & 0xFFFF
        fm = value >> CCMD.FM_SHIFT & 3
        if gran == 0:
            return value & ~CCMD.ICC  # reserved request: nothing done, CAIG stays 0
        self._invalidate_context(gran, did, sid, fm)
        value &= ~(CCMD.ICC | 3 << CCMD.CAIG_SHIFT)
        return value | gran << CCMD.CAIG_SHIFT

    def _on_iotlb_reg(self, _old: int, value: int) -> int:
        if not value & IOTLB_REG.IVT:
            return value
        if self.qi_enabled:
            self.counters_["register_invalidation_ignored"] += 1
            return value & ~IOTLB_REG.IVT
        gran = value >> IOTLB_REG.IIRG_SHIFT & 3
        did = value >> IOTLB_REG.DID_SHIFT & 0xFFFF
        iva = self.regs.get("IVA")
        done = 0
        if gran:
            done = self._invalidate_iotlb(gran, did, iva & IVA.ADDR_MASK, iva & IVA.AM_MASK, bool(iva & IVA.IH))
        value &= ~(IOTLB_REG.IVT | 3 << IOTLB_REG.IAIG_SHIFT)
        return value | done << IOTLB_REG.IAIG_SHIFT

    # -- invalidation (shared by both interfaces) -----------------------------------------------------------

    def _invalidate_context(self, gran: int, did: int, sid: int, fm: int) -> None:
        if gran == CCMD.GLOBAL:
            self.context_cache.invalidate_all()
            self.counters_["inv_context_global"] += 1
        elif gran == CCMD.DOMAIN:
            self.context_cache.invalidate_domain(did)
            self.counters_["inv_context_domain"] += 1
        else:
            self.context_cache.invalidate_device(did, sid, fm)
            self.counters_["inv_context_device"] += 1

    def _invalidate_iotlb(self, gran: int, did: int, addr: int, am: int, ih: bool) -> int:
        """Perform an IOTLB invalidation; returns the granularity actually performed."""
        if gran == IOTLB_REG.PAGE and (not self.cap.psi or am > self.cap.mamv):
            gran = IOTLB_REG.DOMAIN  # a unit without PSI (or past MAMV) does the whole domain instead
        if gran == IOTLB_REG.GLOBAL:
            self.iotlb.invalidate_all()
            self.pde_cache.invalidate_all()
            self.negative.invalidate_all()
        elif gran == IOTLB_REG.DOMAIN:
            self.iotlb.invalidate_tag(did)
            self.pde_cache.invalidate_domain(did)
            self.negative.invalidate(did)
        else:
            size = 1 << (PAGE_SHIFT + am)
            base = addr & ~(size - 1)
            self.iotlb.invalidate_range(did, base, size)
            self.negative.invalidate(did, base, size)
            if not ih:
                self.pde_cache.invalidate_range(did, base, size)
        return gran

    # -- queued invalidation ---------------------------------------------------------------------------------

    def _on_iqt(self, _old: int, value: int) -> int:
        self.regs["IQT"].value = value
        self.process_queue()
        return value

    def _queue_error(self) -> None:
        fsts = self.regs["FSTS"]
        already = fsts.value & FSTS.IQE
        fsts.value |= FSTS.IQE
        self.counters_["queue_errors"] += 1
        if not already:
            self._fault_event()

    def process_queue(self) -> int:
        """Fetch and carry out descriptors from head to tail; returns how many were done."""
        if not self.qi_enabled or self.stall_queue or self.regs["FSTS"].value & FSTS.IQE:
            return 0
        iqa = self.regs.get("IQA")
        if iqa & IQA_DW:
            self._queue_error()  # 256-bit descriptors are not implemented by this unit
            return 0
        base = iqa & ~0xFFF & _U64
        slots = 256 << (iqa & IQA_QS_MASK)
        head = self.regs.get("IQH") >> IQ_INDEX_SHIFT
        tail = self.regs.get("IQT") >> IQ_INDEX_SHIFT
        if tail >= slots:
            self._queue_error()
            return 0
        done = 0
        while head != tail:
            addr = base + 16 * head
            if addr + 16 > self.dram_limit:
                self._queue_error()
                break
            lo, hi = self.memory.read_u64(addr), self.memory.read_u64(addr + 8)
            if not self._execute(lo, hi):
                self._queue_error()
                break
            head = (head + 1) % slots
            self.regs.set("IQH", head << IQ_INDEX_SHIFT)
            done += 1
        return done

    def _execute(self, lo: int, hi: int) -> bool:
        desc = decode_descriptor(lo, hi)
        if desc is None:
            return False
        self.counters_["qi_descriptors"] += 1
        if isinstance(desc, ContextInvDesc):
            if desc.rsvd or not desc.granularity:
                return False
            self._invalidate_context(desc.granularity, desc.did, desc.sid, desc.fm)
        elif isinstance(desc, IotlbInvDesc):
            if desc.rsvd or not desc.granularity:
                return False
            self._invalidate_iotlb(desc.granularity, desc.did, desc.addr, desc.am, desc.ih)
        elif isinstance(desc, DevIotlbInvDesc):
            if desc.rsvd:
                return False
            base, size = desc.span()
            self.device_tlb.invalidate(desc.sid, base, size)
            self.counters_["inv_device_iotlb"] += 1
        elif isinstance(desc, IecInvDesc):
            self.counters_["inv_interrupt_entry"] += 1
        else:
            if desc.rsvd:
                return False
            self._wait(desc)
        return True

    def _wait(self, desc: WaitDesc) -> None:
        self.counters_["wait_descriptors"] += 1
        if desc.sw and desc.status_addr + 4 <= self.dram_limit:
            self.memory.write_u32(desc.status_addr, desc.status_data)
        if desc.if_:
            ics = self.regs["ICS"]
            if not ics.value & ICS_IWC:
                ics.value |= ICS_IWC
                iectl = self.regs["IECTL"]
                if iectl.value & IECTL_IM:
                    iectl.value |= IECTL_IP
                else:
                    self.inv_irq.fire()

    # -- faults ----------------------------------------------------------------------------------------------

    def _fault_event(self) -> None:
        fectl = self.regs["FECTL"]
        if fectl.value & FECTL_IM:
            fectl.value |= FECTL_IP
        else:
            self.counters_["fault_interrupts"] += 1
            self.fault_irq.fire()

    def _record_fault(self, reason: FaultReason, sid: int, daddr: int, access: Perm) -> FaultRecord:
        record = FaultRecord(True, sid, int(reason), bool(access & Perm.R), daddr & ~0xFFF & _U64)
        fsts = self.regs["FSTS"]
        if fsts.value & FSTS.PFO:
            self.counters_["faults_dropped"] += 1
            return record
        idx = self._next_frcd
        hi_reg = self.regs[f"FRCD{idx}_HI"]
        if hi_reg.value >> 63:
            fsts.value |= FSTS.PFO
            self.counters_["faults_dropped"] += 1
            self.counters_["fault_overflows"] += 1
            self._fault_event()
            return record
        pending = self._read_fsts(fsts.value) & FSTS.PPF
        lo, hi = record.encode()
        self.regs[f"FRCD{idx}_LO"].value = lo
        hi_reg.value = hi
        self._next_frcd = (idx + 1) % self.cap.nfr
        self.counters_["faults_recorded"] += 1
        if not pending:
            fsts.value = (fsts.value & ~(0xFF << FSTS.FRI_SHIFT)) | idx << FSTS.FRI_SHIFT
            self._fault_event()
        return record

    def _fault(self, exc: _Fault, sid: int, daddr: int, access: Perm) -> DmaFault:
        reason = exc.reason
        self.counters_["faults"] += 1
        self.counters_[f"fault_{int(reason):#x}"] += 1
        bdf = f"{sid >> 8:02x}:{sid >> 3 & 0x1F:02x}.{sid & 7}"
        if exc.fpd:
            self.counters_["faults_unrecorded_fpd"] += 1
            record = FaultRecord(True, sid, int(reason), bool(access & Perm.R), daddr & ~0xFFF & _U64)
        else:
            record = self._record_fault(reason, sid, daddr, access)
        kind = "read" if access & Perm.R else "write"
        return DmaFault(
            f"{self.name}: {kind} by {bdf} at {daddr:#x} blocked: {reason.text} (reason {int(reason):#x})",
            record=record,
        )

    # -- translation -----------------------------------------------------------------------------------------

    def _in_dram(self, maddr: int, length: int = 8) -> bool:
        return maddr >= 0 and maddr + length <= self.dram_limit

    def _context(self, sid: int) -> CtxInfo:
        info = self.context_cache.get(sid)
        if info is not None:
            if not info.present:
                raise _Fault(FaultReason.CONTEXT_NOT_PRESENT)
            return info
        info = self._read_context(sid)
        self.context_cache.put(sid, info)
        return info

    def _read_context(self, sid: int) -> CtxInfo:
        self.counters_["context_walks"] += 1
        rta = self._root_table
        if rta is None or not self._in_dram(rta, 4096):
            raise _Fault(FaultReason.ROOT_TABLE_INVALID)
        bus, devfn = sid >> 8, sid & 0xFF
        rlo, rhi = self.memory.read_u64(rta + 16 * bus), self.memory.read_u64(rta + 16 * bus + 8)
        root = RootEntry.decode(rlo, rhi)
        if not root.present:
            self._maybe_cache_not_present(sid)
            raise _Fault(FaultReason.ROOT_NOT_PRESENT)
        if root_reserved(rlo, rhi, self.haw):
            raise _Fault(FaultReason.ROOT_RESERVED)
        if not self._in_dram(root.ctp, 4096):
            raise _Fault(FaultReason.CONTEXT_TABLE_INVALID)
        clo, chi = self.memory.read_u64(root.ctp + 16 * devfn), self.memory.read_u64(root.ctp + 16 * devfn + 8)
        ctx = ContextEntry.decode(clo, chi)
        if not ctx.present:
            self._maybe_cache_not_present(sid)
            raise _Fault(FaultReason.CONTEXT_NOT_PRESENT)
        if context_reserved(clo, chi, self.haw):
            raise _Fault(FaultReason.CONTEXT_RESERVED, ctx.fpd)
        t = ctx.t
        if (
            t == TranslationType.RESERVED
            or (t == TranslationType.DEVICE_TLB and not self.ecap.dt)
            or (t == TranslationType.PASS_THROUGH and not self.ecap.pt)
            or (t != TranslationType.PASS_THROUGH and not self.cap.supports_agaw(ctx.aw))
        ):
            raise _Fault(FaultReason.CONTEXT_INVALID, ctx.fpd)
        levels = agaw_to_levels(ctx.aw)
        width = min(self.cap.mgaw, agaw_to_width(ctx.aw))
        return CtxInfo(True, ctx.did, t, ctx.slptptr, levels, width, ctx.fpd)

    def _maybe_cache_not_present(self, sid: int) -> None:
        if self.cap.cm:
            self.context_cache.put(sid, CtxInfo(False, did=0))

    def translate(self, source_id: int, daddr: int, access: Perm) -> Translation:
        """Translate one untranslated request, or record the fault and raise ``DmaFault``."""
        with self.lock:
            return self._translate(source_id, daddr, access)

    def _translate(self, source_id: int, daddr: int, access: Perm) -> Translation:
        if not self.translation_enabled:
            self.counters_["untranslated"] += 1
            return Translation(daddr, PAGE_SHIFT, Perm.RW, cached=False)
        fpd = False
        try:
            ctx = self._context(source_id)
            fpd = ctx.fpd
            if ctx.t == TranslationType.PASS_THROUGH:
                self.counters_["pass_through"] += 1
                return Translation(daddr, PAGE_SHIFT, Perm.RW, cached=False)
            return self._translate_in(ctx, daddr, access)
        except _Fault as exc:
            exc.fpd = exc.fpd or fpd
            raise self._fault(exc, source_id, daddr, access) from None

    def ats_translate(self, source_id: int, daddr: int, access: Perm) -> Translation:
        """A device's ATS translation request: served only for device-TLB contexts (T=1)."""
        with self.lock:
            return self._ats_translate(source_id, daddr, access)

    def _ats_translate(self, source_id: int, daddr: int, access: Perm) -> Translation:
        try:
            ctx = self._context(source_id)
            if ctx.t != TranslationType.DEVICE_TLB:
                raise _Fault(FaultReason.TRANSLATION_BLOCKED, ctx.fpd)
            tr = self._translate_in(ctx, daddr, access)
        except _Fault as exc:
            raise self._fault(exc, source_id, daddr, access) from None
        page = tr.maddr & ~((1 << tr.page_shift) - 1)
        self.device_tlb.put(source_id, daddr, AtsEntry(page, tr.page_shift, tr.perms))
        return tr

    def _translate_in(self, ctx: CtxInfo, daddr: int, access: Perm) -> Translation:
        if daddr >> ctx.width:
            raise _Fault(FaultReason.BEYOND_MGAW, ctx.fpd)
        hit = self.iotlb.lookup(ctx.did, daddr)
        if hit is not None:
            self._check(hit.perms, access, ctx.fpd)
            return Translation(hit.translate(daddr), hit.page_shift, hit.perms, cached=True)
        if self.cap.cm and self.negative.hit(ctx.did, daddr):
            raise _Fault(FaultReason.WRITE_DENIED if access & Perm.W else FaultReason.READ_DENIED, ctx.fpd)
        entry = self._walk(ctx, daddr, access)
        self.iotlb.insert(entry)
        self._check(entry.perms, access, ctx.fpd)
        return Translation(entry.translate(daddr), entry.page_shift, entry.perms, cached=False)

    @staticmethod
    def _check(perms: Perm, access: Perm, fpd: bool) -> None:
        if access & Perm.W and not perms & Perm.W:
            raise _Fault(FaultReason.WRITE_DENIED, fpd)
        if access & Perm.R and not perms & Perm.R:
            raise _Fault(FaultReason.READ_DENIED, fpd)

    def _walk(self, ctx: CtxInfo, daddr: int, access: Perm) -> IotlbEntry:
        self.counters_["walks"] += 1
        pde = self.pde_cache.get(ctx.did, daddr) if ctx.levels > 1 else None
        if pde is not None:
            table, level, perms = pde.table, 1, pde.perms
        else:
            table, level, perms = ctx.slptptr >> PAGE_SHIFT, ctx.levels, Perm.RW
        denied = FaultReason.WRITE_DENIED if access & Perm.W else FaultReason.READ_DENIED
        while True:
            if not self._in_dram(table << PAGE_SHIFT, 4096):
                raise _Fault(FaultReason.NEXT_TABLE_INVALID, ctx.fpd)
            idx = (daddr >> (PAGE_SHIFT + 9 * (level - 1))) & 511
            raw = self.memory.load_word(table, idx)
            d = self.fmt.decode(raw, level)
            if d.kind == EntryKind.EMPTY:
                if self.cap.cm:
                    self.negative.put(ctx.did, daddr)
                raise _Fault(denied, ctx.fpd)
            if d.kind == EntryKind.MALFORMED:
                raise _Fault(FaultReason.PTE_RESERVED, ctx.fpd)
            perms &= d.perms
            if d.kind == EntryKind.TABLE:
                table = d.address >> PAGE_SHIFT
                level -= 1
                if level == 1:
                    self.pde_cache.put(ctx.did, daddr, PdeEntry(table, perms))
                continue
            shift = d.page_shift
            page_base = d.address & ~((1 << shift) - 1)
            return IotlbEntry(ctx.did, daddr >> shift, shift, page_base, perms)

    # -- what the unit did ---------------------------------------------------------------------------------

    def counters(self) -> Mapping[str, int]:
        return dict(self.counters_)

    def fault_records(self) -> list[FaultRecord]:
        """Every fault-recording register, decoded (for tools; software reads the registers)."""
        return [
            FaultRecord.decode(self.regs.get(f"FRCD{i}_LO"), self.regs.get(f"FRCD{i}_HI")) for i in range(self.cap.nfr)
        ]

    # -- many translations at once (``iommusim.hw.batch.BatchTranslator``) ---------------------------------

    def _bypassing_caches(self) -> AbstractContextManager[None]:
        return bypassing_caches(self)

    def _batch_plan(self, source_id: int) -> BatchPlan | None:
        """The device's cached context (what ``translate`` would use), or None to let ``translate`` answer."""
        volatile = self.fault_irq.handler is not None
        if not self.translation_enabled:
            return IdentityPlan(self.counters_, {"untranslated": 1}, volatile=volatile)
        cached = self.context_cache._c
        info = cached.peek(source_id)
        if info is None or not info.present:
            return None
        if info.t == TranslationType.PASS_THROUGH:
            touch = partial(cached._d.move_to_end, source_id)
            return IdentityPlan(self.counters_, {"ctx_hits": 1, "pass_through": 1}, volatile=volatile, touch=touch)
        return VtdPlan(self, source_id, info)
