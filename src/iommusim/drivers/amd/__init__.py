"""The AMD-Vi driver (software half): Xen's amd_iommu_ops over v1 I/O page tables."""

from iommusim.drivers.amd.driver import AmdIommuDriver

__all__ = ["AmdIommuDriver"]
