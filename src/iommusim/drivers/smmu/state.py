"""The driver's bookkeeping, in Xen's shapes: per Xen domain, per context bank, per master device.

* ``SmmuXenDomain`` (Xen's arm_smmu_xen_domain): one per Xen domain with a lock and a list of contexts,
  one context per SMMU the domain has devices behind.
* ``SmmuContext`` (Linux's iommu_domain with its arm_smmu_domain): one context bank on one SMMU, created
  for a domain's first device behind that SMMU, finalised (bank allocated and programmed) at the first
  attach, destroyed when its last device leaves.
* ``MasterCfg`` (arm_smmu_master_cfg): a device's stream ids and, while attached, its SMR indexes.
* ``SmmuXenDevice`` (arm_smmu_xen_device): the per-device data hung off the device: its group's master
  configuration and the context it is attached to.

The structures Xen allocates from its heap and that can fail with ENOMEM on the way (the per-domain
structure, a context, a master's SMR array) are backed here by a hypervisor frame each, so that failure
injection reaches them and the allocator's accounting proves they are freed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from iommusim.frames import Mfn

if TYPE_CHECKING:
    from iommusim.drivers.smmu.device import ArmSmmu
    from iommusim.machine.domain import Domain

__all__ = ["MasterCfg", "SmmuContext", "SmmuXenDevice", "SmmuXenDomain"]


@dataclass(eq=False)
class MasterCfg:
    streamids: tuple[int, ...]
    smrs: list[int] | None = None  # SMR indexes while the master is configured
    smrs_frame: Mfn | None = None  # the heap allocation behind ``smrs``


@dataclass(eq=False)
class SmmuContext:
    """A context bank for one Xen domain on one SMMU."""

    domain: Domain
    frame: Mfn  # the heap allocation behind this structure
    smmu: ArmSmmu | None = None  # set once the bank is allocated (first attach)
    cbndx: int = -1
    irptndx: int = -1
    ref: int = 0  # devices attached

    @property
    def vmid(self) -> int:
        """The SMMU's VMID for this bank: bank index + 1 (not the CPU p2m's VMID)."""
        return self.cbndx + 1


@dataclass(eq=False)
class SmmuXenDomain:
    frame: Mfn
    lock: threading.Lock = field(default_factory=threading.Lock)
    contexts: list[SmmuContext] = field(default_factory=list)


@dataclass(eq=False)
class SmmuXenDevice:
    cfg: MasterCfg | None = None  # the device's group master configuration (arm_smmu_add_device)
    smmu: ArmSmmu | None = None  # the SMMU the group was created on
    context: SmmuContext | None = None  # dev_iommu_domain(dev)
