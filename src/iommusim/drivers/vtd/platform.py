"""Build a VT-d machine: remapping units with the spec's capabilities, a DMAR table, the driver, the layer.

``HardwareSpec.extra`` keys understood here (all optional):

==================  ==========================================================================================
``sagaw``           CAP.SAGAW bits (default 0b00110: 39- and 48-bit, i.e. 3- and 4-level tables)
``mgaw``            maximum guest address width in bits (default 48)
``nd``              CAP.ND, 2**(4 + 2*nd) domain ids (default 2: 256)
``psi``             page-selective invalidation supported (default True)
``mamv``            maximum PSI address mask (default 9)
``rwbf``            the unit needs write-buffer flushes (default False)
``fault_records``   number of fault-recording registers (default 8)
``coherent``        ECAP.C, page walks snoop the CPU caches (default True)
``snoop_control``   ECAP.SC (default True)
``device_tlb``      ECAP.DT, ATS support (default True)
``pass_through``    ECAP.PT (default True)
``haw``             host address width the DMAR table reports (default ``spec.address_width``)
``domain_width``    the driver's domain address width (default 48, Xen's)
``ats``             the driver enables ATS on capable devices (Xen's "ats" option, default False)
``rmrr``            list of ``{"base": pfn, "end": pfn (inclusive), "devices": ["0000:00:14.0", ...]}``
``context_cache``   context-cache entries per unit (default 256)
==================  ==========================================================================================

With ``spec.units`` = N, device i goes into the scope of unit i mod N, except that the last unit is the
INCLUDE_PCI_ALL unit and takes every device no other unit lists.  Without devices a small default set is
used: a host bridge, an integrated graphics device, a network card and an NVMe drive.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from iommusim.drivers.vtd.dmar import DmarTable, DrhdDesc, RmrrDesc
from iommusim.drivers.vtd.driver import DEFAULT_DOMAIN_WIDTH, VtdDriver
from iommusim.errors import InvalidArgument
from iommusim.hw.vtd.regs import Cap, Ecap
from iommusim.hw.vtd.unit import VtdUnit
from iommusim.iommu.config import IommuConfig
from iommusim.iommu.layer import Iommu
from iommusim.machine.domain import DomainKind
from iommusim.machine.machine import Machine
from iommusim.machine.pci import PciDevice, PciDevType, Sbdf
from iommusim.platform import HardwareSpec, Platform

__all__ = ["DRHD_BASE", "build", "default_devices"]

DRHD_BASE = 0xFED9_0000  # where firmware typically puts the first unit's register page
_IRO = 0x100  # IVA at 0x100, IOTLB at 0x108
_FRO = 0x200  # fault-recording registers from 0x200 on

_KNOWN = {
    "sagaw",
    "mgaw",
    "nd",
    "psi",
    "mamv",
    "rwbf",
    "fault_records",
    "coherent",
    "snoop_control",
    "device_tlb",
    "pass_through",
    "haw",
    "domain_width",
    "ats",
    "rmrr",
    "context_cache",
}


def default_devices() -> list[PciDevice]:
    return [
        PciDevice(Sbdf.parse("0000:00:00.0"), PciDevType.HOST_BRIDGE),
        PciDevice(Sbdf.parse("0000:00:02.0"), PciDevType.PCIE_ENDPOINT),
        PciDevice(Sbdf.parse("0000:03:00.0"), PciDevType.PCIE_ENDPOINT, ats=True),
        PciDevice(Sbdf.parse("0000:04:00.0"), PciDevType.PCIE_ENDPOINT),
    ]


def _caps(spec: HardwareSpec, x: dict[str, Any]) -> tuple[Cap, Ecap]:
    sllps = (1 if 21 in spec.superpages else 0) | (2 if 30 in spec.superpages else 0)
    cap = Cap(
        nd=int(x.get("nd", 2)),
        rwbf=bool(x.get("rwbf", False)),
        cm=spec.caching_mode,
        sagaw=int(x.get("sagaw", 0b00110)),
        mgaw=int(x.get("mgaw", 48)),
        fro=_FRO,
        sllps=sllps,
        psi=bool(x.get("psi", True)),
        nfr=int(x.get("fault_records", 8)),
        mamv=int(x.get("mamv", 9)),
    )
    ecap = Ecap(
        c=bool(x.get("coherent", True)),
        qi=spec.queued_invalidation,
        dt=bool(x.get("device_tlb", True)),
        pt=bool(x.get("pass_through", True)),
        sc=bool(x.get("snoop_control", True)),
        iro=_IRO,
    )
    return cap, ecap


def _source_id(machine: Machine, dev: PciDevice) -> int:
    """The requester id a device's DMA carries: a PCIe-to-PCI bridge stands in for devices behind it."""
    if dev.type == PciDevType.PCI_ENDPOINT and dev.upstream_bridge is not None:
        bridge = machine.pci.find(dev.upstream_bridge)
        if bridge is not None and bridge.type == PciDevType.PCIE2PCI_BRIDGE and bridge.secondary_bus is not None:
            return bridge.secondary_bus << 8
    return dev.sbdf.bdf


