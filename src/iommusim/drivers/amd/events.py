"""The driver's event-log interrupt: read what the IOMMU logged, report it, keep the log going.

Xen's interrupt handler silences further event interrupts and leaves the work to a tasklet, which reads
every entry between the software head and the hardware tail, zeroes each one after use (the erratum-732
workaround relies on zeroed slots), publishes the new head, restarts the log after an overflow and turns
the interrupt back on.  The model runs the tasklet body at once.  An IO_PAGE_FAULT is logged at error
level with the domain, device id, address and flags the entry carries, and every device whose DMA uses
that requestor id gets one more fault counted against it (``check_disable_device``); other events are
only logged when debugging.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iommusim.console import LogLevel
from iommusim.hw.amd import regs
from iommusim.hw.amd.structs import Event, EventCode
from iommusim.iommu.devices import check_disable_device

if TYPE_CHECKING:
    from iommusim.drivers.amd.driver import AmdIommuDriver
    from iommusim.drivers.amd.unit import UnitHandle

__all__ = ["EventLogHandler"]

_MAX_RESCANS = 8  # bounded stand-in for Xen re-scheduling its tasklet


class EventLogHandler:
    """Bound to one unit; registered as that unit's interrupt callback."""

    def __init__(self, driver: AmdIommuDriver, unit: UnitHandle) -> None:
        self.driver = driver
        self.unit = unit
        self.entries_read = 0
        self.resets = 0

    def __call__(self) -> None:
        """The interrupt: mask event interrupts, then do the tasklet's work."""
        mmio = self.unit.mmio
        mmio.write(regs.CONTROL, mmio.read(regs.CONTROL) & ~regs.CTRL_EVENT_INT_EN)
        for _ in range(_MAX_RESCANS):
            if not self.check_event_log():
                break

    def check_event_log(self) -> bool:
        """Drain the log; returns True when the hardware raised the event interrupt again meanwhile."""
        mmio = self.unit.mmio
        mmio.write(regs.STATUS, regs.STATUS_EVENT_LOG_INT)
        self.read_log()
        status = mmio.read(regs.STATUS)
        if status & regs.STATUS_EVENT_OVERFLOW:
            self.reset_log()
        else:
            ctrl = mmio.read(regs.CONTROL)
            if not ctrl & regs.CTRL_EVENT_INT_EN:
                mmio.write(regs.CONTROL, ctrl | regs.CTRL_EVENT_INT_EN)
        return bool(mmio.read(regs.STATUS) & regs.STATUS_EVENT_LOG_INT)

    def read_log(self) -> int:
        ring = self.unit.events
        if ring is None:
            return 0
        mmio = self.unit.mmio
        mem = self.driver.iommu.machine.memory
        tail = regs.ring_ptr(mmio.read(regs.EVT_LOG_TAIL))
        n = 0
        while tail != ring.index:
            slot = ring.slot(ring.index)
            q0, q1 = mem.read_u64(slot), mem.read_u64(slot + 8)
            words = (q0 & 0xFFFF_FFFF, q0 >> 32, q1 & 0xFFFF_FFFF, q1 >> 32)
            if self.parse(words):
                mem.write_u64(slot, 0)
                mem.write_u64(slot + 8, 0)
            ring.index = (ring.index + 1) % ring.entries
            mmio.write(regs.EVT_LOG_HEAD, regs.ring_ptr_value(ring.index))
            n += 1
        self.entries_read += n
        return n

    def parse(self, words: tuple[int, int, int, int]) -> bool:
        """Report one entry; False for a slot the hardware has not filled in (nothing to clear)."""
        iommu = self.driver.iommu
        event = Event.from_words(words)
        if event is None:
            if iommu.config.debug:
                iommu.console.printk(LogLevel.DEBUG, f"AMD-Vi: {self.unit.name}: no event written to the log")
            return False
        if event.code == EventCode.IO_PAGE_FAULT:
            iommu.console.printk(
                LogLevel.ERR,
                f"AMD-Vi: {self.unit.name}: IO_PAGE_FAULT from device id {event.device_id:#06x} in domain "
                f"{event.domain_id} at address {event.address:#x} (flags {event.flags:#05x})",
            )
            for dev in list(iommu.machine.pci):
                if self.driver.requestor_id(dev.sbdf.bdf) == event.device_id:
                    check_disable_device(iommu, dev)
        elif iommu.config.debug:
            w = " ".join(f"{x:08x}" for x in words)
            iommu.console.printk(LogLevel.DEBUG, f"AMD-Vi: {self.unit.name}: {event.name} {w}")
        return True

    def reset_log(self) -> None:
        """Restart logging after an overflow: wait until it stopped, disable, clear, re-enable."""
        mmio = self.unit.mmio
        iommu = self.driver.iommu
        for _ in range(1000):
            if not mmio.read(regs.STATUS) & regs.STATUS_EVENT_LOG_RUN:
                break
        else:
            if iommu.config.debug:
                iommu.console.printk(LogLevel.DEBUG, f"AMD-Vi: {self.unit.name}: event log still running at reset")
            return
        self.unit.set_event_log(False)
        mmio.write(regs.STATUS, regs.STATUS_EVENT_OVERFLOW)
        if self.unit.events is not None:
            self.unit.events.index = 0
        self.unit.set_event_log(True)
        self.resets += 1
        if iommu.config.debug:
            iommu.console.printk(LogLevel.DEBUG, f"AMD-Vi: {self.unit.name}: event log overflowed; restarted")
