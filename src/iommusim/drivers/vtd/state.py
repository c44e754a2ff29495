"""Per-domain VT-d state (Xen's x86 arch_iommu fields the VT-d code uses)."""

from __future__ import annotations

from dataclasses import dataclass, field

from iommusim.pagetable.radix import RadixTable

__all__ = ["MappedRmrr", "VtdDomain"]


@dataclass
class MappedRmrr:
    """An RMRR range identity-mapped into a domain, and how many devices asked for it."""

    base_pfn: int
    end_pfn: int
    count: int = 1


@dataclass
class VtdDomain:
    table: RadixTable  # the second-level tables (root = Xen's pgd_maddr)
    agaw: int
    width: int  # DMA address bits the domain's tables translate
    #: indexes of the units this domain has devices behind (Xen's iommu_bitmap)
    iommu_bitmap: set[int] = field(default_factory=set)
    mapped_rmrrs: list[MappedRmrr] = field(default_factory=list)

    @property
    def levels(self) -> int:
        return self.table.levels

    @property
    def dfn_limit(self) -> int:
        """First device frame beyond the domain's address width."""
        return 1 << (self.width - 12)
