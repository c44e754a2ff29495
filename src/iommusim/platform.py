"""A whole simulated system for one vendor: machine, IOMMU hardware, driver and generic layer, wired up.

``HardwareSpec`` is what a scenario file or the CLI says about the machine (vendor, memory, the IOMMU's
capabilities); ``build_platform`` asks the vendor's builder to create the hardware units, describe them
to the driver the way firmware would (DMAR, IVRS, device tree), route every device's DMA through its unit
and bring the generic layer up.  Vendors register a builder by module path in ``VENDORS``; a vendor whose
module is not installed is simply not available.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from iommusim.errors import InvalidArgument, NoDevice
from iommusim.frames import Gfn, Mfn
from iommusim.hw.base import DmaRemapper
from iommusim.iommu.config import IommuConfig
from iommusim.iommu.layer import Iommu, ProgressFn
from iommusim.iommu.ops import IommuOps
from iommusim.machine.domain import Domain, DomainKind
from iommusim.machine.machine import Machine
from iommusim.machine.p2m import DictP2m, P2mType, check_order
from iommusim.machine.pci import PciDevice

_RAM_TYPES = frozenset({P2mType.RAM_RW, P2mType.RAM_RO, P2mType.RAM_LOGDIRTY})
_NO_GFN = np.uint64(0xFFFF_FFFF_FFFF_FFFF)  # the M2P's "no guest frame"

__all__ = ["VENDORS", "HardwareSpec", "Platform", "available_vendors", "build_platform"]

#: vendor name -> "module:function" of its builder, ``build(spec, config, devices) -> Platform``.
VENDORS: dict[str, str] = {}
VENDORS["vtd"] = "iommusim.drivers.vtd.platform:build"
VENDORS["smmu"] = "iommusim.drivers.smmu.platform:build"
VENDORS["amd"] = "iommusim.drivers.amd.platform:build"


@dataclass(frozen=True)
class HardwareSpec:
    """What the machine and its IOMMU can do."""

    vendor: str
    ram_bytes: int = 4 << 30
    address_width: int = 46  # host physical address width
    #: page shifts beyond 4 KiB the IOMMU supports for leaves (21 = 2 MiB, 30 = 1 GiB)
    superpages: tuple[int, ...] = (21, 30)
    iotlb_entries: int = 1024
    caching_mode: bool = False
    queued_invalidation: bool = True
    units: int = 1
    #: vendor-specific knobs (e.g. VT-d "sagaw", AMD "paging_modes", SMMU "context_banks")
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Platform:
    vendor: str
    machine: Machine
    iommu: Iommu
    ops: IommuOps
    units: list[DmaRemapper]
    spec: HardwareSpec
    #: What a hardware domain is on this architecture: PV on x86, direct-mapped and translated on ARM.
    hwdom_kind: DomainKind = DomainKind.PV
    hwdom_direct_mapped: bool = False

    def create_hardware_domain(
        self,
        memory_bytes: int,
        *,
        kind: DomainKind | None = None,
        direct_mapped: bool | None = None,
        progress: ProgressFn | None = None,
    ) -> Domain:
        """Domain 0: owns every device at boot; its IOMMU view is set up by hwdom_init."""
        kind = self.hwdom_kind if kind is None else kind
        direct_mapped = self.hwdom_direct_mapped if direct_mapped is None else direct_mapped
        d = self.machine.create_domain(
            0, kind, memory_bytes=memory_bytes, hardware=True, direct_mapped=direct_mapped, name="d0"
        )
        for dev in self.machine.pci:
            if dev.owner is None:
                dev.owner = d
                d.pci_devices.append(dev)
        self.iommu.domain_init(d)
        self.iommu.hwdom_init(d, progress)
        for dev in list(d.pci_devices):
            self.iommu.add_device(dev)
        return d

    def create_guest(self, domid: int, memory_bytes: int, *, kind: DomainKind = DomainKind.HVM) -> Domain:
        d = self.machine.create_domain(domid, kind, memory_bytes=memory_bytes)
        self.iommu.domain_init(d)
        return d

    def destroy(self, d: Domain) -> None:
        """Give the domain's devices back, drop its IOMMU state, free its memory."""
        for dev in list(d.pci_devices):
            self.iommu.deassign_device(d, dev)
        self.iommu.domain_destroy(d)
        self.machine.destroy_domain(d)

    def device(self, name: str) -> PciDevice:
        return self.machine.pci.get(name)

    # -- a guest's memory changes, the way the hypervisor makes them (through the p2m) -----------------

    def guest_map(
        self, d: Domain, gfn: Gfn, mfn: Mfn, *, order: int = 0, type: P2mType = P2mType.RAM_RW, flush: bool = True
    ) -> None:
        """Change the guest's p2m; its IOMMU view follows (synced on x86, shared on ARM).

        ``flush=False`` runs the change inside ``dont_flush``: the IOMMU flush it would trigger is skipped,
        which opens a stale window until ``Iommu.iotlb_flush`` covers it.
        """
        if d.p2m is None:
            raise InvalidArgument(f"{d} is not translated: it has no p2m")
        old = self._m2p_olds(d, gfn, order)
        with nullcontext() if flush else self.iommu.dont_flush():
            d.p2m.set_entry(gfn, mfn, order, type)
        self._m2p_follow(d, old, gfn if type in _RAM_TYPES else None, mfn, order)

    def guest_unmap(self, d: Domain, gfn: Gfn, *, order: int = 0, flush: bool = True) -> None:
        """Remove ``2**order`` frames from the guest's p2m (see ``guest_map`` for ``flush``)."""
        if d.p2m is None:
            raise InvalidArgument(f"{d} is not translated: it has no p2m")
        old = self._m2p_olds(d, gfn, order)
        with nullcontext() if flush else self.iommu.dont_flush():
            d.p2m.remove(gfn, order)
        self._m2p_follow(d, old, None, None, order)

    @staticmethod
    def _m2p_olds(d: Domain, gfn: Gfn, order: int) -> list[Mfn]:
        """The RAM frames an x86 p2m change is about to replace (their M2P entries must go)."""
        if not isinstance(d.p2m, DictP2m):
            return []  # ARM has no M2P to keep
        check_order(order)  # before walking 2**order entries: a bad order is EINVAL, not a hang
        out = []
        for i in range(1 << order):
            e = d.p2m.lookup(gfn + i)
            if e is not None and e.type in _RAM_TYPES:
                out.append(e.mfn)
        return out

    def _m2p_follow(self, d: Domain, old: list[Mfn], gfn: Gfn | None, mfn: Mfn | None, order: int) -> None:
        """Keep the M2P two-way with an x86 p2m, as guest_physmap_add_entry/p2m_remove_page do.

        Xen rebuilds a guest's IOMMU tables from the M2P when a device comes back after the last one left
        (``populate_page_table``): without this, frames the guest had unmapped became reachable again.
        """
        if not isinstance(d.p2m, DictP2m):
            return
        m2p = self.machine.pages.m2p
        for frame in old:
            m2p[frame.value] = _NO_GFN
        if gfn is not None and mfn is not None:
            m2p[mfn.value : mfn.value + (1 << order)] = np.arange(gfn.value, gfn.value + (1 << order), dtype=np.uint64)

    def counters(self) -> dict[str, dict[str, int]]:
        """Every hardware unit's counters, by unit name."""
        return {u.name: dict(u.counters()) for u in self.units}


Builder = Callable[[HardwareSpec, IommuConfig, Sequence[PciDevice]], Platform]


def _builder(vendor: str) -> Builder | None:
    target = VENDORS.get(vendor)
    if target is None:
        return None
    module, _, func = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    builder: Builder = getattr(mod, func)
    return builder


def available_vendors() -> list[str]:
    return [v for v in VENDORS if _builder(v) is not None]


def build_platform(
    spec: HardwareSpec, *, config: IommuConfig | None = None, devices: Sequence[PciDevice] = ()
) -> Platform:
    if spec.vendor not in VENDORS:
        raise InvalidArgument(f"unknown vendor {spec.vendor!r}; known: {', '.join(sorted(VENDORS)) or 'none'}")
    builder = _builder(spec.vendor)
    if builder is None:
        raise NoDevice(f"the {spec.vendor} model is not available in this installation")
    return builder(spec, config or IommuConfig(), devices)
