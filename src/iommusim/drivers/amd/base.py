"""Plumbing every part of the AMD driver shares, and Xen's flushes (iommu_cmd.c's page and IOTLB flushes).

Every flush goes to every IOMMU as INVALIDATE_IOMMU_PAGES, each followed by a completion wait, and then
to the domain's ATS devices as INVALIDATE_IOTLB_PAGES.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iommusim.console import LogLevel
from iommusim.drivers.amd.devtable import DeviceTable
from iommusim.drivers.amd.domain import AmdDomain
from iommusim.drivers.amd.events import EventLogHandler
from iommusim.drivers.amd.ivrs import Ivrs
from iommusim.drivers.amd.unit import CMD_ENTRIES_DEFAULT, EVENT_ENTRIES_DEFAULT, UnitHandle
from iommusim.errors import (
    InvalidArgument,
    IommuError,
    NoDevice,
)
from iommusim.frames import PAGE_SHIFT, Dfn, expect_kind
from iommusim.hw.amd import regs
from iommusim.hw.amd.structs import ALL_PAGES_ADDRESS
from iommusim.machine.pci import PciDevice
from iommusim.pagetable.amd import AmdV1Format
from iommusim.perms import FlushFlags

if TYPE_CHECKING:
    from iommusim.iommu.layer import Iommu
    from iommusim.machine.domain import Domain

__all__ = ["AmdDriverBase"]


class AmdDriverBase:
    """The driver's state (IVRS, units, device table, format, quirks) and what every operation needs."""

    #: The optional ops offered (the driver fills this in from the quirks at hardware set-up).
    provided: frozenset[str] = frozenset()

    def __init__(
        self,
        ivrs: Ivrs,
        *,
        ats: bool = True,
        superpage_shifts: tuple[int, ...] = (21, 30),
        cmd_entries: int = CMD_ENTRIES_DEFAULT,
        event_entries: int = EVENT_ENTRIES_DEFAULT,
    ) -> None:
        self.ivrs = ivrs
        #: Xen's global ``ats`` boot option: ATS devices get DTE.I and INVALIDATE_IOTLB_PAGES.
        self.ats_enabled = ats
        self.superpage_shifts = frozenset(superpage_shifts)
        self.cmd_entries = cmd_entries
        self.event_entries = event_entries
        self.fmt = AmdV1Format()
        self._iommu: Iommu | None = None
        self.units: list[UnitHandle] = []
        self.handlers: list[EventLogHandler] = []
        self.devtab: DeviceTable | None = None
        self._quirks: frozenset[str] = frozenset()

    @property
    def iommu(self) -> Iommu:
        if self._iommu is None:
            raise NoDevice("the AMD IOMMU driver was not set up")
        return self._iommu

    def _quirk(self, name: str) -> bool:
        return name in self._quirks

    def requestor_id(self, bdf: int) -> int:
        """Xen's get_dma_requestor_id: the IVRS alias of a device id, if it has one."""
        return self.ivrs.requestor_id(bdf)

    def _bdf(self, dev: PciDevice, devfn: int) -> int:
        return (dev.sbdf.bus << 8) | devfn

    def unit_for(self, dev: PciDevice) -> UnitHandle | None:
        """Xen's find_iommu_for_device."""
        ivhd = self.ivrs.ivhd_for(dev.sbdf.bdf)
        return None if ivhd is None else self.units[ivhd.index]

    def arch(self, d: Domain) -> AmdDomain:
        st = d.iommu.arch if d.iommu is not None else None
        if not isinstance(st, AmdDomain):
            raise InvalidArgument(f"{d} has no AMD IOMMU state", domain=d)
        return st

    def _devtab(self) -> DeviceTable:
        if self.devtab is None:
            raise NoDevice("the AMD IOMMU has no device table")
        return self.devtab

    def _devfns(self, dev: PciDevice) -> list[int]:
        return [dev.sbdf.devfn, *dev.phantom_devfns]

    def _implicit_flush_allowed(self) -> bool:
        """Xen flushes inside map/unmap unless the caller batches; the seed (no flush ops) always did."""
        return not self.iommu.dont_flush_iotlb or self._quirk("amd-no-iotlb-flush-op")

    def _fail(self, d: Domain, exc: IommuError, what: str) -> IommuError:
        """Where Xen's AMD code gives up: debug line, domain_crash (even the hardware domain), errno."""
        if self.iommu.config.debug:
            self.iommu.console.printk(LogLevel.DEBUG, f"AMD-Vi: {what}")
        d.crash(f"AMD-Vi: {what}")
        return exc

    def _flush(self, d: Domain, daddr: int, order: int) -> None:
        for u in self.units:
            u.invalidate_pages(d.domid, daddr, order)
        if self.ats_enabled:
            for dev in list(d.pci_devices):
                for devfn in self._devfns(dev):
                    self.flush_device_iotlb(devfn, dev, daddr, order)

    def flush_pages(self, d: Domain, dfn: int, order: int) -> None:
        """Xen's amd_iommu_flush_pages: every IOMMU, then the IOTLBs of the domain's ATS devices."""
        self._flush(d, dfn << PAGE_SHIFT, order)

    def flush_all_pages(self, d: Domain) -> None:
        self._flush(d, ALL_PAGES_ADDRESS, 0)
        st = d.iommu.arch if d.iommu is not None else None
        if isinstance(st, AmdDomain):
            alloc = self.iommu.machine.allocator
            while st.pending_free:
                alloc.free(st.pending_free.pop())

    def flush_device_iotlb(self, devfn: int, dev: PciDevice, daddr: int, order: int) -> None:
        """Xen's amd_iommu_flush_iotlb: only for a device whose ATS is on, behind an IOTLB-capable IOMMU."""
        if not self.ats_enabled or not dev.ats_enabled:
            return
        unit = self.unit_for(dev)
        if unit is None or not unit.has_cap(regs.CAP_IOTLB_SUP):
            return
        req = self.requestor_id(self._bdf(dev, devfn))
        unit.invalidate_iotlb(req, dev.ats_queue_depth, daddr, order)

    def iotlb_flush(self, d: Domain, dfn: Dfn, count: int, flags: FlushFlags) -> None:
        """The smallest single flush that covers [dfn, dfn + count) (cbe21fd047), if anything changed."""
        expect_kind(Dfn, dfn, "dfn")
        if not flags & FlushFlags.MODIFIED or count <= 0:
            return
        first, last = dfn.value, dfn.value + count - 1
        if flags & FlushFlags.ALL or last >= 1 << 64:
            self.flush_all_pages(d)
        elif count == 1:
            self.flush_pages(d, first, 0)
        elif first >> 9 == last >> 9:
            self.flush_pages(d, first, 9)
        elif first >> 18 == last >> 18:
            self.flush_pages(d, first, 18)
        else:
            self.flush_all_pages(d)

    def iotlb_flush_all(self, d: Domain) -> None:
        self.flush_all_pages(d)
