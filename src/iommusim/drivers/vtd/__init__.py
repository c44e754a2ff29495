"""The Intel VT-d driver (software half): DMAR description, units, contexts, RMRRs and the IommuOps."""

from iommusim.drivers.vtd.dmar import DmarTable, DrhdDesc, RmrrDesc
from iommusim.drivers.vtd.driver import VtdDriver

__all__ = ["DmarTable", "DrhdDesc", "RmrrDesc", "VtdDriver"]
