"""Devices (Xen's pci_amd_iommu.c): device-table entries bound to domains, ATS, and IVMD unity maps."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from iommusim.console import LogLevel
from iommusim.drivers.amd.domain import AmdDomain, UnityRange
from iommusim.drivers.amd.unit import UnitHandle
from iommusim.errors import (
    HypervisorBug,
    InvalidArgument,
    IommuError,
    NoDevice,
)
from iommusim.frames import PAGE_SHIFT, Dfn, Mfn
from iommusim.hw.amd import regs
from iommusim.hw.amd.structs import ALL_PAGES_ADDRESS
from iommusim.iommu.devices import move_device
from iommusim.machine.pci import PciDevice, PciDevType

if TYPE_CHECKING:
    from iommusim.machine.domain import Domain

from iommusim.drivers.amd.tables import PageTableOps

__all__ = ["DeviceOps"]


class DeviceOps(PageTableOps):
    """Adding, removing, assigning and moving devices."""

    def _setup_device(self, d: Domain, unit: UnitHandle, devfn: int, dev: PciDevice) -> None:
        """Bind a device's DTE to ``d`` unless it already translates; then ATS, as Xen does."""
        st = self.arch(d)
        root = st.table.root
        if root is None or not st.table.levels:
            raise HypervisorBug(f"AMD-Vi: {d} has no root table for {dev.sbdf}")
        devtab = self._devtab()
        valid = not (self.iommu.config.hwdom_passthrough and d.is_hardware)
        req = self.requestor_id(self._bdf(dev, devfn))
        if not devtab.translation_valid(req):
            devtab.set_root_page_table(req, root.value << PAGE_SHIFT, d.domid, st.table.levels, valid)
            if dev.ats and self.ats_enabled and unit.has_cap(regs.CAP_IOTLB_SUP):
                devtab.set_iotlb(req, True)
            unit.flush_device(req)
            if self.iommu.config.debug:
                self.iommu.console.printk(
                    LogLevel.DEBUG,
                    f"AMD-Vi: setup I/O page table: device id {req:#x}, root {root.value << PAGE_SHIFT:#x}, "
                    f"domain {d.domid}, paging mode {st.table.levels}",
                )
        if dev.ats and self.ats_enabled and not dev.ats_enabled:
            if devfn == dev.sbdf.devfn:
                dev.ats_enabled = True
            self.flush_device_iotlb(devfn, dev, ALL_PAGES_ADDRESS, 0)

    def _disable_device(self, d: Domain | None, unit: UnitHandle, devfn: int, dev: PciDevice) -> None:
        devtab = self._devtab()
        req = self.requestor_id(self._bdf(dev, devfn))
        if devtab.translation_valid(req):
            devtab.disable_translation(req)
            if dev.ats and self.ats_enabled and unit.has_cap(regs.CAP_IOTLB_SUP):
                devtab.set_iotlb(req, False)
            unit.flush_device(req)
        if devfn == dev.sbdf.devfn and dev.ats and self.ats_enabled and dev.ats_enabled:
            dev.ats_enabled = False

    def add_device(self, devfn: int, dev: PciDevice) -> None:
        if dev.owner is None:
            raise InvalidArgument(f"{dev.sbdf} has no owner", op="add_device")
        unit = self.unit_for(dev)
        if unit is None:
            if dev.type == PciDevType.HOST_BRIDGE and dev.owner.is_hardware:
                return
            raise NoDevice(f"AMD-Vi: no IOMMU for {dev.sbdf}; it cannot be handed to {dev.owner}", op="add_device")
        self._setup_device(dev.owner, unit, devfn, dev)

    def enable_device(self, dev: PciDevice) -> None:  # not provided: Xen's AMD driver has none
        raise NoDevice("AMD-Vi has no enable_device")

    def remove_device(self, devfn: int, dev: PciDevice) -> None:
        if dev.owner is None:
            raise InvalidArgument(f"{dev.sbdf} has no owner", op="remove_device")
        unit = self.unit_for(dev)
        if unit is None:
            raise NoDevice(f"AMD-Vi: no IOMMU for {dev.sbdf}", op="remove_device")
        self._disable_device(dev.owner, unit, devfn, dev)

    def reassign_device(self, source: Domain, target: Domain | None, devfn: int, dev: PciDevice) -> None:
        """Move a device: the target's root is made first, so a failure changes nothing."""
        unit = self.unit_for(dev)
        if unit is None:
            raise NoDevice(f"AMD-Vi: no IOMMU for {dev.sbdf}", op="reassign_device", domain=target)
        if target is not None:
            tst = self.arch(target)
            with target.iommu.mapping_lock:
                tst.table.ensure_root()
        self._disable_device(source, unit, devfn, dev)
        if devfn == dev.sbdf.devfn:
            move_device(dev, target)
        if target is not None:
            self._setup_device(target, unit, devfn, dev)
        if not self._quirk("amd-unity-map-seed"):
            self._release_unity(source, self.requestor_id(self._bdf(dev, devfn)))
        if self.iommu.config.debug:
            self.iommu.console.printk(
                LogLevel.DEBUG, f"AMD-Vi: re-assign {dev.sbdf.with_devfn(devfn)} from {source} to {target}"
            )

    def assign_device(self, d: Domain, devfn: int, dev: PciDevice, flag: int) -> None:
        """Map the device's IVMD unity ranges into ``d``, then take the device from the hardware domain."""
        hwdom = self.iommu.machine.hardware_domain
        if hwdom is None:
            raise NoDevice("there is no hardware domain to take the device from", op="assign_device", domain=d)
        req = self.requestor_id(self._bdf(dev, devfn))
        made = self._reserve_unity(d, req)
        try:
            self.reassign_device(hwdom, d, devfn, dev)
        except IommuError:
            self._undo_unity(d, req, made)
            raise

    def _reserve_unity(self, d: Domain, req: int) -> list[UnityRange]:
        """Map each IVMD range of ``req`` 1:1 (Xen's amd_iommu_reserve_domain_unity_map).

        By default a failure undoes the ranges this call mapped and is raised; with quirk
        ``amd-unity-map-seed`` it is ignored, as the seed did.
        """
        st = self.arch(d)
        made: list[UnityRange] = []
        for ivmd in self.ivrs.unity_ranges(req):
            rng = UnityRange(ivmd.first_pfn, ivmd.pages, ivmd.perms)
            users = st.unity.get(rng)
            if users is not None:
                users.add(req)
                continue
            try:
                for i in range(rng.pages):
                    self.map_page(d, Dfn(rng.first_pfn + i), Mfn(rng.first_pfn + i), rng.perms)
            except IommuError:
                if self._quirk("amd-unity-map-seed"):
                    st.unity[rng] = {req}
                    continue
                self._unmap_unity(d, rng)
                self._undo_unity(d, req, made)
                raise
            st.unity[rng] = {req}
            made.append(rng)
        return made

    def _unmap_unity(self, d: Domain, rng: UnityRange) -> None:
        for i in range(rng.pages):
            with contextlib.suppress(IommuError):
                self.unmap_page(d, Dfn(rng.first_pfn + i))

    def _undo_unity(self, d: Domain, req: int, made: list[UnityRange]) -> None:
        st = self.arch(d)
        for rng in made:
            self._unmap_unity(d, rng)
            st.unity.pop(rng, None)
        for users in st.unity.values():
            users.discard(req)

    def _release_unity(self, d: Domain, req: int) -> None:
        """The device left ``d``: ranges no other device of ``d`` needs are unmapped."""
        st = d.iommu.arch if d.iommu is not None else None
        if not isinstance(st, AmdDomain) or d.is_hardware:
            return
        for rng, users in list(st.unity.items()):
            users.discard(req)
            if not users:
                del st.unity[rng]
                self._unmap_unity(d, rng)

    def get_device_group_id(self, seg: int, bus: int, devfn: int) -> int:
        bdf = (bus << 8) | devfn
        return self.requestor_id(bdf) if bdf < self.ivrs.bdf_entries else bdf
