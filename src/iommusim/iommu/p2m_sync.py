"""Keeping IOMMU tables in step with an x86 domain's p2m (the EPT/p2m-pt hook of the seed era).

When a translated domain that needs IOMMU sync changes its p2m, every 4 KiB frame of the update is mapped
with the permissions its p2m type allows, or unmapped when the type allows none.  A failed map undoes what
that update mapped; the generic layer has already logged it and crashed the domain as Xen does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iommusim.frames import Dfn, Mfn
from iommusim.iommu.ops import DomainIommu
from iommusim.machine.p2m import P2mChange, iommu_perms_for_type
from iommusim.perms import Perm

if TYPE_CHECKING:
    from iommusim.iommu.layer import Iommu
    from iommusim.machine.domain import Domain

__all__ = ["P2mSync"]


class P2mSync:
    def __init__(self, iommu: Iommu, d: Domain) -> None:
        self.iommu = iommu
        self.domain = d

    def __call__(self, change: P2mChange) -> None:
        d = self.domain
        st = d.iommu
        if not isinstance(st, DomainIommu) or not st.need_sync or self.iommu.use_hap_pt(d):
            return
        count = 1 << change.order
        dfn = Dfn(change.gfn.value)
        perms = iommu_perms_for_type(change.new.type) if change.new is not None else Perm.NONE
        if change.new is not None and perms:
            self.iommu.map(d, dfn, Mfn(change.new.mfn.value), count, perms)
        else:
            self.iommu.unmap(d, dfn, count)
