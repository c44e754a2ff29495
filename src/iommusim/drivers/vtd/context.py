"""Root and context tables: making a device translate through a domain's tables, and undoing it.

Xen's domain_context_mapping_one / domain_context_unmap_one and their per-device-type wrappers.  A context
entry is written present with the domain's DID (allocated per unit), the unit's address width, the
translation type and the second-level table pointer (skipping top levels through entry 0 when the unit
walks fewer levels than the domain's tables have), then the context cache is invalidated the way the
specification requires: a not-present entry becoming present needs nothing unless the unit caches
not-present entries (caching mode), a present entry being cleared needs a device-selective invalidation
with the old DID followed by a domain-selective IOTLB invalidation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from iommusim.console import LogLevel
from iommusim.errors import BadAddress, InvalidArgument, NotPermitted, OutOfMemory
from iommusim.frames import PAGE_SHIFT, Mfn
from iommusim.hw.vtd.structs import ContextEntry, RootEntry, TranslationType
from iommusim.machine.pci import PciDevice, PciDevType, Sbdf

if TYPE_CHECKING:
    from iommusim.drivers.vtd.driver import VtdDriver
    from iommusim.drivers.vtd.unit import IommuUnit
    from iommusim.machine.domain import Domain

__all__ = ["context_map", "context_map_one", "context_slot", "context_unmap", "context_unmap_one"]


def context_slot(unit: IommuUnit, bus: int, devfn: int) -> int | None:
    """Machine address of the context entry for (bus, devfn), or None if the bus has no context table."""
    table = unit.context_tables.get(bus)
    return None if table is None else (table.value << PAGE_SHIFT) + 16 * devfn


def _ensure_context_table(drv: VtdDriver, unit: IommuUnit, bus: int, undo: list[Callable[[], None]]) -> int:
    table = unit.context_tables.get(bus)
    mem = drv.machine.memory
    assert unit.root is not None
    root_slot = (unit.root.value << PAGE_SHIFT) + 16 * bus
    if table is None:
        table = drv.machine.allocator.alloc(f"{unit.name}:ctx")
        unit.context_tables[bus] = table
        lo, hi = RootEntry(True, table.value << PAGE_SHIFT).encode()
        mem.write_u64(root_slot + 8, hi)
        mem.write_u64(root_slot, lo)

        def forget(t: Mfn = table) -> None:
            mem.write_u64(root_slot, 0)
            del unit.context_tables[bus]
            drv.machine.allocator.free(t)

        undo.append(forget)
    return table.value << PAGE_SHIFT


def context_map_one(drv: VtdDriver, d: Domain, unit: IommuUnit, bus: int, devfn: int, dev: PciDevice | None) -> None:
    """Point (bus, devfn) behind ``unit`` at ``d``'s tables; all or nothing on allocation failure."""
    mem = drv.machine.memory
    undo: list[Callable[[], None]] = []
    try:
        base = _ensure_context_table(drv, unit, bus, undo)
        slot = base + 16 * devfn
        cur = ContextEntry.decode(mem.read_u64(slot), mem.read_u64(slot + 8))
        if cur.present:
            owner = unit.domain_of_did.get(cur.did)
            if (dev is not None and dev.owner is not d) or (dev is None and owner != d.domid):
                raise InvalidArgument(
                    f"{Sbdf(unit.desc.segment, bus, devfn >> 3, devfn & 7)} is already mapped to d{owner}"
                )
            return
        st = drv.state(d)
        if drv.is_passthrough_hwdom(d):
            t, slptptr = TranslationType.PASS_THROUGH, 0
        else:
            with d.iommu.mapping_lock:
                slptptr = drv.pgd_for_unit(d, unit)
            ats = dev is not None and dev.ats_enabled and unit.ecap.dt
            t = TranslationType.DEVICE_TLB if ats else TranslationType.MULTI_LEVEL
        fresh = unit.did_for(d.domid, alloc=False) is None
        did = unit.did_for(d.domid, alloc=True)
        if did is None:
            raise BadAddress(f"{unit.name}: no free domain id for d{d.domid}")
        if fresh:
            undo.append(lambda: unit.free_did(d.domid))
        lo, hi = ContextEntry(True, fpd=False, t=t, slptptr=slptptr, aw=unit.agaw, did=did).encode()
        mem.write_u64(slot + 8, hi)
        mem.write_u64(slot, lo)
        undo.clear()  # the entry is live from here on
        sid = bus << 8 | devfn
        rc = unit.flush_context(0, sid, 0, 3, True)
        rc |= unit.flush_iotlb(0, 0, 0, 2, True)
        if rc > 0:
            unit.flush_write_buffer()
        st.iommu_bitmap.add(unit.index)
    except OutOfMemory:
        for fn in reversed(undo):
            fn()
        raise


