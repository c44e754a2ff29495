"""Device glue (Xen's pci.c and device_tree.c callers of the ops): add, remove, assign, deassign.

Devices are named by ``Sbdf`` (or its text form); a name that is not on the bus is ENODEV.  Assignment
takes a device away from the hardware domain (EBUSY if someone else has it), builds the target's IOMMU
tables on its first device, and calls the vendor for the primary function and then for each phantom
function, whose failures are only logged.  When a domain's last device leaves, its tables are torn down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iommusim.console import LogLevel
from iommusim.errors import Busy, CrossDevice, InvalidArgument, IommuError, NoDevice
from iommusim.machine.pci import PciDevice, Sbdf

if TYPE_CHECKING:
    from iommusim.iommu.layer import Iommu
    from iommusim.machine.domain import Domain

__all__ = [
    "FAULT_THRESHOLD",
    "add_device",
    "assign_device",
    "check_disable_device",
    "deassign_device",
    "move_device",
    "remove_device",
]

FAULT_THRESHOLD = 10  # Xen's PT_FAULT_THRESHOLD
_FAULT_DECAY_NS = 10_000_000  # 10 ms


def _device(iommu: Iommu, sbdf: object) -> PciDevice:
    if isinstance(sbdf, PciDevice):
        return sbdf
    if isinstance(sbdf, str):
        sbdf = Sbdf.parse(sbdf)
    if not isinstance(sbdf, Sbdf):
        raise TypeError(f"a device is named by an Sbdf or a string like 0000:00:02.0, got {type(sbdf).__name__}")
    return iommu.machine.pci.get(sbdf)


def move_device(dev: PciDevice, target: Domain | None) -> None:
    """Make ``target`` the device's owner (Xen: list_move + pdev->domain); vendors call it where Xen does."""
    if dev.owner is not None and dev in dev.owner.pci_devices:
        dev.owner.pci_devices.remove(dev)
    dev.owner = target
    if target is not None:
        target.pci_devices.append(dev)


def add_device(iommu: Iommu, sbdf: object) -> None:
    dev = _device(iommu, sbdf)
    if dev.owner is None:
        raise InvalidArgument(f"{dev.sbdf} has no owner", op="add_device")
    if not iommu.enabled or iommu.ops is None or "add_device" not in iommu.ops.provided:
        return
    iommu.ops.add_device(dev.sbdf.devfn, dev)
    for devfn in dev.phantom_devfns:
        try:
            iommu.ops.add_device(devfn, dev)
        except IommuError as exc:
            iommu.console.printk(LogLevel.WARNING, f"{dev.sbdf}: failed to add phantom function {devfn:#x}: {exc}")


def remove_device(iommu: Iommu, sbdf: object) -> None:
    dev = _device(iommu, sbdf)
    if not iommu.enabled or iommu.ops is None or "remove_device" not in iommu.ops.provided:
        return
    first: IommuError | None = None
    for devfn in dev.phantom_devfns:
        try:
            iommu.ops.remove_device(devfn, dev)
        except IommuError as exc:
            first = first or exc
    if first is not None:
        raise first
    iommu.ops.remove_device(dev.sbdf.devfn, dev)


def assign_device(iommu: Iommu, d: Domain, sbdf: object, flag: int = 0) -> None:
    """Give a device that the hardware domain owns to ``d``."""
    if not iommu.enabled or iommu.ops is None:
        return
    if d.mem_sharing or d.mem_paging or d.log_dirty:
        raise CrossDevice("memory sharing, paging or log-dirty is active", op="assign_device", domain=d)
    dev = _device(iommu, sbdf)
    try:
        iommu.construct(d)
        owner = dev.owner
        if owner is None or not owner.is_hardware:
            raise Busy(f"{dev.sbdf} is owned by {owner}, not the hardware domain", op="assign_device", domain=d)
        dev.fault_count = 0
        iommu.ops.assign_device(d, dev.sbdf.devfn, dev, flag)
        for devfn in dev.phantom_devfns:
            try:
                iommu.ops.assign_device(d, devfn, dev, flag)
            except IommuError as exc:
                iommu.console.printk(LogLevel.WARNING, f"{dev.sbdf}: phantom function {devfn:#x} not assigned: {exc}")
    except IommuError as exc:
        raise exc.with_context(op="assign_device", domain=d) from None
    finally:
        st = d.iommu
        if not d.pci_devices and st is not None and st.has_pt:
            iommu.teardown(d)


def deassign_device(iommu: Iommu, d: Domain, sbdf: object) -> None:
    """Give ``d``'s device back to the hardware domain."""
    if not iommu.enabled or iommu.ops is None:
        raise InvalidArgument("the IOMMU is disabled", op="deassign_device", domain=d)
    dev = _device(iommu, sbdf)
    if dev.owner is not d:
        raise NoDevice(f"{dev.sbdf} is not assigned to {d}", op="deassign_device", domain=d)
    hwdom = iommu.machine.hardware_domain
    try:
        for devfn in dev.phantom_devfns:
            iommu.ops.reassign_device(d, hwdom, devfn, dev)
        iommu.ops.reassign_device(d, hwdom, dev.sbdf.devfn, dev)
    except IommuError as exc:
        raise exc.with_context(op="deassign_device", domain=d) from None
    dev.fault_count = 0
    st = d.iommu
    if not d.pci_devices and st is not None and st.has_pt:
        iommu.teardown(d)


def check_disable_device(iommu: Iommu, dev: PciDevice) -> bool:
    """Count one fault of ``dev``; past the threshold, switch its bus mastering off.  True if it was."""
    now = iommu.machine.clock.ns
    if now - dev.last_fault_ns > _FAULT_DECAY_NS:
        dev.fault_count >>= 1
    dev.last_fault_ns = now
    dev.fault_count += 1
    if dev.fault_count < FAULT_THRESHOLD:
        return False
    if dev.bus_master:
        dev.bus_master = False
        iommu.console.printk(LogLevel.WARNING, f"{dev.sbdf}: disabling bus mastering after repeated DMA faults")
    dev.fault_count = 0
    return True
