"""Xen's ARM SMMU driver (software half): probe, context banks, stream mapping, direct-map map/unmap."""

from iommusim.drivers.smmu.device import ArmSmmu, NoSpace, SmmuFeature
from iommusim.drivers.smmu.driver import COHERENT_WALK, SmmuDriver
from iommusim.drivers.smmu.firmware import SmmuNode
from iommusim.drivers.smmu.state import MasterCfg, SmmuContext, SmmuXenDevice, SmmuXenDomain

__all__ = [
    "COHERENT_WALK",
    "ArmSmmu",
    "MasterCfg",
    "NoSpace",
    "SmmuContext",
    "SmmuDriver",
    "SmmuFeature",
    "SmmuNode",
    "SmmuXenDevice",
    "SmmuXenDomain",
]
