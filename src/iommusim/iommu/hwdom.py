"""Building a domain's IOMMU view of its own memory: the hardware domain at boot, other domains later.

Three of Xen's paths live here:

* ``hwdom_init`` (generic): in strict mode, map every page the hardware domain owns at its guest frame,
  writable only where the page's type allows it, then hand over to the vendor;
* ``arch_hwdom_init`` (x86): the 1:1 map of machine frames chosen from the E820 map, Xen's own frames
  and the strict/inclusive/reserved options; vendors call it from their own hwdom_init;
* ``populate_page_table`` (x86): when a domain gets its first device, map all its pages.

All three select pages with numpy over the page-ownership table and map them as runs through the vendor's
bulk op where it has one, so that a multi-GiB hardware domain is set up in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from iommusim.console import LogLevel
from iommusim.errors import HypervisorBug, IommuError, NoSuchDomain
from iommusim.frames import Dfn, Gfn, Mfn
from iommusim.iommu.ops import IommuOps, IommuStatus
from iommusim.machine.p2m import P2mType
from iommusim.machine.pages import DOMID_XEN, E820Type
from iommusim.perms import Perm

if TYPE_CHECKING:
    from iommusim.iommu.layer import Iommu, ProgressFn
    from iommusim.machine.domain import Domain

__all__ = ["arch_hwdom_init", "hwdom_init", "populate_page_table", "runs"]

_NO_GFN = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_PROGRESS_EVERY = 1 << 20  # Xen processes softirqs every 2^20 pages
_FOUR_GIB_PFNS = (4 << 30) >> 12


def runs(
    dfns: npt.NDArray[np.int64], mfns: npt.NDArray[np.int64], perms: npt.NDArray[np.uint8]
) -> Iterator[tuple[int, int, int, Perm]]:
    """Split parallel arrays into maximal runs of contiguous dfn and mfn with equal perms."""
    if dfns.size == 0:
        return
    brk = np.ones(dfns.shape, dtype=bool)
    brk[1:] = (dfns[1:] != dfns[:-1] + 1) | (mfns[1:] != mfns[:-1] + 1) | (perms[1:] != perms[:-1])
    starts = np.nonzero(brk)[0]
    ends = np.append(starts[1:], dfns.size)
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        yield int(dfns[s]), int(mfns[s]), e - s, Perm(int(perms[s]))


def _map_run_direct(ops: IommuOps, d: Domain, dfn: int, mfn: int, count: int, perms: Perm) -> IommuError | None:
    """Map a run through the vendor directly (no generic logging or crash); returns the first error."""
    if "map_range" in ops.provided:
        try:
            ops.map_range(d, Dfn(dfn), Mfn(mfn), count, perms)
            return None
        except IommuError as exc:
            first = exc
        # fall back to pages so that everything that can be mapped is, as Xen's per-page loop does
    else:
        first = None
    for i in range(count):
        try:
            ops.map_page(d, Dfn(dfn + i), Mfn(mfn + i), perms)
        except IommuError as exc:
            first = first or exc
    return first


def hwdom_init(iommu: Iommu, d: Domain, progress: ProgressFn | None = None) -> None:
    """Xen's iommu_hwdom_init: requirements, the strict-mode page-list map, then the vendor's hwdom_init."""
    if d.paging_mode_translate or d.direct_mapped:
        if not iommu.enabled and not d.direct_mapped:
            raise HypervisorBug("a translated (PVH) hardware domain cannot run without an IOMMU")
        iommu.config = replace(iommu.config, hwdom_passthrough=False, hwdom_strict=True)
    if not iommu.enabled or iommu.ops is None:
        return
    ops = iommu.ops
    st = iommu.state(d)
    st.platform_ops = ops
    st.status = IommuStatus.INITIALIZING
    st.need_sync = iommu.config.hwdom_strict and not iommu.use_hap_pt(d)
    if st.need_sync:
        pages = iommu.machine.pages
        mfns = pages.owned_by(d.domid)
        gfns = pages.m2p[mfns]
        keep = gfns != _NO_GFN
        mfns, gfns = mfns[keep], gfns[keep].astype(np.int64)
        perms = np.where(pages.device_writable(mfns), np.uint8(Perm.RW), np.uint8(Perm.R)).astype(np.uint8)
        order = np.argsort(gfns, kind="stable")
        first_err: IommuError | None = None
        done = 0
        total = int(mfns.size)
        with iommu.dont_flush():
            for dfn, mfn, count, perm in runs(gfns[order], mfns[order], perms[order]):
                err = _map_run_direct(ops, d, dfn, mfn, count, perm)
                first_err = first_err or err
                done += count
                if progress is not None:
                    progress(done, total)
        if "iotlb_flush_all" in ops.provided:
            ops.iotlb_flush_all(d)
        if first_err is not None:
            iommu.console.printk(
                LogLevel.WARNING, f"d{d.domid}: IOMMU mapping failed: {first_err.rc} ({first_err.message})"
            )
    ops.hwdom_init(d)
    st.status = IommuStatus.INITIALIZED


def _hwdom_frames(iommu: Iommu, d: Domain) -> npt.NDArray[np.int64]:
    """Every machine frame the x86 identity map of the hardware domain covers (Xen's hwdom_iommu_map)."""
    cfg = iommu.config
    machine = iommu.machine
    inclusive = d.is_pv if cfg.hwdom_inclusive is None else cfg.hwdom_inclusive
    reserved = True if cfg.hwdom_reserved is None else cfg.hwdom_reserved
    if inclusive and not d.is_pv:
        iommu.console.printk(LogLevel.WARNING, "map-inclusive is only supported for PV hardware domains")
        inclusive = False
    max_pfn = _FOUR_GIB_PFNS - 1
    top = max(machine.ram_frames, max_pfn + 1)
    pfn = np.arange(top, dtype=np.int64)
    etype = machine.e820.types_of(pfn)
    in_table = pfn < machine.pages.frames
    owner = np.full(top, -1, dtype=np.int32)
    owner[in_table] = machine.pages.owner[: int(in_table.sum())]
    is_ram = etype == int(E820Type.RAM)
    skip = ((pfn > max_pfn) & ~(is_ram & in_table)) | (owner == DOMID_XEN)
    if d.domid == 0 and d.is_hvm:
        skip |= pfn < 256
    skip |= etype == int(E820Type.UNUSABLE)
    want = np.zeros(top, dtype=bool)
    want |= is_ram & (not cfg.hwdom_strict)
    reserved_like = (etype == int(E820Type.RESERVED)) | (etype == int(E820Type.NVS))
    want |= reserved_like & (inclusive or reserved)
    other = ~is_ram & ~reserved_like & (etype != int(E820Type.UNUSABLE))
    want |= other & (d.is_pv and inclusive) & (pfn <= max_pfn)
    want &= ~skip
    if d.paging_mode_translate:
        for frame in (0xFEE00, 0xFEC00):  # the virtual LAPIC and IO-APIC pages of a PVH hardware domain
            if frame < top:
                want[frame] = False
    return np.nonzero(want)[0].astype(np.int64)


def arch_hwdom_init(iommu: Iommu, d: Domain, progress: ProgressFn | None = None) -> None:
    """Map the chosen frames 1:1 read-write: PV through the generic wrappers, PVH through its p2m."""
    if iommu.config.hwdom_passthrough:
        return
    frames = _hwdom_frames(iommu, d)
    perms = np.full(frames.shape, np.uint8(Perm.RW), dtype=np.uint8)
    total = int(frames.size)
    done = 0
    for pfn, _, count, _perm in runs(frames, frames, perms):
        if d.paging_mode_translate and d.p2m is not None:
            try:
                _p2m_identity(d, pfn, count)
            except IommuError as exc:
                iommu.console.printk(LogLevel.WARNING, f"d{d.domid}: identity map of {pfn:#x}+{count} failed: {exc}")
        else:
            try:
                iommu.map(d, Dfn(pfn), Mfn(pfn), count, Perm.RW)
            except IommuError:
                # as Xen's per-page loop: whatever can be mapped is, failures are only reported
                for i in range(count):
                    try:
                        iommu.map_page(d, Dfn(pfn + i), Mfn(pfn + i), Perm.RW)
                    except IommuError as exc:
                        iommu.console.printk(
                            LogLevel.WARNING, f"d{d.domid}: identity map of {pfn + i:#x} failed ({exc.rc})"
                        )
        done += count
        if progress is not None and (done % _PROGRESS_EVERY < count or done == total):
            progress(done, total)


def _p2m_identity(d: Domain, pfn: int, count: int) -> None:
    assert d.p2m is not None
    for i in range(count):
        d.p2m.set_entry(Gfn(pfn + i), Mfn(pfn + i), 0, P2mType.MMIO_DIRECT)


def populate_page_table(iommu: Iommu, d: Domain) -> None:
    """Xen's x86 arch_iommu_populate_page_table: map every page of a domain that gains a device.

    HVM pages, and writable PV pages, are mapped read-write at their guest frame.  On failure the domain's
    IOMMU state is torn down and the error returned, as Xen does.
    """
    ops = iommu.ops
    if ops is None:
        return
    if d.is_dying:
        raise NoSuchDomain("domain is dying", op="populate_page_table", domain=d)
    pages = iommu.machine.pages
    mfns = pages.owned_by(d.domid)
    if not d.is_hvm:
        from iommusim.machine.pages import PageType

        mfns = mfns[pages.ptype[mfns] == int(PageType.WRITABLE)]
    gfns = pages.m2p[mfns]
    keep = gfns != _NO_GFN
    mfns, gfns = mfns[keep], gfns[keep].astype(np.int64)
    order = np.argsort(gfns, kind="stable")
    perms = np.full(mfns.shape, np.uint8(Perm.RW), dtype=np.uint8)
    try:
        with iommu.dont_flush():
            for dfn, mfn, count, perm in runs(gfns[order], mfns[order], perms):
                if "map_range" in ops.provided:
                    ops.map_range(d, Dfn(dfn), Mfn(mfn), count, perm)
                else:
                    for i in range(count):
                        ops.map_page(d, Dfn(dfn + i), Mfn(mfn + i), perm)
    except IommuError as exc:
        iommu.teardown(d)
        raise exc.with_context(op="populate_page_table", domain=d) from None
    iommu.iotlb_flush_all(d)
