"""Building a domain's IOMMU view of its own memory: the hardware domain at boot, other domains later.

Three of Xen's paths live here:

* ``hwdom_init`` (generic): in strict mode, map every page the hardware domain owns at its guest frame,
  writable only where the page's type allows it, then hand over to the vendor;
* ``arch_hwdom_init`` (x86): the 1:1 map of machine frames chosen from the E820 map, Xen's own frames
  and the strict/inclusive/reserved options; vendors call it from their own hwdom_init;
* ``populate_page_table`` (x86): when a domain gets its first device, map all its pages.

The two hardware-domain paths select by extents, not page by page: the strict map from the runs the
allocator gave the domain (an untouched run is one read-write run; a disturbed one is selected per page
within it), the identity map from the stretches between E820 boundaries with Xen's frames cut out.  The
per-page selections are kept (``owned_runs_per_page``, ``_hwdom_frames``) as the references the tests hold
the extent versions to.  Runs go to the vendor's bulk op where it has one, so that a multi-GiB hardware
domain is set up in milliseconds.
"""

from __future__ import annotations

import itertools
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
    from iommusim.machine.machine import Machine
    from iommusim.machine.pages import PageTable

__all__ = ["arch_hwdom_init", "hwdom_init", "owned_runs", "owned_runs_per_page", "populate_page_table", "runs"]

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


def owned_runs_per_page(machine: Machine, domid: int) -> list[tuple[int, int, int, Perm]]:
    """The strict map of a domain's own pages, page by page: (gfn, mfn, count, perms) runs in gfn order.

    Every frame the domain owns that has an M2P entry, at that guest frame, writable when the page may be
    (``device_writable``); sorted by guest frame (stable: by machine frame for equal guest frames) and cut
    into maximal runs.  The reference for ``owned_runs``, and its fallback.
    """
    pages = machine.pages
    mfns = pages.owned_by(domid)
    return _runs_of(machine, mfns)


def _runs_of(machine: Machine, mfns: npt.NDArray[np.int64]) -> list[tuple[int, int, int, Perm]]:
    pages = machine.pages
    gfns = pages.m2p[mfns]
    keep = gfns != _NO_GFN
    mfns, gfns = mfns[keep], gfns[keep].astype(np.int64)
    perms = np.where(pages.device_writable(mfns), np.uint8(Perm.RW), np.uint8(Perm.R)).astype(np.uint8)
    order = np.argsort(gfns, kind="stable")
    return list(runs(gfns[order], mfns[order], perms[order]))


def owned_runs(machine: Machine, domid: int) -> list[tuple[int, int, int, Perm]]:
    """``owned_runs_per_page`` computed by extents: the allocator's runs of the domain, checked in bulk.

    Frames change owner only through the allocator (the one caller of ``PageTable.set_owner``), so the
    runs it gave the domain hold every frame the domain owns; no scan of all RAM is needed.

    An extent whose frames are all the domain's, with consecutive M2P entries and no type reference (the
    state ``populate`` leaves them in) is one read-write run without per-page work; an extent that differs
    anywhere is done page by page.  The pieces are then ordered and merged as the per-page sort would; if
    their guest frames overlap (an M2P that maps two pages to one guest frame), the per-page reference is
    used as a whole.
    """
    pages = machine.pages
    pieces: list[tuple[int, int, int, Perm]] = []
    for start, count in machine.allocator.domain_extents(domid):
        end = min(start + count, pages.frames)
        if end <= start:
            continue
        if _plain_extent(pages, domid, start, end):
            pieces.append((int(pages.m2p[start]), start, end - start, Perm.RW))
            continue
        own = np.flatnonzero(pages.owner[start:end] == domid).astype(np.int64) + start
        pieces.extend(_runs_of(machine, own))
    pieces.sort(key=lambda r: (r[0], r[1]))
    out: list[tuple[int, int, int, Perm]] = []
    for g, m, n, p in pieces:
        if out:
            pg, pm, pn, pp = out[-1]
            if g < pg + pn:
                return owned_runs_per_page(machine, domid)  # overlapping guest frames: let the sort decide
            if g == pg + pn and m == pm + pn and p == pp:
                out[-1] = (pg, pm, pn + n, pp)
                continue
        out.append((g, m, n, p))
    return out


def _plain_extent(pages: PageTable, domid: int, start: int, end: int) -> bool:
    """All the domain's, guest frames consecutive (none missing), no type references: one RW run.

    Checked in cache-sized chunks: whole-extent temporaries would cost more in fresh pages than the checks.
    """
    g0 = int(pages.m2p[start])
    if g0 == int(_NO_GFN) or g0 + (end - start) > int(_NO_GFN):
        return False
    ramp = _ramp()
    for a in range(start, end, _CHUNK):
        b = min(a + _CHUNK, end)
        if (pages.owner[a:b] != domid).any() or pages.type_count[a:b].any():
            return False
        if not np.array_equal(pages.m2p[a:b] - np.uint64(g0 + (a - start)), ramp[: b - a]):
            return False
    return True


