"""The AMD-Vi driver (software half) behind ``IommuOps``, with Xen's seed-era semantics.

Per domain: a v1 I/O page-table tree (``RadixTable`` over ``AmdV1Format``) under the domain's mapping
lock, a paging mode (translated domains start at two levels and grow a level at a time on top; PV
domains get the levels the host's memory needs), superpages made by merging full tables and unmade by
splitting, and unity maps for firmware's IVMD ranges.  Per device: its device-table entry, bound to the
owning domain's root and followed by INVALIDATE_DEVTAB_ENTRY.  Every flush goes to every IOMMU as
INVALIDATE_IOMMU_PAGES (and INVALIDATE_IOTLB_PAGES for devices with ATS), each followed by a completion
wait.  Failures raise Xen's errno, and the domain is crashed where Xen's AMD code crashes it, the
hardware domain included.

Correct by default; the seed's defects come back with the ``amd-*`` quirks (see ``iommusim.quirks``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iommusim.console import LogLevel
from iommusim.drivers.amd.devtable import DeviceTable
from iommusim.drivers.amd.domain import HVM_INITIAL_LEVELS, AmdDomain, paging_mode_for
from iommusim.drivers.amd.events import EventLogHandler
from iommusim.drivers.amd.unit import UnitHandle
from iommusim.errors import (
    HypervisorBug,
    IommuError,
    NoDevice,
    OutOfMemory,
)
from iommusim.frames import PAGE_SHIFT
from iommusim.hw.amd import regs
from iommusim.iommu.devices import move_device
from iommusim.iommu.ops import ReservedMemoryCallback
from iommusim.pagetable.amd import AmdV1Format
from iommusim.pagetable.radix import RadixTable

if TYPE_CHECKING:
    from iommusim.iommu.layer import Iommu
    from iommusim.machine.domain import Domain

from iommusim.drivers.amd.devices import DeviceOps

__all__ = ["AmdIommuDriver"]

#: Quirks that bring back a seed-era per-page behaviour; with any of them the bulk ops are not offered,
#: so that the generic layer goes through map_page/unmap_page where the quirk lives.
_SEED_PATH_QUIRKS = (
    "amd-remap-perm-no-flush",
    "amd-pv-no-map-flush",
    "amd-merge-counter",
    "amd-unmap-grows-tree",
    "amd-no-iotlb-flush-op",
)
_BASE_PROVIDED = frozenset(
    {
        "add_device",
        "remove_device",
        "get_device_group_id",
        "lookup_page",
        "free_page_table",
        "suspend",
        "resume",
        "crash_shutdown",
        "iotlb_flush",
        "iotlb_flush_all",
        "dump_page_tables",
        "map_range",
        "unmap_range",
    }
)
_FOUR_GIB_FRAMES = (4 << 30) >> PAGE_SHIFT


class AmdIommuDriver(DeviceOps):
    """Xen's amd_iommu_ops."""

    name = "amd"
    page_sizes = 1 << 12
    provided = _BASE_PROVIDED

    def hardware_setup(self, iommu: Iommu) -> None:
        """Find the IOMMUs firmware described, give them their tables and rings, and turn them on."""
        self._iommu = iommu
        cfg = iommu.config
        self._quirks = frozenset(q for q in cfg.quirks if q.startswith("amd-"))
        self.fmt = AmdV1Format(split_children_rw=cfg.quirk("amd-split-rw-children"))
        provided = set(_BASE_PROVIDED)
        if cfg.quirk("amd-no-iotlb-flush-op"):
            provided -= {"iotlb_flush", "iotlb_flush_all"}
        if cfg.quirk("amd-no-lookup-op"):
            provided.discard("lookup_page")
        if any(cfg.quirk(q) for q in _SEED_PATH_QUIRKS):
            provided -= {"map_range", "unmap_range"}
        self.provided = frozenset(provided)
        if not self.ivrs.ivhds:
            raise NoDevice("AMD-Vi: IOMMU not found")
        machine = iommu.machine
        devtab = DeviceTable(machine.memory, machine.allocator, self.ivrs.bdf_entries)
        units = [UnitHandle(h, iommu, self.cmd_entries, self.event_entries) for h in self.ivrs.ivhds]
        try:
            devtab.allocate()
            for u in units:
                u.allocate()
        except OutOfMemory as exc:
            for u in units:
                u.release()
            devtab.release()
            iommu.console.printk(LogLevel.ERR, "AMD-Vi: error initialising the IOMMU")
            raise NoDevice(f"AMD-Vi: initialisation failed: {exc.message}") from None
        self.devtab, self.units = devtab, units
        self.handlers = []
        for u in units:
            handler = EventLogHandler(self, u)
            self.handlers.append(handler)
            u.ivhd.connect_irq(handler)
            u.enable(devtab.maddr, devtab.pages)
            efr = u.mmio.read(regs.EXT_FEATURE, 8)
            iommu.console.printk(
                LogLevel.INFO,
                f"AMD-Vi: {u.name} enabled: {u.cmd_entries}-entry command buffer, {u.event_entries}-entry event "
                f"log, extended features {efr:#x}",
            )

    def uses_shared_tables(self, d: Domain) -> bool:
        return False  # the model keeps x86 p2m tables out of memory: the IOMMU has its own

    def init(self, d: Domain) -> None:
        """Translated domains start with two levels; PV ones with what the host's memory needs."""
        machine = self.iommu.machine
        if d.is_hvm:
            levels = HVM_INITIAL_LEVELS
        else:
            # Xen sizes for max_page; the model never goes below the 4 GiB the hardware domain's identity
            # map spans, so that no frame it maps falls beyond the tree's reach.
            levels = paging_mode_for(max(machine.pages.frames, _FOUR_GIB_FRAMES))
        table = RadixTable(machine.memory, machine.allocator, self.fmt, owner=f"d{d.domid}:amd-pt", levels=levels)
        d.iommu.arch = AmdDomain(table)

    def hwdom_init(self, d: Domain) -> None:
        """Root first (BUG on failure), then the x86 identity map, then the hardware domain's devices."""
        st = self.arch(d)
        with d.iommu.mapping_lock:
            try:
                st.table.ensure_root()
            except OutOfMemory:
                raise HypervisorBug("AMD-Vi: no memory for the hardware domain's root table") from None
        for u in self.units:
            # Xen denies the hardware domain access to the IOMMU's MMIO window here.
            if self.iommu.config.verbose:
                self.iommu.console.printk(
                    LogLevel.INFO, f"AMD-Vi: {u.name} MMIO at {u.ivhd.mmio_base:#x} kept from d{d.domid}"
                )
        self.iommu.arch_hwdom_init(d)
        for dev in list(self.iommu.machine.pci):
            if dev.owner is None:
                move_device(dev, d)
            elif dev.owner is not d:
                continue
            for devfn in self._devfns(dev):
                try:
                    self.add_device(devfn, dev)
                except IommuError as exc:
                    self.iommu.console.printk(
                        LogLevel.ERR, f"setup {dev.sbdf.with_devfn(devfn)} for d{d.domid} failed ({exc.rc})"
                    )
                    if devfn == dev.sbdf.devfn:
                        break

    def teardown(self, d: Domain) -> None:
        """Queue the whole tree for the deferred free (root at the paging mode's level), then flush all."""
        st = d.iommu.arch if d.iommu is not None else None
        if not isinstance(st, AmdDomain):
            return
        with d.iommu.mapping_lock:
            root = st.table.root
            if root is not None:
                self.iommu.defer_free(root, st.table.levels, d)
                st.table.set_root(None)
            st.unity.clear()
        self.flush_all_pages(d)

    def suspend(self) -> None:
        self.crash_shutdown()

    def resume(self) -> None:
        devtab = self._devtab()
        for u in self.units:
            u.disable()
            u.enable(devtab.maddr, devtab.pages)
        if self.units and not self.units[0].has_feature(regs.EFR_IA_SUP):
            for u in self.units:
                for req in range(min(self.ivrs.bdf_entries, devtab.entries)):
                    u.flush_device(req)
            for d in self.iommu.machine.domains.values():
                if isinstance(d.iommu.arch if d.iommu is not None else None, AmdDomain):
                    self.flush_all_pages(d)

    def crash_shutdown(self) -> None:
        for u in self.units:
            u.disable()

    def share_p2m(self, d: Domain) -> None:  # not provided: the model keeps no x86 p2m tables in memory
        raise NoDevice("AMD-Vi: sharing the p2m is not modelled")

    def get_reserved_device_memory(self, fn: ReservedMemoryCallback, ctxt: object) -> int:
        return 0  # not provided (NULL in Xen's AMD ops)
