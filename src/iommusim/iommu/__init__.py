"""The hypervisor's generic IOMMU layer and the interface vendor drivers implement."""

from iommusim.iommu.config import IommuConfig
from iommusim.iommu.devices import FAULT_THRESHOLD, check_disable_device, move_device
from iommusim.iommu.layer import Iommu, ProgressFn
from iommusim.iommu.ops import OPTIONAL_OPS, DomainIommu, IommuOps, IommuStatus, ReservedMemoryCallback

__all__ = [
    "FAULT_THRESHOLD",
    "OPTIONAL_OPS",
    "DomainIommu",
    "Iommu",
    "IommuConfig",
    "IommuOps",
    "IommuStatus",
    "ProgressFn",
    "ReservedMemoryCallback",
    "check_disable_device",
    "move_device",
]