_CHUNK = 1 << 15
_RAMP: list[npt.NDArray[np.uint64]] = []


def _ramp() -> npt.NDArray[np.uint64]:
    """0, 1, 2, ... (one chunk long), made once."""
    if not _RAMP:
        _RAMP.append(np.arange(_CHUNK, dtype=np.uint64))
    return _RAMP[0]


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
        todo = owned_runs(iommu.machine, d.domid)
        first_err: IommuError | None = None
        done = 0
        total = sum(r[2] for r in todo)
        with iommu.dont_flush():
            for dfn, mfn, count, perm in todo:
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


def _hwdom_runs(iommu: Iommu, d: Domain) -> list[tuple[int, int]]:
    """``_hwdom_frames`` as maximal (first pfn, count) runs, worked out by extents rather than per frame.

    Every rule of the per-frame selection is constant between the E820 boundaries, the 4 GiB line, the end
    of installed RAM, pfn 256 and the two PVH pages, except "owned by Xen", which is looked up only over
    the stretches that are otherwise wanted.
    """
    cfg = iommu.config
    machine = iommu.machine
    pages = machine.pages
    inclusive = d.is_pv if cfg.hwdom_inclusive is None else cfg.hwdom_inclusive
    reserved = True if cfg.hwdom_reserved is None else cfg.hwdom_reserved
    if inclusive and not d.is_pv:
        inclusive = False  # arch_hwdom_init prints the warning
    max_pfn = _FOUR_GIB_PFNS - 1
    top = max(machine.ram_frames, max_pfn + 1)
    cuts = {0, top, max_pfn + 1, pages.frames, 256}
    for e in machine.e820.entries:
        cuts.update((e.start_pfn, e.end_pfn))
    pvh_holes = (0xFEE00, 0xFEC00) if d.paging_mode_translate else ()
    for f in pvh_holes:
        cuts.update((f, f + 1))
    bounds = sorted(c for c in cuts if 0 <= c <= top)
    out: list[tuple[int, int]] = []
    for a, b in itertools.pairwise(bounds):
        etype = machine.e820.type_of(a)
        t = 0 if etype is None else int(etype)
        in_table = a < pages.frames
        is_ram = t == int(E820Type.RAM)
        reserved_like = t in (int(E820Type.RESERVED), int(E820Type.NVS))
        other = not is_ram and not reserved_like and t != int(E820Type.UNUSABLE)
        want = (is_ram and not cfg.hwdom_strict) or (reserved_like and (inclusive or reserved))
        want = want or (other and d.is_pv and inclusive and a <= max_pfn)
        skip = (a > max_pfn and not (is_ram and in_table)) or t == int(E820Type.UNUSABLE)
        skip = skip or (d.domid == 0 and d.is_hvm and a < 256) or a in pvh_holes
        if not want or skip:
            continue
        for lo, hi in _not_xen(pages, a, b):
            if out and out[-1][0] + out[-1][1] == lo:
                out[-1] = (out[-1][0], out[-1][1] + hi - lo)
            else:
                out.append((lo, hi - lo))
    return out


def _not_xen(pages: PageTable, a: int, b: int) -> list[tuple[int, int]]:
    """The stretches of [a, b) not owned by Xen (frames beyond installed RAM have no owner)."""
    end = min(b, pages.frames)
    if a >= end:
        return [(a, b)]
    xen = pages.owner[a:end] == DOMID_XEN
    if not xen.any():
        return [(a, b)]
    edges = np.flatnonzero(np.diff(xen.view(np.int8))) + 1  # where Xen's ownership starts or stops
    starts = np.concatenate(([0], edges)).tolist()
    ends = np.concatenate((edges, [end - a])).tolist()
    out = [(a + s, a + e) for s, e in zip(starts, ends, strict=True) if not xen[s]]
    if end < b:
        if out and out[-1][1] == end:
            out[-1] = (out[-1][0], b)
        else:
            out.append((end, b))
    return out


def arch_hwdom_init(iommu: Iommu, d: Domain, progress: ProgressFn | None = None) -> None:
    """Map the chosen frames 1:1 read-write: PV through the generic wrappers, PVH through its p2m."""
    if iommu.config.hwdom_passthrough:
        return
    cfg = iommu.config
    if (d.is_pv if cfg.hwdom_inclusive is None else cfg.hwdom_inclusive) and not d.is_pv:
        iommu.console.printk(LogLevel.WARNING, "map-inclusive is only supported for PV hardware domains")
    chosen = _hwdom_runs(iommu, d)
    total = sum(n for _, n in chosen)
    done = 0
    for pfn, count in chosen:
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
