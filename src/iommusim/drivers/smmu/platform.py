"""An ARM machine with SMMUv2s, Xen's SMMU driver and Xen's stage-2 p2m, wired up (vendor "smmu").

The builder creates the machine and its devices, one or more SMMUv2 units, and a device tree that
describes each unit (register window, interrupts, and the "mmu-masters": every device with its stream
ids, by default its requester id).  Devices are spread over the units in PCI order.  Every translated
domain gets a stage-2 p2m in machine memory, sized from the CPU's physical address range the way Xen
sizes it; that p2m is what the SMMU walks.  The hardware domain is translated and direct-mapped (guest
frame = machine frame), as on ARM.

``HardwareSpec`` fields used: ``ram_bytes``, ``address_width`` (the machine), ``units`` (SMMU instances),
``iotlb_entries`` (each SMMU's TLB), ``superpages`` (the block sizes the p2m may use: 21 = 2 MiB,
30 = 1 GiB).  ``caching_mode`` and ``queued_invalidation`` do not exist on the SMMU and are ignored.

``spec.extra`` keys:

* ``ipa_bits`` (40): the CPUs' physical address range (32, 36, 40, 42, 44 or 48 bits) from which Xen sizes
  every p2m: IPA size, root level and concatenated root tables (42 gives a 40-bit IPA, as in Xen);
* ``context_banks`` (8) and ``stream_match_registers`` (16) of each SMMU;
* ``ias_bits`` (48) and ``oas_bits`` (the PA range): the SMMU's input and output sizes (IDR2);
* ``coherent_walk`` (True): the SMMU walks tables coherently (IDR0.CTTW); without it the p2m cleans each
  entry it writes to memory, and counts it;
* ``usfcfg_bypass`` (False): the driver leaves sCR0.USFCFG clear so that streams no SMR matches bypass
  the SMMU (Linux's default) instead of faulting (Xen's choice);
* ``dom0_devices`` (none): devices, by PCI address, that the hardware domain gets behind its own context
  at boot; the others are "xen,passthrough" devices, owned by the hardware domain but reaching nothing
  until they are assigned;
* ``sync_polls`` (1): reads of sTLBGSTATUS that still show a TLB sync in progress.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from iommusim.arm.p2m import ArmP2m
from iommusim.arm.vtcr import P2mLayout, VmidAllocator, p2m_layout_for_pa_range
from iommusim.drivers.smmu.device import SmmuFeature
from iommusim.drivers.smmu.driver import SmmuDriver
from iommusim.drivers.smmu.firmware import SmmuNode
from iommusim.errors import InvalidArgument, IommuError
from iommusim.hw.base import DmaRemapper
from iommusim.hw.smmu import GLOBAL_IRQ, SmmuConfig, SmmuV2, context_irq
from iommusim.iommu.config import IommuConfig
from iommusim.iommu.devices import move_device
from iommusim.iommu.layer import Iommu, ProgressFn
from iommusim.machine.domain import Domain, DomainKind
from iommusim.machine.machine import Machine
from iommusim.machine.pci import PciDevice, Sbdf
from iommusim.platform import HardwareSpec, Platform

__all__ = ["EXTRA_KEYS", "SmmuPlatform", "build"]

EXTRA_KEYS: dict[str, str] = {
    "ipa_bits": "CPU physical address range in bits (32/36/40/42/44/48) that sizes every p2m",
    "context_banks": "context banks per SMMU",
    "stream_match_registers": "stream match register groups per SMMU",
    "ias_bits": "SMMU input (IPA) size in bits",
    "oas_bits": "SMMU output (PA) size in bits",
    "coherent_walk": "the SMMU's table walks are coherent with the CPU caches",
    "usfcfg_bypass": "let unmatched streams bypass instead of faulting",
    "dom0_devices": "PCI addresses attached to the hardware domain's context at boot",
    "sync_polls": "sTLBGSTATUS polls that still show a sync in progress",
}

_SMMU_BASE = 0x2B40_0000


@dataclass
class SmmuPlatform(Platform):
    """The generic platform, plus what Xen's ARM domain builder does with protected devices."""

    layout: P2mLayout | None = None
    vmids: VmidAllocator = field(default_factory=VmidAllocator)
    dom0_devices: tuple[Sbdf, ...] = ()

    def create_hardware_domain(
        self,
        memory_bytes: int,
        *,
        kind: DomainKind | None = None,
        direct_mapped: bool | None = None,
        progress: ProgressFn | None = None,
    ) -> Domain:
        """Dom0, then the device-tree devices not marked for passthrough behind its context (handle_device).

        All or nothing: if any step fails (ENOMEM building the p2m or the SMMU state, no free context
        bank...), whatever was built is taken down again before the error propagates.
        """
        had = 0 in self.machine.domains
        unowned = [dev for dev in self.machine.pci if dev.owner is None]
        try:
            d = super().create_hardware_domain(memory_bytes, kind=kind, direct_mapped=direct_mapped, progress=progress)
            for sbdf in self.dom0_devices:
                dev = self.machine.pci.get(sbdf)
                self.ops.assign_device(d, dev.sbdf.devfn, dev, 0)
        except IommuError:
            if not had:
                self._undo_domain(0, unowned)
            raise
        return d

    def create_guest(self, domid: int, memory_bytes: int, *, kind: DomainKind = DomainKind.HVM) -> Domain:
        had = domid in self.machine.domains
        try:
            return super().create_guest(domid, memory_bytes, kind=kind)
        except IommuError:
            if not had:
                self._undo_domain(domid, [])
            raise

    def destroy(self, d: Domain) -> None:
        """Xen's ARM domain destruction: ``iommu_release_dt_devices`` detaches each device (reassign to NULL).

        The devices are not attached to the hardware domain's context (that is the x86 PCI path of
        ``deassign_device``): they go back to the state they booted in, held by the hardware domain but
        reaching nothing, so that they can be assigned again.
        """
        hwdom = self.machine.hardware_domain
        driver = self.ops
        for dev in list(d.pci_devices):
            if isinstance(driver, SmmuDriver) and driver.attached_context(dev) is not None:
                driver.reassign_device(d, None, dev.sbdf.devfn, dev)
            move_device(dev, hwdom)
            dev.fault_count = 0
        self.iommu.domain_destroy(d)
        self.machine.destroy_domain(d)

    def _undo_domain(self, domid: int, unowned: list[PciDevice]) -> None:
        d = self.machine.domains.get(domid)
        if d is None:
            return
        driver = self.ops
        for dev in list(d.pci_devices):
            if isinstance(driver, SmmuDriver) and driver.attached_context(dev) is not None:
                driver.reassign_device(d, None, dev.sbdf.devfn, dev)
        for dev in unowned:
            if dev in d.pci_devices:
                d.pci_devices.remove(dev)
            dev.owner = None
        self.iommu.domain_destroy(d)
        self.machine.destroy_domain(d)


