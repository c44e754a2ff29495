"""A vendor-neutral rig for the robustness tests: one machine, a hardware domain, a guest with a NIC.

Everything is read back the way the hardware sees it: a domain's translations by walking the tables the
vendor's tool adapter names (never the driver's objects), a device's view by doing DMA.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from iommusim.errors import DmaFault
from iommusim.frames import Daddr, Gfn, Mfn
from iommusim.iommu.config import IommuConfig
from iommusim.machine.allocator import PageAllocator
from iommusim.machine.domain import Domain
from iommusim.machine.p2m import P2mType
from iommusim.machine.pci import PciDevice, Sbdf
from iommusim.perms import Perm
from iommusim.platform import HardwareSpec, Platform, available_vendors, build_platform
from iommusim.tools.tables import table_lookup, table_mappings
from iommusim.tools.vendors import vendor_tools

VENDORS = available_vendors()
GPU = "0000:00:02.0"
NIC = "0000:03:00.0"
DISK = "0000:04:00.0"
RAM = 256 << 20
GUEST_MEM = 8 << 20


def devices() -> list[PciDevice]:
    return [PciDevice(Sbdf.parse(GPU)), PciDevice(Sbdf.parse(NIC)), PciDevice(Sbdf.parse(DISK))]


@dataclass
class Rig:
    vendor: str
    p: Platform
    hwdom: Domain | None = None
    guest: Domain | None = None
    #: what a test recorded before the operation under test (tables, device views...)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def alloc(self) -> PageAllocator:
        return self.p.machine.allocator

    @property
    def g(self) -> Domain:
        assert self.guest is not None
        return self.guest

    def mfn(self, d: Domain, gfn: int) -> Mfn:
        """The machine frame behind one of the domain's own guest frames."""
        for ext in d.extents:
            if ext.gfn.value <= gfn < ext.gfn.value + ext.count:
                return ext.mfn + (gfn - ext.gfn.value)
        raise LookupError(f"{d} has no guest frame {gfn:#x}")

    # -- reading back ----------------------------------------------------------------------------------

    def lookup(self, d: Domain, dfn: int) -> tuple[int, Perm, int] | None:
        """(mfn, perms, page shift) the domain's tables in memory give ``dfn``, or None."""
        root = vendor_tools(self.vendor).domain_tables(self.p, d)
        if root is None:
            return None
        return table_lookup(self.p.machine.memory, root, dfn)

    def mappings(self, d: Domain) -> list[tuple[int, int, int, int]]:
        """Every translation of the domain's tables as (dfn, pages, mfn, perms), read from memory."""
        root = vendor_tools(self.vendor).domain_tables(self.p, d)
        if root is None:
            return []
        return [(m.dfn, m.pages, m.mfn, int(m.perms)) for m in table_mappings(self.p.machine.memory, root)]

    def dma_read(self, sbdf: str, dfn: int, length: int = 8, offset: int = 0) -> bytes | None:
        try:
            return self.p.machine.dma.read(self.p.device(sbdf), Daddr((dfn << 12) + offset), length)
        except DmaFault:
            return None

    def dma_write(self, sbdf: str, dfn: int, data: bytes, offset: int = 0) -> bool:
        try:
            self.p.machine.dma.write(self.p.device(sbdf), Daddr((dfn << 12) + offset), data)
        except DmaFault:
            return False
        return True

    def frame_bytes(self, mfn: Mfn | int, length: int = 8, offset: int = 0) -> bytes:
        return self.p.machine.memory.read_bytes((int(mfn) << 12) + offset, length)

    def table_frames_snapshot(self) -> dict[int, bytes]:
        """The contents of every hypervisor page (tables, queues, device tables), by frame."""
        mem = self.p.machine.memory
        return {f.value: mem.read_bytes(f.value << 12, 4096) for f in self.alloc.frames_of("")}

    # -- changing a guest's DMA view the way each architecture does -------------------------------------

    def map_guest(self, gfn: int, mfn: Mfn, order: int = 0, *, flush: bool = True) -> None:
        """A p2m change (synced to the IOMMU tables on x86, the SMMU's own table on ARM)."""
        self.p.guest_map(self.g, Gfn(gfn), mfn, order=order, type=P2mType.RAM_RW, flush=flush)

    def unmap_guest(self, gfn: int, order: int = 0, *, flush: bool = True) -> None:
        self.p.guest_unmap(self.g, Gfn(gfn), order=order, flush=flush)

    def map_guest_range(self, gfn: int, mfn: Mfn, count: int) -> None:
        """``count`` frames at once: the generic range map on x86, one p2m insertion on ARM."""
        from iommusim.frames import Dfn

        if self.vendor == "smmu":
            from iommusim.arm.p2m import ArmP2m

            p2m = self.g.p2m
            assert isinstance(p2m, ArmP2m)
            p2m.insert_mapping(Gfn(gfn), count, mfn, P2mType.RAM_RW)
        else:
            self.p.iommu.map(self.g, Dfn(gfn), mfn, count, Perm.RW)


def platform(vendor: str, *, config: IommuConfig | None = None, ram: int = RAM) -> Platform:
    return build_platform(HardwareSpec(vendor, ram_bytes=ram), config=config, devices=devices())


def booted(vendor: str, *, config: IommuConfig | None = None, guest: bool = True, assign: bool = True) -> Rig:
    """A machine with its hardware domain, and a guest (d1) with the NIC assigned."""
    p = platform(vendor, config=config)
    rig = Rig(vendor, p, p.create_hardware_domain(16 << 20))
    if guest:
        rig.guest = p.create_guest(1, 0)
        p.machine.populate(rig.guest, GUEST_MEM >> 12, align_order=9)  # 2 MiB runs: superpages can form
        p.machine.populate(rig.guest, 3)  # and a few pages that need small-page tables
        if assign:
            p.iommu.assign_device(rig.guest, NIC)
    return rig


def owners_of(alloc: PageAllocator, domid: int) -> dict[str, int]:
    return {o: n for o, n in alloc.in_use.items() if o.startswith(f"d{domid}:")}


def sample_view(rig: Rig, sbdf: str, dfns: Iterable[int]) -> dict[int, bytes | None]:
    """What the device reads at each dfn (None: a fault)."""
    return {dfn: rig.dma_read(sbdf, dfn) for dfn in dfns}
