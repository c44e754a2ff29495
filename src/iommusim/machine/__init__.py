"""The machine under the hypervisor: memory, page ownership, domains, PCI devices and DMA."""

from iommusim.machine.allocator import AllocationFailurePlan, PageAllocator
from iommusim.machine.dma import DmaEngine
from iommusim.machine.domain import Domain, DomainKind, DomainState, Extent
from iommusim.machine.machine import Machine
from iommusim.machine.memory import WORDS_PER_FRAME, MachineMemory
from iommusim.machine.p2m import DictP2m, P2m, P2mEntry, P2mType, iommu_perms_for_type
from iommusim.machine.pages import (
    DOMID_INVALID,
    DOMID_IO,
    DOMID_XEN,
    E820Entry,
    E820Map,
    E820Type,
    PageTable,
    PageType,
)
from iommusim.machine.pci import PciBus, PciDevice, PciDevType, Sbdf

__all__ = [
    "DOMID_INVALID",
    "DOMID_IO",
    "DOMID_XEN",
    "WORDS_PER_FRAME",
    "AllocationFailurePlan",
    "DictP2m",
    "DmaEngine",
    "Domain",
    "DomainKind",
    "DomainState",
    "E820Entry",
    "E820Map",
    "E820Type",
    "Extent",
    "Machine",
    "MachineMemory",
    "P2m",
    "P2mEntry",
    "P2mType",
    "PageAllocator",
    "PageTable",
    "PageType",
    "PciBus",
    "PciDevType",
    "PciDevice",
    "Sbdf",
    "iommu_perms_for_type",
]