def _extra(spec: HardwareSpec) -> dict[str, Any]:
    unknown = sorted(set(spec.extra) - set(EXTRA_KEYS))
    if unknown:
        raise InvalidArgument(f"unknown smmu option(s) {', '.join(unknown)}; known: {', '.join(sorted(EXTRA_KEYS))}")
    return dict(spec.extra)


def build(spec: HardwareSpec, config: IommuConfig, devices: Sequence[PciDevice]) -> Platform:
    extra = _extra(spec)
    layout = p2m_layout_for_pa_range(int(extra.get("ipa_bits", 40)))
    if spec.units < 1:
        raise InvalidArgument("an ARM SMMU platform needs at least one SMMU")
    machine = Machine(ram_bytes=spec.ram_bytes, address_width=spec.address_width)
    for dev in devices:
        machine.add_pci_device(dev)
    units: list[SmmuV2] = []
    nodes: list[SmmuNode] = []
    for u in range(spec.units):
        unit = SmmuV2(
            machine.memory,
            SmmuConfig(
                name=f"smmu{u}",
                context_banks=int(extra.get("context_banks", 8)),
                stream_match_registers=int(extra.get("stream_match_registers", 16)),
                ias_bits=int(extra.get("ias_bits", 48)),
                oas_bits=int(extra.get("oas_bits", layout.pa_bits)),
                coherent_walk=bool(extra.get("coherent_walk", True)),
                tlb_entries=spec.iotlb_entries,
                sync_polls=int(extra.get("sync_polls", 1)),
            ),
        )
        units.append(unit)
        path = f"/smmu@{_SMMU_BASE + u * unit.window_size:x}"
        nodes.append(SmmuNode(path, unit.mmio, unit, GLOBAL_IRQ, context_irq(0)))
    for i, dev in enumerate(machine.pci):
        k = i % len(units)
        nodes[k].masters[dev.sbdf] = dev.sids
        machine.dma.route(dev, units[k], dev.sids[0])
        for devfn in dev.phantom_devfns:
            machine.dma.route(dev, units[k], dev.sids[0], devfn=devfn)
    driver = SmmuDriver(nodes, layout, usfcfg_bypass=bool(extra.get("usfcfg_bypass", False)))
    iommu = Iommu(machine, driver, config)
    vmids = VmidAllocator()
    blocks = tuple(s for s in spec.superpages if s in (21, 30))

    def make_p2m(d: Domain) -> ArmP2m:
        # Xen's p2m_init: clean PTE writes when the IOMMU is on and some SMMU cannot walk coherently
        clean = iommu.enabled and not driver.platform_features & SmmuFeature.COHERENT_WALK
        return ArmP2m(machine, d, layout, vmids, block_shifts=blocks, iommu=iommu, clean_pte=clean)

    machine.p2m_factory = make_p2m
    iommu.setup()
    dom0 = tuple(Sbdf.parse(s) if isinstance(s, str) else s for s in extra.get("dom0_devices", ()))
    hw: list[DmaRemapper] = list(units)
    return SmmuPlatform(
        vendor="smmu",
        machine=machine,
        iommu=iommu,
        ops=driver,
        units=hw,
        spec=spec,
        hwdom_kind=DomainKind.HVM,
        hwdom_direct_mapped=True,
        layout=layout,
        vmids=vmids,
        dom0_devices=dom0,
    )
