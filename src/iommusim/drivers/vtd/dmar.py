"""What firmware tells the VT-d driver (the ACPI DMAR table): remapping units, their device scopes, RMRRs.

A DRHD names one remapping unit: where its registers are, the PCI segment it serves, and either a list of
devices (its scope) or "every device of the segment not claimed by another unit" (INCLUDE_PCI_ALL).  An
RMRR is a range of memory that firmware says some devices keep using (USB legacy emulation, a graphics
stolen-memory buffer...): it must stay identity-mapped for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from iommusim.hw.mmio import RegisterBlock
from iommusim.hw.vtd.unit import InterruptLine
from iommusim.machine.pci import Sbdf

__all__ = ["DmarTable", "DrhdDesc", "RmrrDesc"]


@dataclass
class DrhdDesc:
    """One DMA-remapping hardware unit as firmware describes it."""

    name: str
    base_addr: int  # MMIO address of the register page (for log lines)
    regs: RegisterBlock  # the register page, mapped
    fault_irq: InterruptLine  # the unit's fault-event interrupt (Xen binds an MSI to it)
    segment: int = 0
    include_all: bool = False
    scope: list[Sbdf] = field(default_factory=list)


@dataclass(frozen=True)
class RmrrDesc:
    """A reserved-memory region: machine frames ``[base_pfn, end_pfn]`` (inclusive), used by ``devices``."""

    base_pfn: int
    end_pfn: int
    devices: tuple[Sbdf, ...]

    @property
    def pages(self) -> int:
        return self.end_pfn - self.base_pfn + 1


@dataclass
class DmarTable:
    haw: int  # host address width
    drhds: list[DrhdDesc]
    rmrrs: list[RmrrDesc] = field(default_factory=list)

    def unit_index_for(self, sbdf: Sbdf) -> int | None:
        """The DRHD whose scope holds the device, else the segment's INCLUDE_PCI_ALL unit (as Xen's lookup)."""
        for i, d in enumerate(self.drhds):
            if not d.include_all and d.segment == sbdf.seg and sbdf in d.scope:
                return i
        for i, d in enumerate(self.drhds):
            if d.include_all and d.segment == sbdf.seg:
                return i
        return None

    def rmrrs_of(self, sbdf: Sbdf) -> list[RmrrDesc]:
        return [r for r in self.rmrrs if sbdf in r.devices]
