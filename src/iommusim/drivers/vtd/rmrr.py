"""RMRR identity maps: memory firmware says some devices keep using must stay 1:1 in their domain's tables.

Xen's rmrr_identity_mapping: a per-domain list of mapped ranges with a use count.  The first user maps
every frame read-write at its own address (through the IOMMU for an untranslated domain, through a
direct-MMIO p2m entry for a translated one, which the p2m sync then carries into the IOMMU); the last one
gone unmaps them.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from iommusim.console import LogLevel
from iommusim.errors import Busy, IommuError, NoSuchDeviceOrAddress, NoSuchEntry
from iommusim.frames import Dfn, Gfn, Mfn
from iommusim.machine.p2m import P2mType
from iommusim.perms import Perm

if TYPE_CHECKING:
    from iommusim.drivers.vtd.dmar import RmrrDesc
    from iommusim.drivers.vtd.driver import VtdDriver
    from iommusim.machine.domain import Domain

__all__ = ["RDM_RELAXED", "rmrr_identity_map", "rmrr_identity_unmap"]

#: XEN_DOMCTL_DEV_RDM_RELAXED: a conflicting reserved-memory map is only a warning
RDM_RELAXED = 1


def _set_identity(drv: VtdDriver, d: Domain, pfn: int, flag: int) -> None:
    iommu = drv.require_iommu()
    if not d.paging_mode_translate:
        if d.iommu.need_iommu:
            iommu.map_page(d, Dfn(pfn), Mfn(pfn), Perm.RW)
        return
    assert d.p2m is not None
    old = d.p2m.lookup(Gfn(pfn))
    if old is not None and (old.type != P2mType.MMIO_DIRECT or old.mfn != Mfn(pfn)):
        if not flag & RDM_RELAXED:
            raise Busy(f"d{d.domid}: gfn {pfn:#x} is already in use, cannot identity-map an RMRR there")
        iommu.console.printk(LogLevel.WARNING, f"d{d.domid}: RMRR frame {pfn:#x} overrides an existing mapping")
    d.p2m.set_entry(Gfn(pfn), Mfn(pfn), 0, P2mType.MMIO_DIRECT)


def _clear_identity(drv: VtdDriver, d: Domain, pfn: int) -> None:
    iommu = drv.require_iommu()
    if not d.paging_mode_translate:
        if d.iommu.need_iommu:
            iommu.unmap_page(d, Dfn(pfn))
        return
    assert d.p2m is not None
    old = d.p2m.lookup(Gfn(pfn))
    if old is None or old.type != P2mType.MMIO_DIRECT or old.mfn != Mfn(pfn):
        raise NoSuchDeviceOrAddress(f"d{d.domid}: gfn {pfn:#x} is not an identity-mapped RMRR frame")
    d.p2m.remove(Gfn(pfn), 0)


def rmrr_identity_map(drv: VtdDriver, d: Domain, rmrr: RmrrDesc, flag: int = 0) -> None:
    st = drv.state(d)
    for m in st.mapped_rmrrs:
        if (m.base_pfn, m.end_pfn) == (rmrr.base_pfn, rmrr.end_pfn):
            m.count += 1
            return
    done: list[int] = []
    try:
        for pfn in range(rmrr.base_pfn, rmrr.end_pfn + 1):
            _set_identity(drv, d, pfn, flag)
            done.append(pfn)
    except IommuError:
        for pfn in reversed(done):
            with contextlib.suppress(IommuError):
                _clear_identity(drv, d, pfn)
        raise
    from iommusim.drivers.vtd.state import MappedRmrr

    st.mapped_rmrrs.append(MappedRmrr(rmrr.base_pfn, rmrr.end_pfn))


def rmrr_identity_unmap(drv: VtdDriver, d: Domain, rmrr: RmrrDesc) -> None:
    st = drv.state(d)
    for m in st.mapped_rmrrs:
        if (m.base_pfn, m.end_pfn) == (rmrr.base_pfn, rmrr.end_pfn):
            break
    else:
        raise NoSuchEntry(f"d{d.domid}: RMRR {rmrr.base_pfn:#x}-{rmrr.end_pfn:#x} is not mapped")
    m.count -= 1
    if m.count:
        return
    for pfn in range(rmrr.base_pfn, rmrr.end_pfn + 1):
        _clear_identity(drv, d, pfn)
    st.mapped_rmrrs.remove(m)