def build(spec: HardwareSpec, config: IommuConfig, devices: Sequence[PciDevice]) -> Platform:
    x = dict(spec.extra)
    unknown = sorted(set(x) - _KNOWN)
    if unknown:
        raise InvalidArgument(
            f"unknown VT-d spec.extra key(s): {', '.join(unknown)}; known: {', '.join(sorted(_KNOWN))}"
        )
    if spec.units < 1:
        raise InvalidArgument("a VT-d machine needs at least one remapping unit")
    machine = Machine(ram_bytes=spec.ram_bytes, address_width=spec.address_width)
    devs = list(devices) if devices else default_devices()
    for dev in devs:
        machine.add_pci_device(dev)
    cap, ecap = _caps(spec, x)
    haw = int(x.get("haw", spec.address_width))
    dram_limit = machine.pages.frames << 12
    units = [
        VtdUnit(
            f"vtd{i}",
            machine.memory,
            cap=cap,
            ecap=ecap,
            haw=haw,
            dram_limit=dram_limit,
            iotlb_entries=spec.iotlb_entries,
            context_cache_entries=int(x.get("context_cache", 256)),
        )
        for i in range(spec.units)
    ]
    last = spec.units - 1
    drhds = [
        DrhdDesc(
            u.name,
            DRHD_BASE + 0x1000 * i,
            u.regs,
            u.fault_irq,
            include_all=(i == last),
            scope=[d.sbdf for k, d in enumerate(sorted(devs, key=lambda d: d.sbdf)) if k % spec.units == i]
            if i != last
            else [],
        )
        for i, u in enumerate(units)
    ]
    rmrrs = [
        RmrrDesc(int(r["base"]), int(r["end"]), tuple(Sbdf.parse(s) for s in r.get("devices", ())))
        for r in x.get("rmrr", ())
    ]
    dmar = DmarTable(haw, drhds, rmrrs)
    for dev in devs:
        idx = dmar.unit_index_for(dev.sbdf)
        if idx is None:
            continue
        unit = units[idx]
        machine.dma.route(dev, unit, _source_id(machine, dev))
        for devfn in dev.phantom_devfns:
            machine.dma.route(dev, unit, (dev.sbdf.bus << 8) | devfn, devfn=devfn)
    driver = VtdDriver(dmar, domain_width=int(x.get("domain_width", DEFAULT_DOMAIN_WIDTH)), ats=bool(x.get("ats")))
    iommu = Iommu(machine, driver, config)
    iommu.setup()
    return Platform(
        "vtd",
        machine,
        iommu,
        driver,
        list(units),
        spec,
        hwdom_kind=DomainKind.PV,
        hwdom_direct_mapped=False,
    )
