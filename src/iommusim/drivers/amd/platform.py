"""Build an AMD machine: IOMMU units, the IVRS that describes them, DMA routes, driver and generic layer.

``HardwareSpec`` fields used: ``ram_bytes``, ``address_width``, ``units`` (IOMMUs), ``iotlb_entries``
(IOTLB capacity of each unit) and ``superpages`` (the superpage sizes the driver may build by merging;
the hardware decodes every size the format defines regardless).  ``caching_mode`` and
``queued_invalidation`` are VT-d notions and are ignored.

``spec.extra`` keys (all optional):

=====================  ========  ==========================================================================
key                    default   meaning
=====================  ========  ==========================================================================
``paging_modes``       6         levels the units implement (EFR.HATS: 4, 5 or 6); deeper DTEs are illegal
``ia_sup``             True      EFR.IASup: INVALIDATE_IOMMU_ALL is implemented
``iotlb_capable``      True      IOMMU capability IotlbSup: remote IOTLBs (ATS) are supported
``ats``                True      Xen's ``ats`` boot option: ATS devices get DTE.I and IOTLB invalidations
``cmd_entries``        512       command-buffer entries (a power of two, 256..32768)
``event_entries``      512       event-log entries (a power of two, 256..32768)
``dte_cache_entries``  64        device-table entries each unit caches
``atc_entries``        32        translations each ATS device caches (its remote IOTLB)
``aliases``            {}        ``{"0000:05:00.0": "0000:04:00.0"}``: DMA of the first carries the second's
                                 requestor id (an IVRS alias, e.g. behind a PCIe-to-PCI bridge)
``ivmd``               []        unity ranges: ``[{"first_pfn": 0xdd000, "pages": 4, "perms": "rw",
                                 "devices": ["0000:03:00.0"]}]`` mapped 1:1 while those devices are assigned
``device_unit``        {}        ``{"0000:80:00.0": 1}``: which unit translates a device (default: by bus,
                                 ``bus * units // 256``)
=====================  ========  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from iommusim.drivers.amd.driver import AmdIommuDriver
from iommusim.drivers.amd.ivrs import Ivhd, Ivmd, Ivrs
from iommusim.drivers.amd.unit import CMD_ENTRIES_DEFAULT, EVENT_ENTRIES_DEFAULT
from iommusim.errors import InvalidArgument
from iommusim.hw.amd.unit import AmdIommu
from iommusim.iommu.config import IommuConfig
from iommusim.iommu.layer import Iommu
from iommusim.machine.domain import DomainKind
from iommusim.machine.machine import Machine
from iommusim.machine.pci import PciDevice, Sbdf
from iommusim.perms import Perm
from iommusim.platform import HardwareSpec, Platform

__all__ = ["assemble", "build"]

_MMIO_BASE = 0xFEB8_0000


def _bdf(text: str) -> int:
    return Sbdf.parse(text).bdf


def _connector(unit: AmdIommu) -> Callable[[Callable[[], None]], None]:
    def connect(handler: Callable[[], None]) -> None:
        unit.irq_handler = handler

    return connect


def _unit_index(dev: PciDevice, units: int, overrides: Mapping[str, int]) -> int:
    for name, index in overrides.items():
        if Sbdf.parse(name) == dev.sbdf:
            if not 0 <= index < units:
                raise InvalidArgument(f"{name}: unit {index} does not exist ({units} units)")
            return index
    return dev.sbdf.bus * units // 256


def _ivmds(entries: Sequence[Mapping[str, Any]], aliases: Mapping[int, int]) -> tuple[Ivmd, ...]:
    out = []
    for e in entries:
        ids = frozenset(aliases.get(_bdf(s), _bdf(s)) for s in e.get("devices", ()))
        perms = e.get("perms", "rw")
        out.append(
            Ivmd(
                int(e["first_pfn"]), int(e["pages"]), Perm.parse(perms) if isinstance(perms, str) else Perm(perms), ids
            )
        )
    return tuple(out)


def build(spec: HardwareSpec, config: IommuConfig, devices: Sequence[PciDevice]) -> Platform:
    """The platform, with the IOMMU brought up (``Iommu.setup``)."""
    platform = assemble(spec, config, devices)
    platform.iommu.setup()
    return platform


def assemble(spec: HardwareSpec, config: IommuConfig, devices: Sequence[PciDevice]) -> Platform:
    """Everything wired up, but the IOMMU not yet set up (tests inject failures in between)."""
    extra = dict(spec.extra)
    if spec.units < 1:
        raise InvalidArgument("an AMD machine needs at least one IOMMU")
    machine = Machine(ram_bytes=spec.ram_bytes, address_width=spec.address_width)
    for dev in devices:
        machine.add_pci_device(dev)
    aliases = {_bdf(k): _bdf(v) for k, v in dict(extra.get("aliases", {})).items()}
    hw_units = [
        AmdIommu(
            f"amd{i}",
            machine.memory,
            iotlb_entries=spec.iotlb_entries,
            dte_cache_entries=int(extra.get("dte_cache_entries", 64)),
            atc_entries=int(extra.get("atc_entries", 32)),
            paging_levels=int(extra.get("paging_modes", 6)),
            ia_sup=bool(extra.get("ia_sup", True)),
            iotlb_sup=bool(extra.get("iotlb_capable", True)),
        )
        for i in range(spec.units)
    ]
    covered: list[set[int]] = [set() for _ in hw_units]
    overrides = dict(extra.get("device_unit", {}))
    for dev in machine.pci:
        index = _unit_index(dev, spec.units, overrides)
        unit = hw_units[index]
        for devfn in [dev.sbdf.devfn, *dev.phantom_devfns]:
            bdf = (dev.sbdf.bus << 8) | devfn
            rid = aliases.get(bdf, bdf)
            covered[index] |= {bdf, rid}
            machine.dma.route(dev, unit, rid, devfn=devfn)
    ivhds = tuple(
        Ivhd(i, u.mmio, u.cap_header, frozenset(covered[i]), _connector(u), _MMIO_BASE + i * 0x4000)
        for i, u in enumerate(hw_units)
    )
    ivrs = Ivrs(ivhds, _ivmds(list(extra.get("ivmd", [])), aliases), aliases)
    driver = AmdIommuDriver(
        ivrs,
        ats=bool(extra.get("ats", True)),
        superpage_shifts=tuple(spec.superpages),
        cmd_entries=int(extra.get("cmd_entries", CMD_ENTRIES_DEFAULT)),
        event_entries=int(extra.get("event_entries", EVENT_ENTRIES_DEFAULT)),
    )
    iommu = Iommu(machine, driver, config)
    return Platform(
        "amd", machine, iommu, driver, list(hw_units), spec, hwdom_kind=DomainKind.PV, hwdom_direct_mapped=False
    )
