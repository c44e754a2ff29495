"""The machine: memory, its map and allocator, PCI devices, the DMA engine, the console and the domains."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from iommusim.console import Console, SimClock
from iommusim.errors import AlreadyExists, InvalidArgument, IommuError, NoSuchDomain
from iommusim.frames import PAGE_SHIFT, Gfn, Mfn
from iommusim.machine.allocator import PageAllocator
from iommusim.machine.dma import DmaEngine
from iommusim.machine.domain import Domain, DomainKind, DomainState, Extent
from iommusim.machine.memory import MachineMemory
from iommusim.machine.p2m import DictP2m, P2m, P2mType
from iommusim.machine.pages import E820Entry, E820Map, E820Type, PageTable
from iommusim.machine.pci import PciBus, PciDevice

__all__ = ["Machine"]


class Machine:
    def __init__(
        self,
        *,
        ram_bytes: int = 4 << 30,
        address_width: int = 46,
        e820: list[E820Entry] | None = None,
        clock: SimClock | None = None,
    ) -> None:
        if ram_bytes <= 0 or ram_bytes % (1 << PAGE_SHIFT):
            raise InvalidArgument("RAM size must be a positive multiple of 4 KiB")
        self.clock = clock if clock is not None else SimClock()
        self.console = Console(self.clock)
        self.memory = MachineMemory(address_width)
        ram_frames = ram_bytes >> PAGE_SHIFT
        self.e820 = E820Map(e820 if e820 is not None else [E820Entry(0, ram_frames, E820Type.RAM)])
        table_frames = max(ram_frames, max((e.end_pfn for e in self.e820.entries), default=0))
        self.pages = PageTable(table_frames)
        self.allocator = PageAllocator(self.memory, self.pages)
        self.pci = PciBus()
        self.dma = DmaEngine(self.memory)
        self.domains: dict[int, Domain] = {}
        #: Makes the p2m of every translated domain: a dictionary on x86; ARM installs its stage-2 tables.
        self.p2m_factory: Callable[[Domain], P2m] = lambda _d: DictP2m()
        #: Called with every new domain once its memory is in place, before anyone (the IOMMU layer) sees it:
        #: where tools give pages their types, as a domain builder would before the hypervisor uses them.
        self.domain_created_hooks: list[Callable[[Domain], None]] = []

    @property
    def ram_frames(self) -> int:
        return self.pages.frames

    # -- domains -----------------------------------------------------------------------------------

    def create_domain(
        self,
        domid: int,
        kind: DomainKind,
        *,
        memory_bytes: int = 0,
        hardware: bool = False,
        direct_mapped: bool = False,
        hap: bool = True,
        name: str = "",
    ) -> Domain:
        """Create a domain and give it RAM: PV pages get M2P entries, HVM pages a p2m, direct-mapped 1:1."""
        if domid in self.domains:
            raise AlreadyExists(f"domain d{domid} already exists")
        if hardware and any(d.is_hardware for d in self.domains.values()):
            raise AlreadyExists("there is already a hardware domain")
        d = Domain(domid, kind, is_hardware=hardware, direct_mapped=direct_mapped, hap=hap, name=name)
        if kind == DomainKind.HVM:
            d.p2m = self.p2m_factory(d)
        self.domains[domid] = d
        try:
            if memory_bytes:
                self.populate(d, memory_bytes >> PAGE_SHIFT)
            for hook in self.domain_created_hooks:
                hook(d)
        except IommuError:
            # e.g. ENOMEM while an ARM p2m builds its tables: no half-made domain may remain
            self.destroy_domain(d)
            raise
        return d

    def populate(self, d: Domain, count: int, *, align_order: int = 0) -> Extent:
        """Give a domain ``count`` more frames, at the next guest frames it does not use yet."""
        mfn = self.allocator.alloc_domain(d.domid, count, align_order=align_order)
        if d.direct_mapped:
            gfn = Gfn(mfn.value)
        else:
            gfn = Gfn(max((e.gfn.value + e.count for e in d.extents), default=0))
        ext = Extent(mfn, count, gfn)
        d.extents.append(ext)
        self.pages.m2p[mfn.value : mfn.value + count] = np.arange(gfn.value, gfn.value + count, dtype=np.uint64)
        if d.p2m is not None:
            self._p2m_add_extent(d, ext)
        return ext

    @staticmethod
    def _p2m_add_extent(d: Domain, ext: Extent) -> None:
        assert d.p2m is not None
        done = 0
        while done < ext.count:
            # largest naturally aligned power-of-two chunk, like a guest populating its physmap
            g, m = ext.gfn.value + done, ext.mfn.value + done
            order = 0
            while order < 18 and not ((g | m) & ((2 << order) - 1)) and done + (2 << order) <= ext.count:
                order += 1
            d.p2m.set_entry(Gfn(g), Mfn(m), order, P2mType.RAM_RW)
            done += 1 << order

    def domain(self, domid: int) -> Domain:
        try:
            return self.domains[domid]
        except KeyError:
            raise NoSuchDomain(f"no domain d{domid}") from None

    @property
    def hardware_domain(self) -> Domain | None:
        return next((d for d in self.domains.values() if d.is_hardware), None)

    def destroy_domain(self, d: Domain) -> None:
        """Release a domain's memory (the IOMMU layer must have torn its state down first)."""
        d.state = DomainState.DYING
        if d.p2m is not None:
            d.p2m.teardown()
        for ext in d.extents:
            self.allocator.free_domain(ext.mfn, ext.count)
        d.extents.clear()
        d.state = DomainState.DEAD
        self.domains.pop(d.domid, None)

    # -- devices ---------------------------------------------------------------------------------------

    def add_pci_device(self, dev: PciDevice, owner: Domain | None = None) -> PciDevice:
        self.pci.add(dev)
        if owner is not None:
            dev.owner = owner
            owner.pci_devices.append(dev)
        return dev
