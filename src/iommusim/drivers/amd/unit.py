"""The driver's handle on one AMD IOMMU (Xen's struct amd_iommu): its rings in memory and its commands.

Everything here goes through the unit's MMIO window and machine memory: the command buffer is a ring the
driver fills at its software tail and publishes by writing the tail register; completion is observed by
polling the store a COMPLETION_WAIT makes to a semaphore page.  A full ring is waited out by re-reading
the hardware head (the modern Xen behaviour), or, with quirk ``amd-cmd-ring-drop``, the command is
silently dropped as the seed-era Xen did.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from iommusim.console import LogLevel
from iommusim.drivers.amd.ivrs import Ivhd
from iommusim.drivers.serialise import serialised
from iommusim.errors import OutOfMemory, TimedOut
from iommusim.frames import PAGE_SHIFT, Mfn
from iommusim.hw.amd import regs
from iommusim.hw.amd.structs import (
    CMD_SIZE,
    EVENT_SIZE,
    Command,
    CompletionWait,
    InvalidateDevtabEntry,
    InvalidateIntTable,
    InvalidateIommuAll,
    InvalidateIommuPages,
    InvalidateIotlbPages,
    invalidation_address,
)
from iommusim.hw.mmio import RegisterBlock
from iommusim.iommu.layer import Iommu

__all__ = ["CMD_ENTRIES_DEFAULT", "EVENT_ENTRIES_DEFAULT", "POLL_LIMIT", "Ring", "UnitHandle"]

CMD_ENTRIES_DEFAULT = 512  # Xen's IOMMU_CMD_BUFFER_DEFAULT_ENTRIES
EVENT_ENTRIES_DEFAULT = 512  # Xen's IOMMU_EVENT_LOG_DEFAULT_ENTRIES
POLL_LIMIT = 1000  # register or memory reads before giving up on the hardware


@dataclass
class Ring:
    """A ring buffer in machine memory: base frame, entries, and the software's own index."""

    base: Mfn
    entries: int
    entry_size: int
    index: int = 0  # software tail (command buffer) or head (event log)

    @property
    def pages(self) -> int:
        return max(1, (self.entries * self.entry_size) >> PAGE_SHIFT)

    def slot(self, i: int) -> int:
        return (self.base.value << PAGE_SHIFT) + i * self.entry_size


