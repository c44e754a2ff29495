"""Building VT-d platforms for the driver tests, and small probes that look at the machine through DMA."""

from __future__ import annotations

from typing import Any

from iommusim.errors import DmaFault
from iommusim.frames import Daddr, Gfn, Mfn
from iommusim.hw.vtd.structs import FaultRecord
from iommusim.hw.vtd.unit import VtdUnit
from iommusim.iommu.config import IommuConfig
from iommusim.machine.domain import Domain
from iommusim.machine.pci import PciDevice
from iommusim.perms import Perm
from iommusim.platform import HardwareSpec, Platform, build_platform

NIC = "0000:03:00.0"
GPU = "0000:00:02.0"
NVME = "0000:04:00.0"


def make(
    *,
    units: int = 1,
    caching_mode: bool = False,
    qi: bool = True,
    superpages: tuple[int, ...] = (21, 30),
    iotlb: int = 256,
    ram: int = 1 << 30,
    config: IommuConfig | None = None,
    devices: list[PciDevice] | None = None,
    **extra: Any,
) -> Platform:
    spec = HardwareSpec(
        "vtd",
        ram_bytes=ram,
        superpages=superpages,
        iotlb_entries=iotlb,
        caching_mode=caching_mode,
        queued_invalidation=qi,
        units=units,
        extra=extra,
    )
    return build_platform(spec, config=config, devices=devices or ())


def boot(p: Platform, mem: int = 64 << 20) -> Domain:
    return p.create_hardware_domain(mem)


def guest_with(p: Platform, name: str = NIC, domid: int = 1, mem: int = 16 << 20) -> Domain:
    g = p.create_guest(domid, mem)
    p.iommu.assign_device(g, name)
    return g


def gmfn(d: Domain, gfn: int) -> int:
    assert d.p2m is not None
    e = d.p2m.lookup(Gfn(gfn))
    assert e is not None
    return e.mfn.value


def reaches(p: Platform, dev: str, daddr: int, *, write: bool = False) -> bool:
    """Whether a DMA of the device at ``daddr`` goes through (a read, or a write of one byte)."""
    d = p.device(dev)
    try:
        if write:
            p.machine.dma.write(d, Daddr(daddr), b"\x5a")
        else:
            p.machine.dma.read(d, Daddr(daddr), 1)
    except DmaFault:
        return False
    return True


def lands_at(p: Platform, dev: str, daddr: int) -> int:
    """Write a marker through DMA and return the machine address where it landed (-1 if refused)."""
    d = p.device(dev)
    marker = bytes(range(1, 9))
    try:
        p.machine.dma.write(d, Daddr(daddr), marker)
    except DmaFault:
        return -1
    route = p.machine.dma.route_of(d)
    assert route is not None
    maddr = route.unit.translate(route.source_id, daddr, Perm.R).maddr
    assert p.machine.memory.read_bytes(maddr, 8) == marker
    return maddr


def fault_of(p: Platform, dev: str, daddr: int, *, write: bool = False) -> FaultRecord:
    d = p.device(dev)
    try:
        if write:
            p.machine.dma.write(d, Daddr(daddr), b"\x00")
        else:
            p.machine.dma.read(d, Daddr(daddr), 1)
    except DmaFault as exc:
        record = exc.record
    else:
        raise AssertionError(f"DMA of {dev} at {daddr:#x} was not refused")
    if not isinstance(record, FaultRecord):
        raise AssertionError(f"the fault carries no VT-d fault record: {record!r}")
    return record


def unit(p: Platform, i: int = 0) -> VtdUnit:
    u = p.units[i]
    assert isinstance(u, VtdUnit)
    return u


def mfn_of_extent(d: Domain) -> Mfn:
    return d.extents[0].mfn
