"""The AMD IOMMU hardware model (silicon half): registers, structures in memory, walks and caches."""

from iommusim.hw.amd.unit import AmdIommu

__all__ = ["AmdIommu"]