@dataclass
class UnitHandle:
    ivhd: Ivhd
    iommu: Iommu
    cmd_entries: int = CMD_ENTRIES_DEFAULT
    event_entries: int = EVENT_ENTRIES_DEFAULT
    cmd: Ring | None = None
    events: Ring | None = None
    semaphore: Mfn | None = None
    enabled: bool = False
    sequence: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    #: Xen's iommu->lock: the command ring's tail, the completion-wait semaphore and its sequence
    #: number are shared by every CPU that flushes through this unit.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    _ring_full_reported: bool = False

    @property
    def name(self) -> str:
        return self.ivhd.name

    @property
    def mmio(self) -> RegisterBlock:
        return self.ivhd.mmio

    def has_cap(self, bit: int) -> bool:
        return bool(self.ivhd.cap_header & bit)

    def has_feature(self, bit: int) -> bool:
        return bool(self.ivhd.mmio.read(regs.EXT_FEATURE, 8) & bit)

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    # -- allocation (hardware set-up) ---------------------------------------------------------------

    def allocate(self) -> None:
        """The command buffer, event log and completion semaphore; all or nothing (ENOMEM)."""
        alloc = self.iommu.machine.allocator
        done: list[tuple[Mfn, int]] = []
        try:
            cmd = Ring(Mfn(0), self.cmd_entries, CMD_SIZE)
            cmd.base = alloc.alloc(f"{self.name}:cmd-buffer", cmd.pages)
            done.append((cmd.base, cmd.pages))
            ev = Ring(Mfn(0), self.event_entries, EVENT_SIZE)
            ev.base = alloc.alloc(f"{self.name}:event-log", ev.pages)
            done.append((ev.base, ev.pages))
            sem = alloc.alloc(f"{self.name}:cwait-sem")
            done.append((sem, 1))
        except OutOfMemory:
            for base, pages in reversed(done):
                alloc.free(base, pages)
            raise
        self.cmd, self.events, self.semaphore = cmd, ev, sem

    def release(self) -> None:
        alloc = self.iommu.machine.allocator
        for ring in (self.cmd, self.events):
            if ring is not None:
                alloc.free(ring.base, ring.pages)
        if self.semaphore is not None:
            alloc.free(self.semaphore)
        self.cmd = self.events = None
        self.semaphore = None

    # -- enabling (Xen's enable_iommu / disable_iommu) ------------------------------------------------

    def _write64(self, offset: int, value: int) -> None:
        """Xen programs the base registers as two 32-bit writes, low half first."""
        self.mmio.write(offset, value & 0xFFFF_FFFF, 4)
        self.mmio.write(offset + 4, value >> 32, 4)

    def enable(self, devtab_maddr: int, devtab_pages: int) -> None:
        assert self.cmd is not None
        assert self.events is not None
        if self.enabled:
            return
        self._write64(regs.DEV_TAB_BASE, regs.dev_table_base_value(devtab_maddr, devtab_pages))
        self._write64(regs.CMD_BUF_BASE, regs.ring_base_value(self.cmd.base.value << PAGE_SHIFT, self.cmd.entries))
        self._write64(
            regs.EVT_LOG_BASE, regs.ring_base_value(self.events.base.value << PAGE_SHIFT, self.events.entries)
        )
        self._write64(regs.EXCL_LIMIT, 0)
        self._write64(regs.EXCL_BASE, 0)
        self.set_command_buffer(True)
        self.set_event_log(True)
        self._set_control(regs.CTRL_IOMMU_EN, True)
        if self.has_feature(regs.EFR_IA_SUP):
            self.send(InvalidateIommuAll())
            self.completion_wait()
        self.enabled = True

    def disable(self) -> None:
        if not self.enabled:
            return
        self.set_command_buffer(False)
        self.set_event_log(False)
        self._set_control(regs.CTRL_IOMMU_EN, False)
        self.enabled = False

    def _set_control(self, bits: int, on: bool) -> None:
        ctrl = self.mmio.read(regs.CONTROL)
        self.mmio.write(regs.CONTROL, (ctrl | bits) if on else (ctrl & ~bits))

    def set_command_buffer(self, on: bool) -> None:
        """Head and tail are reset to 0 before the buffer is (re-)enabled."""
        assert self.cmd is not None
        if on:
            self.mmio.write(regs.CMD_BUF_HEAD, 0, 8)
            self.mmio.write(regs.CMD_BUF_TAIL, 0, 8)
            self.cmd.index = 0
        self._set_control(regs.CTRL_CMD_BUF_EN, on)

    def set_event_log(self, on: bool) -> None:
        """Head and tail are reset to 0 before the log is enabled; completion-wait interrupts stay off."""
        assert self.events is not None
        ctrl = self.mmio.read(regs.CONTROL)
        if on:
            self.mmio.write(regs.EVT_LOG_HEAD, 0, 8)
            self.mmio.write(regs.EVT_LOG_TAIL, 0, 8)
            ctrl |= regs.CTRL_EVENT_INT_EN | regs.CTRL_EVENT_LOG_EN
        else:
            ctrl &= ~(regs.CTRL_EVENT_INT_EN | regs.CTRL_EVENT_LOG_EN)
        self.mmio.write(regs.CONTROL, ctrl & ~regs.CTRL_COM_WAIT_INT_EN)

    # -- the command buffer -------------------------------------------------------------------------------

    @serialised
    def send(self, cmd: Command) -> bool:
        """Copy a command into the ring at the software tail and publish it; False if it was dropped."""
        ring = self.cmd
        assert ring is not None
        nxt = (ring.index + 1) % ring.entries
        head = regs.ring_ptr(self.mmio.read(regs.CMD_BUF_HEAD))
        if nxt == head:
            if self.iommu.config.quirk("amd-cmd-ring-drop"):
                self._count("commands_dropped")
                return False
            head = self._wait_for_slot(nxt)
        words = cmd.words()
        mem = self.iommu.machine.memory
        slot = ring.slot(ring.index)
        mem.write_u64(slot, words[0] | (words[1] << 32))
        mem.write_u64(slot + 8, words[2] | (words[3] << 32))
        ring.index = nxt
        self._count("commands_sent")
        self.mmio.write(regs.CMD_BUF_TAIL, regs.ring_ptr_value(nxt))
        return True

    def _wait_for_slot(self, nxt: int) -> int:
        if not self._ring_full_reported:
            self._ring_full_reported = True
            self.iommu.console.printk(
                LogLevel.WARNING, f"AMD-Vi: {self.name}: command ring full, waiting for the IOMMU"
            )
        for _ in range(POLL_LIMIT):
            head = regs.ring_ptr(self.mmio.read(regs.CMD_BUF_HEAD))
            if head != nxt:
                return head
        self._count("ring_full_timeouts")
        raise TimedOut(f"{self.name}: the command ring stayed full: the IOMMU is not consuming commands")

    @serialised
    def completion_wait(self) -> bool:
        """Wait until every command queued so far has run (Xen's flush_command_buffer).

        The COMPLETION_WAIT stores a fresh sequence number to the semaphore page and sets ComWaitInt; the
        driver polls the store.  A timeout is reported at debug level and otherwise ignored, as in Xen.
        """
        assert self.semaphore is not None
        mem = self.iommu.machine.memory
        sem = self.semaphore.value << PAGE_SHIFT
        self.mmio.write(regs.STATUS, regs.STATUS_COM_WAIT_INT)
        self.sequence += 1
        mem.write_u64(sem, 0)
        self.send(CompletionWait(store=True, interrupt=True, store_address=sem, store_data=self.sequence))
        for _ in range(POLL_LIMIT):
            if mem.read_u64(sem) == self.sequence:
                self.mmio.write(regs.STATUS, regs.STATUS_COM_WAIT_INT)
                return True
        self._count("completion_wait_timeouts")
        if self.iommu.config.debug:
            self.iommu.console.printk(LogLevel.DEBUG, f"AMD-Vi: {self.name}: completion wait did not complete")
        return False

    # -- invalidations (each followed by a completion wait, as Xen sends them) -------------------------------

    @serialised
    def flush_device(self, device_id: int) -> None:
        self.send(InvalidateDevtabEntry(device_id))
        self.completion_wait()

    @serialised
    def flush_intremap(self, device_id: int) -> None:
        self.send(InvalidateIntTable(device_id))
        self.completion_wait()

    @serialised
    def flush_all_caches(self) -> None:
        self.send(InvalidateIommuAll())
        self.completion_wait()

    @serialised
    def invalidate_pages(self, domain_id: int, daddr: int, order: int) -> None:
        """INVALIDATE_IOMMU_PAGES for 2**order pages (orders 0, 9, 18) or, with the sentinel, everything."""
        if order not in (0, 9, 18):
            raise ValueError(f"Xen flushes orders 0, 9 and 18 only, not {order}")
        self.send(InvalidateIommuPages.for_order(domain_id, daddr, order))
        self.completion_wait()

    @serialised
    def invalidate_iotlb(self, device_id: int, maxpend: int, daddr: int, order: int) -> None:
        """INVALIDATE_IOTLB_PAGES for a device with ATS; queue id = device id, PASID 0."""
        address, s = invalidation_address(daddr, order)
        if self.iommu.config.quirk("amd-iotlb-s-bit-zero"):
            s = False
        self.send(InvalidateIotlbPages(device_id, address, s, maxpend=maxpend & 0xFF, queue_id=device_id))
        self.completion_wait()
