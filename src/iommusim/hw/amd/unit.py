"""One AMD IOMMU: registers, command processor, event log, caches and DMA translation.

The unit sees only machine memory and its own MMIO registers.  Software programs it by writing the
registers of ``iommusim.hw.amd.regs`` (device-table, command-buffer and event-log bases, control) and by
putting commands in the ring and moving the tail pointer; the unit answers by executing the commands in
order, storing completion-wait data, setting status bits, writing events into the log in memory and
calling the interrupt callback software registered (``irq_handler``), the model's MSI.

Caches: device-table entries (by device id), the IOTLB (by domain id, pages of every size the tables can
express, LRU) and, for devices whose DTE sets I, the device's own remote IOTLB (the ATS cache, by device
id).  Each is dropped only by eviction or by the invalidation command that covers it; faulting walks are
never cached.  A missing INVALIDATE_DEVTAB_ENTRY, INVALIDATE_IOMMU_PAGES or INVALIDATE_IOTLB_PAGES is
therefore visible as DMA that still follows the old entry.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from functools import partial
from typing import NoReturn

from iommusim.errors import BadAddress, DmaFault
from iommusim.hw.amd import regs
from iommusim.hw.amd.batch import AmdPlan, bypassing_caches, excluded
from iommusim.hw.amd.structs import (
    CMD_SIZE,
    DTE_SIZE,
    EVENT_SIZE,
    HW_ERROR_MASTER_ABORT,
    Command,
    CompletionWait,
    Dte,
    Event,
    EventCode,
    EventFlag,
    IllegalCommand,
    InvalidateDevtabEntry,
    InvalidateIntTable,
    InvalidateIommuAll,
    InvalidateIommuPages,
    InvalidateIotlbPages,
    decode_command,
    dte_reserved_bits,
    words32,
)
from iommusim.hw.amd.walker import WalkFault, WalkHit, walk_v1
from iommusim.hw.base import Translation
from iommusim.hw.fastbatch import BatchPlan, FastBatchMethods, IdentityPlan
from iommusim.hw.iotlb import Iotlb, IotlbEntry, LruCache
from iommusim.hw.mmio import Register, RegisterBlock
from iommusim.machine.memory import MachineMemory
from iommusim.perms import Perm

__all__ = ["COUNTER_NAMES", "AmdIommu"]

#: Every page size a v1 table can express: 4 KiB leaves up to the 2**52-byte NextLevel-7 ceiling.
_PAGE_SHIFTS = tuple(range(12, 53))
_WHOLE_SPACE = 1 << 64
#: Counters every unit reports, zero until something happens.
COUNTER_NAMES = (
    "translations",
    "iotlb_hits",
    "iotlb_misses",
    "iotlb_evictions",
    "walks",
    "walk_reads",
    "dte_cache_hits",
    "dte_cache_misses",
    "passthrough",
    "untranslated",
    "faults",
    "events",
    "events_logged",
    "events_dropped",
    "events_suppressed",
    "event_overflows",
    "interrupts",
    "commands",
    "cmd_completion_wait",
    "cmd_inv_devtab_entry",
    "cmd_inv_pages_page",
    "cmd_inv_pages_range",
    "cmd_inv_pages_domain",
    "cmd_inv_pages_pde",
    "cmd_inv_iotlb_pages",
    "cmd_inv_int_table",
    "cmd_inv_iommu_all",
    "cmd_illegal",
    "atc_hits",
    "atc_misses",
)


class _Registers(RegisterBlock):
    """A register block that tells the unit after each software write, so it can act on the new value."""

    def __init__(self, name: str, after_write: Callable[[int], None], lock: threading.RLock) -> None:
        super().__init__(name, regs.MMIO_SIZE, lock=lock)
        self._after_write = after_write
        self._unit_lock = lock

    def write(self, offset: int, value: int, size: int = 4) -> None:
        with self._unit_lock:  # the write and the commands it makes the unit run, as one step
            super().write(offset, value, size)
            self._after_write(offset & ~7)


class AmdIommu(FastBatchMethods):
    """The silicon half of one AMD IOMMU (implements ``iommusim.hw.base.DmaRemapper``)."""

    def __init__(
        self,
        name: str,
        memory: MachineMemory,
        *,
        iotlb_entries: int = 1024,
        dte_cache_entries: int = 64,
        atc_entries: int = 32,
        paging_levels: int = 6,
        ia_sup: bool = True,
        iotlb_sup: bool = True,
    ) -> None:
        self.name = name
        self.memory = memory
        self.paging_levels = paging_levels
        self.ia_sup = ia_sup
        self.stats: Counter[str] = Counter(dict.fromkeys(COUNTER_NAMES, 0))
        self.iotlb = Iotlb(iotlb_entries, page_shifts=_PAGE_SHIFTS, counters=self.stats)
        self.dte_cache: LruCache[int, tuple[int, int, int, int]] = LruCache(dte_cache_entries, self.stats, "dte_cache")
        self.atc_entries = atc_entries
        self._atc: dict[int, Iotlb] = {}
        #: The PCI capability header firmware and software read (IotlbSup, EFRSup).
        self.cap_header = regs.CAP_EFR_SUP | (regs.CAP_IOTLB_SUP if iotlb_sup else 0)
        #: Called when the unit raises its interrupt (event logged, overflow, completion wait).
        self.irq_handler: Callable[[], None] | None = None
        self._cmd_stopped = False  # an illegal command or a hardware error halted the command processor
        self._evt_stopped = False  # the event log overflowed and logging stopped
        self._fault_reported: set[int] = set()  # devices with a logged fault (DTE.SE suppression)
        self._processing = False
        #: Why the command processor last halted (empty while it never has).
        self.last_command_error = ""
        #: Held by a translation from cache lookup to cache fill, and by every register write with the
        #: commands it runs: an invalidation never completes while a walk that read the old entries has
        #: yet to cache its result.
        self.lock = threading.RLock()
        self.mmio = _Registers(name, self._after_write, self.lock)
        self._build_registers()

    # -- registers -----------------------------------------------------------------------------------

    def _build_registers(self) -> None:
        m = self.mmio
        base_and_len = regs.BASE_ADDR_MASK | regs.RING_LEN_MASK
        self._devtab = m.add(Register("DevTabBase", regs.DEV_TAB_BASE, writable=regs.BASE_ADDR_MASK | 0x1FF))
        self._cmdbase = m.add(Register("CmdBufBase", regs.CMD_BUF_BASE, writable=base_and_len))
        self._evtbase = m.add(Register("EventLogBase", regs.EVT_LOG_BASE, writable=base_and_len))
        self._ctrl = m.add(Register("Control", regs.CONTROL, writable=regs.CTRL_WRITABLE))
        self._exbase = m.add(
            Register("ExclBase", regs.EXCL_BASE, writable=regs.BASE_ADDR_MASK | regs.EXCL_ALLOW | regs.EXCL_ENABLE)
        )
        self._exlimit = m.add(
            Register("ExclLimit", regs.EXCL_LIMIT, writable=regs.BASE_ADDR_MASK, on_read=lambda v: v | 0xFFF)
        )
        hats = regs.hats_for_levels(self.paging_levels) << regs.EFR_HATS_SHIFT
        self.efr = hats | (regs.EFR_IA_SUP if self.ia_sup else 0)
        m.add(Register("ExtFeature", regs.EXT_FEATURE, reset=self.efr))
        self._cmdhead = m.add(Register("CmdBufHead", regs.CMD_BUF_HEAD, writable=regs.RING_PTR_MASK))
        self._cmdtail = m.add(Register("CmdBufTail", regs.CMD_BUF_TAIL, writable=regs.RING_PTR_MASK))
        self._evthead = m.add(Register("EventLogHead", regs.EVT_LOG_HEAD, writable=regs.RING_PTR_MASK))
        self._evttail = m.add(Register("EventLogTail", regs.EVT_LOG_TAIL, writable=regs.RING_PTR_MASK))
        self._status = m.add(Register("Status", regs.STATUS, w1c=regs.STATUS_W1C, on_read=self._status_read))

    def _status_read(self, stored: int) -> int:
        return (
            stored
            | (regs.STATUS_EVENT_LOG_RUN if self._event_log_running() else 0)
            | (regs.STATUS_CMD_BUF_RUN if self._cmd_running() else 0)
        )

    def _after_write(self, offset: int) -> None:
        if offset == regs.CONTROL:
            ctrl = self._ctrl.value
            if not ctrl & regs.CTRL_CMD_BUF_EN:
                self._cmd_stopped = False  # re-enabling restarts a halted command processor
            if not ctrl & regs.CTRL_EVENT_LOG_EN:
                self._evt_stopped = False  # re-enabling restarts logging stopped by an overflow
            self.process_commands()
        elif offset == regs.CMD_BUF_TAIL:
            self.process_commands()

    @property
    def enabled(self) -> bool:
        return bool(self._ctrl.value & regs.CTRL_IOMMU_EN)

    def _cmd_running(self) -> bool:
        need = regs.CTRL_IOMMU_EN | regs.CTRL_CMD_BUF_EN
        return self._ctrl.value & need == need and not self._cmd_stopped

    def _event_log_running(self) -> bool:
        need = regs.CTRL_IOMMU_EN | regs.CTRL_EVENT_LOG_EN
        return (
            self._ctrl.value & need == need
            and not self._evt_stopped
            and not self._status.value & regs.STATUS_EVENT_OVERFLOW
        )

    def _raise_irq(self) -> None:
        self.stats["interrupts"] += 1
        if self.irq_handler is not None:
            self.irq_handler()

    # -- command processor ------------------------------------------------------------------------------

    def process_commands(self) -> int:
        """Execute commands from the head up to the tail; returns how many ran."""
        if self._processing or not self._cmd_running():
            return 0
        entries = regs.entries_of_ring(self._cmdbase.value)
        if not entries:
            return 0
        base = self._cmdbase.value & regs.BASE_ADDR_MASK
        done = 0
        self._processing = True
        try:
            while self._cmd_running():
                head = regs.ring_ptr(self._cmdhead.value) % entries
                tail = regs.ring_ptr(self._cmdtail.value) % entries
                if head == tail:
                    break
                slot = base + head * CMD_SIZE
                try:
                    q0 = self.memory.read_u64(slot)
                    q1 = self.memory.read_u64(slot + 8)
                    cmd = decode_command(words32((q0, q1)), ia_sup=self.ia_sup)
                    self._execute(cmd)
                except IllegalCommand as exc:
                    self.stats["cmd_illegal"] += 1
                    self._halt_commands(Event(EventCode.ILLEGAL_COMMAND_ERROR, address=slot), str(exc))
                    break
                except BadAddress:
                    flags = HW_ERROR_MASTER_ABORT << 9
                    self._halt_commands(Event(EventCode.COMMAND_HARDWARE_ERROR, flags=flags, address=slot), "")
                    break
                self._cmdhead.value = regs.ring_ptr_value((head + 1) % entries)
                done += 1
        finally:
            self._processing = False
        return done

    def _halt_commands(self, event: Event, why: str) -> None:
        """Stop at the offending command (the head stays on it) and report it in the event log."""
        self._cmd_stopped = True
        self.stats["cmd_halts"] += 1
        self.last_command_error = why
        self._log_event(event)

    def _execute(self, cmd: Command) -> None:
        s = self.stats
        s["commands"] += 1
        if isinstance(cmd, CompletionWait):
            s["cmd_completion_wait"] += 1
            if cmd.store:
                self.memory.write_u64(cmd.store_address, cmd.store_data)
            if cmd.interrupt:
                self._status.value |= regs.STATUS_COM_WAIT_INT
                if self._ctrl.value & regs.CTRL_COM_WAIT_INT_EN:
                    self._raise_irq()
        elif isinstance(cmd, InvalidateDevtabEntry):
            s["cmd_inv_devtab_entry"] += 1
            self.dte_cache.pop(cmd.device_id)
            self._fault_reported.discard(cmd.device_id)
        elif isinstance(cmd, InvalidateIommuPages):
            base, size = cmd.range()
            if size >= _WHOLE_SPACE:
                s["cmd_inv_pages_domain"] += 1
                self.iotlb.invalidate_tag(cmd.domain_id)
            else:
                s["cmd_inv_pages_range" if cmd.size else "cmd_inv_pages_page"] += 1
                self.iotlb.invalidate_range(cmd.domain_id, base, size)
            if cmd.pde:
                s["cmd_inv_pages_pde"] += 1
        elif isinstance(cmd, InvalidateIotlbPages):
            s["cmd_inv_iotlb_pages"] += 1
            atc = self._atc.get(cmd.device_id)
            if atc is not None:
                base, size = cmd.range()
                dropped = (
                    atc.invalidate_tag(cmd.device_id)
                    if size >= _WHOLE_SPACE
                    else atc.invalidate_range(cmd.device_id, base, size)
                )
                s["atc_invalidated"] += dropped
        elif isinstance(cmd, InvalidateIntTable):
            s["cmd_inv_int_table"] += 1  # no interrupt remapping cache is modelled: nothing else to drop
        elif isinstance(cmd, InvalidateIommuAll):
            s["cmd_inv_iommu_all"] += 1
            self.dte_cache.clear()
            self.iotlb.invalidate_all()
            self._fault_reported.clear()

    # -- event log ------------------------------------------------------------------------------------------

    def _log_event(self, event: Event) -> None:
        s = self.stats
        s["events"] += 1
        s[f"event_{event.name.lower()}"] += 1
        if not self._event_log_running():
            s["events_dropped"] += 1
            return
        entries = regs.entries_of_ring(self._evtbase.value)
        if not entries:
            s["events_dropped"] += 1
            return
        head = regs.ring_ptr(self._evthead.value) % entries
        tail = regs.ring_ptr(self._evttail.value) % entries
        nxt = (tail + 1) % entries
        if nxt == head:
            # No free slot: the event is lost, EventOverflow is set and logging stops until software
            # clears the overflow and re-enables the log.
            self._status.value |= regs.STATUS_EVENT_OVERFLOW
            self._evt_stopped = True
            s["event_overflows"] += 1
            s["events_dropped"] += 1
            if self._ctrl.value & regs.CTRL_EVENT_INT_EN:
                self._raise_irq()
            return
        slot = (self._evtbase.value & regs.BASE_ADDR_MASK) + tail * EVENT_SIZE
        w0, w1, w2, w3 = event.words()
        try:
            self.memory.write_u64(slot, w0 | (w1 << 32))
            self.memory.write_u64(slot + 8, w2 | (w3 << 32))
        except BadAddress:
            s["events_dropped"] += 1
            return
        self._evttail.value = regs.ring_ptr_value(nxt)
        self._status.value |= regs.STATUS_EVENT_LOG_INT
        s["events_logged"] += 1
        if self._ctrl.value & regs.CTRL_EVENT_INT_EN:
            self._raise_irq()

    # -- DMA translation --------------------------------------------------------------------------------------

    def _fault(self, event: Event, message: str, dte: Dte | None = None) -> NoReturn:
        """Record a refused access (unless the DTE suppresses it) and abort the transaction."""
        self.stats["faults"] += 1
        suppress = (
            event.code == EventCode.IO_PAGE_FAULT
            and dte is not None
            and dte.valid
            and (dte.suppress_all or (dte.suppress_events and event.device_id in self._fault_reported))
        )
        if suppress:
            self.stats["events_suppressed"] += 1
        else:
            self._fault_reported.add(event.device_id)
            self._log_event(event)
        raise DmaFault(f"{self.name}: {event.name} device {event.device_id:#06x}: {message}", record=event)

    def _read_dte(self, devid: int, daddr: int, rw: int) -> tuple[tuple[int, int, int, int], bool]:
        """The device's DTE quadwords, and whether they came from the DTE cache."""
        cached = self.dte_cache.get(devid)
        if cached is not None:
            return cached, True
        reg = self._devtab.value
        entries = ((reg & regs.DEV_TAB_SIZE_MASK) + 1) * (4096 // DTE_SIZE)
        if devid >= entries:
            event = Event(EventCode.IO_PAGE_FAULT, devid, 0, rw, daddr)
            self._fault(event, f"device id beyond the {entries}-entry device table")
        where = (reg & regs.BASE_ADDR_MASK) + devid * DTE_SIZE
        try:
            qws = tuple(self.memory.read_u64(where + 8 * i) for i in range(4))
        except BadAddress:
            flags = rw | (HW_ERROR_MASTER_ABORT << 9)
            self._fault(Event(EventCode.DEV_TAB_HARDWARE_ERROR, devid, 0, flags, where), "device table unreadable")
        return (qws[0], qws[1], qws[2], qws[3]), False

    def _excluded(self, dte: Dte, daddr: int) -> bool:
        ex = self._exbase.value
        if not ex & regs.EXCL_ENABLE or not (ex & regs.EXCL_ALLOW or dte.allow_exclusion):
            return False
        return (ex & regs.BASE_ADDR_MASK) <= daddr <= (self._exlimit.value | 0xFFF)

    def _atc_for(self, devid: int) -> Iotlb:
        atc = self._atc.get(devid)
        if atc is None:
            atc = self._atc[devid] = Iotlb(self.atc_entries, page_shifts=_PAGE_SHIFTS)
        return atc

    def translate(self, source_id: int, daddr: int, access: Perm) -> Translation:
        with self.lock:
            return self._translate(source_id, daddr, access)

    def _translate(self, source_id: int, daddr: int, access: Perm) -> Translation:
        s = self.stats
        s["translations"] += 1
        if not self.enabled:
            s["untranslated"] += 1
            return Translation(daddr, 12, Perm.RW, False)
        devid = source_id & 0xFFFF
        rw = int(EventFlag.RW) if access & Perm.W else 0
        qws, from_cache = self._read_dte(devid, daddr, rw)
        dte = Dte.from_qwords(qws)
        if not dte.valid:
            # V=0: the entry says nothing about this device, and its DMA passes untranslated and unchecked.
            if not from_cache:
                self.dte_cache.put(devid, qws)
            s["passthrough"] += 1
            return Translation(daddr, 12, Perm.RW, False)
        if dte_reserved_bits(qws):
            event = Event(EventCode.ILLEGAL_DEV_TABLE_ENTRY, devid, 0, rw | EventFlag.RZ, daddr)
            self._fault(event, "reserved DTE bits set", dte)
        if dte.translation_valid and (dte.mode == 7 or dte.mode > self.paging_levels):
            event = Event(EventCode.ILLEGAL_DEV_TABLE_ENTRY, devid, 0, rw, daddr)
            self._fault(event, f"paging mode {dte.mode} is not implemented", dte)
        if not from_cache:
            self.dte_cache.put(devid, qws)
        if self._excluded(dte, daddr):
            s["excluded"] += 1
            return Translation(daddr, 12, Perm.RW, False)
        if not dte.translation_valid:
            event = Event(EventCode.IO_PAGE_FAULT, devid, dte.domain_id, rw, daddr)
            self._fault(event, "DTE has no valid translation information (TV=0)", dte)
        dte_perms = Perm((int(dte.ir)) | (int(dte.iw) << 1))
        if access & ~dte_perms:
            event = Event(EventCode.IO_PAGE_FAULT, devid, dte.domain_id, rw | EventFlag.PR | EventFlag.PE, daddr)
            self._fault(event, f"DTE denies {access.short()}", dte)
        if dte.mode == 0:
            s["untranslated_mode0"] += 1
            return Translation(daddr, 12, dte_perms, False)
        if dte.iotlb:
            hit = self._atc_for(devid).lookup(devid, daddr)
            if hit is not None and not access & ~hit.perms:
                s["atc_hits"] += 1
                return Translation(hit.translate(daddr), hit.page_shift, hit.perms, True)
            s["atc_misses"] += 1
        else:
            self._atc.pop(devid, None)  # a device without ATS enabled keeps no translations of its own
        entry = self.iotlb.lookup(dte.domain_id, daddr)
        if entry is not None:
            if access & ~entry.perms:
                flags = rw | EventFlag.PR | EventFlag.PE
                self._fault(Event(EventCode.IO_PAGE_FAULT, devid, dte.domain_id, flags, daddr), "denied", dte)
            return Translation(entry.translate(daddr), entry.page_shift, entry.perms, True)
        s["walks"] += 1
        outcome = walk_v1(self.memory, dte.root, dte.mode, daddr, access, dte_perms, max_levels=self.paging_levels)
        s["walk_reads"] += outcome.reads
        if isinstance(outcome, WalkFault):
            event = Event(EventCode.IO_PAGE_FAULT, devid, dte.domain_id, rw | outcome.flags, daddr)
            self._fault(event, outcome.reason, dte)
        if not isinstance(outcome, WalkHit):
            flags = rw | (HW_ERROR_MASTER_ABORT << 9)
            event = Event(EventCode.PAGE_TAB_HARDWARE_ERROR, devid, dte.domain_id, flags, outcome.entry_maddr)
            self._fault(event, "page table unreadable", dte)
        cached = IotlbEntry(dte.domain_id, daddr >> outcome.page_shift, outcome.page_shift, outcome.base, outcome.perms)
        self.iotlb.insert(cached)
        if dte.iotlb:
            self._atc_for(devid).insert(IotlbEntry(devid, cached.page, cached.page_shift, cached.out, cached.perms))
            s["atc_fills"] += 1
        return Translation(cached.translate(daddr), outcome.page_shift, outcome.perms, False)

    # -- observability --------------------------------------------------------------------------------------

    def atc(self, devid: int) -> Iotlb | None:
        """The remote IOTLB the model keeps for a device with DTE.I set (None if it has none)."""
        return self._atc.get(devid)

    def atcs(self) -> dict[int, Iotlb]:
        """Every device's remote IOTLB the model keeps, by device id (for inspection tools)."""
        return dict(self._atc)

    def counters(self) -> Mapping[str, int]:
        out = dict(self.stats)
        out["iotlb_size"] = len(self.iotlb)
        out["dte_cache_size"] = len(self.dte_cache)
        return out

    # -- many translations at once (``iommusim.hw.batch.BatchTranslator``) ---------------------------------

    def _bypassing_caches(self) -> AbstractContextManager[None]:
        return bypassing_caches(self)

    def _batch_plan(self, source_id: int) -> BatchPlan | None:
        """The device's cached DTE when it describes a plain walk (see ``hw.amd.batch``) or untranslated DMA
        (the unit off, V=0, paging mode 0), or None to let ``translate`` answer."""
        volatile = self.irq_handler is not None
        if not self.enabled:
            return IdentityPlan(self.stats, {"translations": 1, "untranslated": 1}, volatile=volatile)
        devid = source_id & 0xFFFF
        qws = self.dte_cache.peek(devid)
        if qws is None:
            return None
        dte = Dte.from_qwords(qws)
        touch = partial(self.dte_cache._d.move_to_end, devid)
        if not dte.valid:
            counts = {"translations": 1, "dte_cache_hits": 1, "passthrough": 1}
            return IdentityPlan(self.stats, counts, volatile=volatile, touch=touch)
        if not dte.translation_valid or dte_reserved_bits(qws):
            return None
        if dte.mode == 0:
            counts = {"translations": 1, "dte_cache_hits": 1, "untranslated_mode0": 1}
            perms = int(dte.ir) | int(dte.iw) << 1
            refuse = partial(excluded, self, dte)
            return IdentityPlan(self.stats, counts, volatile=volatile, touch=touch, perms=perms, refuse=refuse)
        if dte.iotlb or not 1 <= dte.mode <= min(6, self.paging_levels):
            return None
        return AmdPlan(self, devid, dte)