def context_unmap_one(drv: VtdDriver, d: Domain, unit: IommuUnit, bus: int, devfn: int) -> None:
    """Clear the context entry of (bus, devfn) and flush what the unit may have cached for it."""
    slot = context_slot(unit, bus, devfn)
    mem = drv.machine.memory
    if slot is None or not mem.read_u64(slot) & 1:
        return
    mem.write_u64(slot, 0)
    mem.write_u64(slot + 8, 0)
    did = unit.did_for(d.domid, alloc=False)
    if did is None:
        raise InvalidArgument(f"{unit.name}: d{d.domid} has no domain id although it had a context entry")
    rc = unit.flush_context(did, bus << 8 | devfn, 0, 3, False)
    rc |= unit.flush_iotlb(did, 0, 0, 2, False)
    if rc > 0:
        unit.flush_write_buffer()


def _bridge(drv: VtdDriver, dev: PciDevice) -> PciDevice | None:
    if dev.upstream_bridge is None:
        return None
    return drv.machine.pci.find(dev.upstream_bridge)


def _legacy_targets(drv: VtdDriver, dev: PciDevice, devfn: int) -> list[tuple[int, int]]:
    """The extra (bus, devfn) pairs a conventional PCI device's requests may carry: its bridge's ids."""
    out: list[tuple[int, int]] = []
    bridge = _bridge(drv, dev)
    if bridge is None:
        return out
    out.append((bridge.sbdf.bus, bridge.sbdf.devfn))
    secondary = bridge.secondary_bus
    if bridge.type == PciDevType.PCIE2PCI_BRIDGE and secondary is not None and (secondary, 0) != (dev.sbdf.bus, devfn):
        out.append((secondary, 0))
    return out


def context_map(drv: VtdDriver, d: Domain, devfn: int, dev: PciDevice) -> None:
    """Xen's domain_context_mapping: what to map depends on the kind of device."""
    unit = drv.unit_of(dev)
    bus = dev.sbdf.bus
    if dev.type == PciDevType.HOST_BRIDGE:
        if not d.is_hardware:
            raise NotPermitted(f"a host bridge ({dev.sbdf}) cannot be given to d{d.domid}")
        return
    if dev.type in (PciDevType.PCIE_BRIDGE, PciDevType.PCIE2PCI_BRIDGE, PciDevType.LEGACY_BRIDGE):
        return
    if dev.type == PciDevType.PCIE_ENDPOINT:
        context_map_one(drv, d, unit, bus, devfn, dev)
        if devfn == dev.sbdf.devfn and dev.ats and unit.ecap.dt and drv.ats and not dev.ats_enabled:
            drv.enable_ats(unit, dev)
        return
    if dev.type == PciDevType.PCI_ENDPOINT:
        context_map_one(drv, d, unit, bus, devfn, dev)
        for b, df in _legacy_targets(drv, dev, devfn):
            context_map_one(drv, d, unit, b, df, None)
        return
    raise InvalidArgument(f"{dev.sbdf}: unknown device type {dev.type}")


def context_unmap(drv: VtdDriver, d: Domain, devfn: int, dev: PciDevice) -> None:
    """Xen's domain_context_unmap, then the DID is given back if no other device of ``d`` uses the unit."""
    unit = drv.unit_of(dev)
    bus = dev.sbdf.bus
    if dev.type == PciDevType.HOST_BRIDGE:
        if not d.is_hardware:
            raise NotPermitted(f"a host bridge ({dev.sbdf}) cannot be taken from d{d.domid}")
        return
    if dev.type in (PciDevType.PCIE_BRIDGE, PciDevType.PCIE2PCI_BRIDGE, PciDevType.LEGACY_BRIDGE):
        return
    if dev.type not in (PciDevType.PCIE_ENDPOINT, PciDevType.PCI_ENDPOINT):
        raise InvalidArgument(f"{dev.sbdf}: unknown device type {dev.type}")
    context_unmap_one(drv, d, unit, bus, devfn)
    if dev.type == PciDevType.PCI_ENDPOINT:
        for b, df in _legacy_targets(drv, dev, devfn):
            context_unmap_one(drv, d, unit, b, df)
    others = [
        o
        for o in d.pci_devices
        if drv.unit_of(o) is unit and (o.sbdf.bus, o.sbdf.devfn) != (bus, devfn) and o.type != PciDevType.HOST_BRIDGE
    ]
    if not others:
        st = drv.state(d)
        st.iommu_bitmap.discard(unit.index)
        unit.free_did(d.domid)
        if drv.iommu is not None:
            drv.iommu.console.printk(LogLevel.DEBUG, f"{unit.name}: released the domain id of d{d.domid}")
