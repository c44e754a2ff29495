"""The hypervisor's generic IOMMU layer (Xen's drivers/passthrough/iommu.c) with Xen's error policy.

The layer sits between everything that changes a domain's DMA view (p2m updates, hardware-domain set-up,
device assignment, callers of the public map/unmap) and the vendor driver behind ``IommuOps``:

* with the IOMMU disabled, or for a domain without IOMMU state, map/unmap/flush are no-ops;
* a driver error is logged through the console's rate limiter (unless the domain is already shutting
  down), crashes the domain (unless it is the hardware domain, which is exempt), and is re-raised;
* a missing optional op makes the corresponding flush a no-op, as Xen's NULL checks do;
* the range form ``map``/``unmap`` suppresses the drivers' implicit flushes, accumulates their flush flags
  and flushes once, undoing its own partial work if a page fails.

Kinds are checked on entry (``TypeError`` naming both kinds) before anything else happens, so a caller's
mistake never crashes a domain.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from iommusim.console import LogLevel
from iommusim.errors import (
    InvalidArgument,
    IommuError,
    NoDevice,
    NotSupported,
)
from iommusim.frames import Dfn, Mfn, expect_kind
from iommusim.iommu.config import IommuConfig
from iommusim.iommu.ledger import FlushLedger
from iommusim.iommu.ops import DomainIommu, IommuOps, IommuStatus, ReservedMemoryCallback
from iommusim.perms import FlushFlags, Perm

if TYPE_CHECKING:
    from iommusim.console import Console
    from iommusim.machine.domain import Domain
    from iommusim.machine.machine import Machine
    from iommusim.pagetable.walk import Mapping

__all__ = ["Iommu", "ProgressFn"]

#: progress(done, total) for long operations such as hardware-domain set-up.
ProgressFn = Callable[[int, int], None]

_VALID_PERMS = int(Perm.RW)
_EVERY_DFN = 1 << 52  # more Dfns than any vendor's widest address space has


class Iommu:
    """The generic layer for one machine, bound to one vendor driver (or none)."""

    def __init__(self, machine: Machine, ops: IommuOps | None, config: IommuConfig | None = None) -> None:
        self.machine = machine
        self.ops = ops
        self.config = config or IommuConfig()
        self.enabled = False
        self._tls = threading.local()
        # deferred page-table frees: (frame, level, domid whose flush they wait for, or None)
        self._cleanup: list[tuple[Mfn, int, int | None]] = []
        self.log_suppressed_while_shutting_down = 0
        self.setup_error: IommuError | None = None
        self._hwdom_progress: ProgressFn | None = None
        #: Changes left unflushed on purpose (batching callers), until a flush covers them.
        self.ledger = FlushLedger()

    @property
    def console(self) -> Console:
        return self.machine.console

    # -- set-up (iommu_setup) ----------------------------------------------------------------------------

    def setup(self) -> None:
        """Bring the IOMMU up: strict forces passthrough off; hardware set-up decides ``enabled``."""
        cfg = self.config
        if cfg.hwdom_strict and cfg.hwdom_passthrough:
            self.config = cfg = _replace(cfg, hwdom_passthrough=False)
        rc: IommuError | None = None
        if cfg.enable and self.ops is not None:
            try:
                self.ops.hardware_setup(self)
                self.enabled = True
            except IommuError as exc:
                rc = exc
        if not self.enabled:
            if cfg.force:
                from iommusim.errors import HypervisorBug

                raise HypervisorBug("IOMMU required (iommu=force) but it could not be enabled")
            self.config = _replace(cfg, snoop=False, hwdom_passthrough=False, hwdom_strict=False, intremap=False)
        mode = "Passthrough" if self.config.hwdom_passthrough else "Strict" if self.config.hwdom_strict else "Relaxed"
        self.console.printk(LogLevel.INFO, f"I/O virtualisation {'enabled' if self.enabled else 'disabled'}")
        if self.enabled:
            self.console.printk(LogLevel.INFO, f" - Dom0 mode: {mode}")
        self.setup_error = rc

    # -- per-domain state ---------------------------------------------------------------------------------

    def domain_init(self, d: Domain) -> None:
        """Give the domain its IOMMU state; vendor init runs only when the IOMMU is enabled."""
        lock = DomainIommu.unlocked() if not self.config.mapping_lock else threading.Lock()
        d.iommu = DomainIommu(mapping_lock=lock)
        if not self.enabled or self.ops is None:
            return
        d.iommu.platform_ops = self.ops
        if d.p2m is not None and hasattr(d.p2m, "listeners"):
            from iommusim.iommu.p2m_sync import P2mSync

            d.p2m.listeners.append(P2mSync(self, d))
        try:
            self.ops.init(d)
        except IommuError as exc:
            raise exc.with_context(op="iommu_domain_init", domain=d) from None

    def state(self, d: Domain) -> DomainIommu:
        st = d.iommu
        if not isinstance(st, DomainIommu):
            st = d.iommu = DomainIommu(
                mapping_lock=DomainIommu.unlocked() if not self.config.mapping_lock else threading.Lock()
            )
        return st

    def _ops_for(self, d: Domain) -> IommuOps | None:
        if not self.enabled:
            return None
        st = d.iommu
        return st.platform_ops if isinstance(st, DomainIommu) else None

    def has_op(self, name: str) -> bool:
        return self.ops is not None and name in self.ops.provided

    def use_hap_pt(self, d: Domain) -> bool:
        """Xen's iommu_use_hap_pt(d): does the IOMMU walk the CPU's own tables for this domain?"""
        return self.ops is not None and self.ops.uses_shared_tables(d)

    # -- the batching flag (Xen's per-CPU iommu_dont_flush_iotlb) -------------------------------------------

    @property
    def dont_flush_iotlb(self) -> bool:
        return bool(getattr(self._tls, "dont_flush", False))

    @contextmanager
    def dont_flush(self) -> Iterator[None]:
        """Suppress the drivers' implicit flushes on this thread; the caller flushes afterwards."""
        prev = self.dont_flush_iotlb
        self._tls.dont_flush = True
        try:
            yield
        finally:
            self._tls.dont_flush = prev

    # -- error policy -----------------------------------------------------------------------------------------

    def _fail(self, d: Domain, exc: IommuError, message: str) -> None:
        """Log (rate-limited, not while shutting down), crash unless hardware domain; the caller re-raises."""
        if not d.is_shutting_down:
            self.console.printk_ratelimited(LogLevel.ERR, f"{message} (rc {exc.rc})")
        else:
            self.log_suppressed_while_shutting_down += 1
        if not d.is_hardware:
            d.crash(f"{exc.op or 'iommu'}: {exc.message}")

    # -- map / unmap / lookup (the legacy one-page wrappers) --------------------------------------------------

    def map_page(self, d: Domain, dfn: Dfn, mfn: Mfn, perms: Perm) -> FlushFlags:
        """Map one page; the driver flushes implicitly unless inside ``dont_flush``."""
        expect_kind(Dfn, dfn, "dfn")
        expect_kind(Mfn, mfn, "mfn")
        _check_perms(perms)
        ops = self._ops_for(d)
        if ops is None:
            return FlushFlags.NONE
        try:
            flags = ops.map_page(d, dfn, mfn, perms)
        except IommuError as exc:
            exc.with_context(op="map_page", domain=d)
            self._fail(d, exc, f"d{d.domid}: IOMMU map of dfn {dfn.xen()} to mfn {mfn.xen()} failed")
            raise
        if flags and self.dont_flush_iotlb:
            self.ledger.note(d.domid, dfn.value, 1)
        return flags

    def unmap_page(self, d: Domain, dfn: Dfn) -> FlushFlags:
        expect_kind(Dfn, dfn, "dfn")
        ops = self._ops_for(d)
        if ops is None:
            return FlushFlags.NONE
        try:
            flags = ops.unmap_page(d, dfn)
        except IommuError as exc:
            exc.with_context(op="unmap_page", domain=d)
            self._fail(d, exc, f"d{d.domid}: IOMMU unmap of dfn {dfn.xen()} failed")
            raise
        if flags and self.dont_flush_iotlb:
            self.ledger.note(d.domid, dfn.value, 1)
        return flags

    def note_unflushed(self, d: Domain, dfn: Dfn, count: int) -> None:
        """Record a change whose flush a batching caller owes (for hooks that skip their own flush)."""
        self.ledger.note(d.domid, expect_kind(Dfn, dfn, "dfn").value, count)

    def lookup_page(self, d: Domain, dfn: Dfn) -> tuple[Mfn, Perm]:
        """The Mfn and permissions a Dfn maps to; EOPNOTSUPP where there is no lookup."""
        expect_kind(Dfn, dfn, "dfn")
        ops = self._ops_for(d)
        if ops is None:
            raise NotSupported("the IOMMU is disabled or the domain has no IOMMU", op="lookup_page", domain=d)
        if "lookup_page" not in ops.provided:
            if self.config.quirk("lookup-null-deref"):
                from iommusim.errors import HypervisorBug

                raise HypervisorBug(f"NULL dereference: {ops.name} has no lookup_page op")
            raise NotSupported(f"{ops.name} has no lookup_page", op="lookup_page", domain=d, frame=dfn)
        try:
            return ops.lookup_page(d, dfn)
        except IommuError as exc:
            raise exc.with_context(op="lookup_page", domain=d) from None

    # -- flushes -----------------------------------------------------------------------------------------------

    def iotlb_flush(self, d: Domain, dfn: Dfn, count: int, flags: FlushFlags = FlushFlags.MODIFIED) -> None:
        """Flush ``count`` pages from ``dfn``; no-op without IOMMU, without the op, or with nothing to flush."""
        expect_kind(Dfn, dfn, "dfn")
        if count < 0:  # Xen's page_count is unsigned: a negative count is the caller's mistake, not a flush
            raise InvalidArgument("negative page count", op="iotlb_flush", domain=d)
        ops = self._ops_for(d)
        if ops is None or not count or not flags:
            return
        # Only a flush for modified entries pays what a skipped flush owes: for additions alone a driver may
        # send nothing (VT-d without caching mode), and stale entries of earlier changes stay cached.
        pays = bool(flags & (FlushFlags.MODIFIED | FlushFlags.ALL))
        if "iotlb_flush" not in ops.provided:
            if pays:  # the caller did its part; Xen's NULL op did nothing
                self.ledger.flushed(d.domid, dfn.value, count)
            return
        try:
            ops.iotlb_flush(d, dfn, count, flags)
            if pays:
                self.ledger.flushed(d.domid, dfn.value, count)
        except IommuError as exc:
            # the flush did not happen: the window stays open, and is now a reported one (the error below)
            self.ledger.note(d.domid, dfn.value, count)
            exc.with_context(op="iotlb_flush", domain=d)
            self._fail(d, exc, f"d{d.domid}: IOMMU IOTLB flush of dfn {dfn.xen()}, {count} page(s), failed")
            raise

    def iotlb_flush_all(self, d: Domain) -> None:
        ops = self._ops_for(d)
        if ops is None:
            return
        if "iotlb_flush_all" not in ops.provided:
            self.ledger.flushed_all(d.domid)
            return
        try:
            ops.iotlb_flush_all(d)
            self.ledger.flushed_all(d.domid)
        except IommuError as exc:
            self.ledger.note(d.domid, 0, _EVERY_DFN)  # as iotlb_flush: every window stays open, reported
            exc.with_context(op="iotlb_flush_all", domain=d)
            self._fail(d, exc, f"d{d.domid}: IOMMU IOTLB flush of everything failed")
            raise

    # -- the range form with flush-flag accumulation -----------------------------------------------------------

    def map(self, d: Domain, dfn: Dfn, mfn: Mfn, count: int, perms: Perm, *, flush: bool = True) -> FlushFlags:
        """Map ``count`` pages and flush once at the end.

        No flush happens with ``flush=False`` or inside the caller's own ``dont_flush`` batch: the caller
        flushes then, using the returned flags.

        All or nothing: if a page fails, the pages this call changed get their previous translation back
        (or are unmapped if they had none), the domain is crashed unless it is the hardware domain, and the
        error is re-raised.
        """
        expect_kind(Dfn, dfn, "dfn")
        expect_kind(Mfn, mfn, "mfn")
        _check_perms(perms)
        if count < 0:
            raise InvalidArgument("negative page count", op="map", domain=d)
        ops = self._ops_for(d)
        if ops is None or count == 0:
            return FlushFlags.NONE
        flush = flush and not self.dont_flush_iotlb
        flags = FlushFlags.NONE
        try:
            with self.dont_flush():
                if "map_range" in ops.provided:
                    flags = ops.map_range(d, dfn, mfn, count, perms)
                else:
                    flags = self._map_pages(ops, d, dfn, mfn, count, perms)
        except IommuError as exc:
            exc.with_context(op="map", domain=d)
            self._fail(d, exc, f"d{d.domid}: IOMMU map of {count} page(s) at dfn {dfn.xen()} failed")
            raise
        if flush:
            self.iotlb_flush(d, dfn, count, flags)
        elif flags:
            self.ledger.note(d.domid, dfn.value, count)
        return flags

    def _map_pages(self, ops: IommuOps, d: Domain, dfn: Dfn, mfn: Mfn, count: int, perms: Perm) -> FlushFlags:
        can_lookup = "lookup_page" in ops.provided
        undo: list[tuple[Dfn, tuple[Mfn, Perm] | None]] = []
        flags = FlushFlags.NONE
        try:
            for i in range(count):
                page = dfn + i
                old: tuple[Mfn, Perm] | None = None
                if can_lookup:
                    try:
                        old = ops.lookup_page(d, page)
                    except IommuError:
                        old = None
                f = ops.map_page(d, page, mfn + i, perms)
                undo.append((page, old))
                flags |= f
        except IommuError:
            for page, old in reversed(undo):
                try:
                    if old is None:
                        ops.unmap_page(d, page)
                    else:
                        ops.map_page(d, page, old[0], old[1])
                except IommuError:
                    pass
            if undo:
                self._flush_after_failure(ops, d, dfn, len(undo))
            raise
        return flags

    def _flush_after_failure(self, ops: IommuOps, d: Domain, dfn: Dfn, count: int) -> None:
        try:
            if "iotlb_flush" in ops.provided:
                ops.iotlb_flush(d, dfn, count, FlushFlags.MODIFIED | FlushFlags.ADDED)
        except IommuError:
            pass

    def unmap(self, d: Domain, dfn: Dfn, count: int, *, flush: bool = True) -> FlushFlags:
        """Unmap ``count`` pages and flush once (as ``map``).  The first error stops the loop and is re-raised."""
        expect_kind(Dfn, dfn, "dfn")
        if count < 0:
            raise InvalidArgument("negative page count", op="unmap", domain=d)
        ops = self._ops_for(d)
        if ops is None or count == 0:
            return FlushFlags.NONE
        flush = flush and not self.dont_flush_iotlb
        flags = FlushFlags.NONE
        done = 0
        try:
            with self.dont_flush():
                if "unmap_range" in ops.provided:
                    flags = ops.unmap_range(d, dfn, count)
                    done = count
                else:
                    for i in range(count):
                        flags |= ops.unmap_page(d, dfn + i)
                        done += 1
        except IommuError as exc:
            exc.with_context(op="unmap", domain=d)
            if done:
                self._flush_after_failure(ops, d, dfn, done)
            self._fail(d, exc, f"d{d.domid}: IOMMU unmap of {count} page(s) at dfn {dfn.xen()} failed")
            raise
        if flush:
            self.iotlb_flush(d, dfn, count, flags)
        elif flags:
            self.ledger.note(d.domid, dfn.value, count)
        return flags

    # -- hardware domain, construction and teardown ------------------------------------------------------------

    def hwdom_init(self, d: Domain, progress: ProgressFn | None = None) -> None:
        from iommusim.iommu.hwdom import hwdom_init

        # the vendor's hwdom_init has no progress argument: arch_hwdom_init picks it up from here
        self._hwdom_progress = progress
        try:
            hwdom_init(self, d, progress)
        finally:
            self._hwdom_progress = None

    def arch_hwdom_init(self, d: Domain, progress: ProgressFn | None = None) -> None:
        """The x86 identity map of the hardware domain; vendors call it from their hwdom_init.

        Without an explicit ``progress`` it reports to the one given to ``hwdom_init``, if any.
        """
        from iommusim.iommu.hwdom import arch_hwdom_init

        if progress is None:
            progress = self._hwdom_progress
        arch_hwdom_init(self, d, progress)

    def construct(self, d: Domain) -> None:
        """Give a domain IOMMU tables when it gains its first device (Xen's iommu_construct)."""
        st = self.state(d)
        if st.status == IommuStatus.INITIALIZED:
            return
        st.status = IommuStatus.INITIALIZING
        shared = self.use_hap_pt(d)
        st.need_sync = not shared
        if not shared:
            from iommusim.iommu.hwdom import populate_page_table

            try:
                populate_page_table(self, d)
            except IommuError:
                st.need_sync = False
                st.status = IommuStatus.DISABLED
                raise
        st.status = IommuStatus.INITIALIZED

    def teardown(self, d: Domain) -> None:
        """Drop a domain's IOMMU tables (Xen's iommu_teardown) and run the deferred frees."""
        st = self.state(d)
        st.status = IommuStatus.DISABLED
        st.need_sync = False
        ops = self._ops_for(d)
        if ops is not None:
            ops.teardown(d)
        self.run_cleanup(d)

    def domain_destroy(self, d: Domain) -> None:
        # windows its callers left open die with it: a later domain with the same id must not inherit them
        self.ledger.flushed_all(d.domid)
        if self._ops_for(d) is None:
            return
        self.teardown(d)

    # -- deferred page-table freeing (Xen's cleanup tasklet) -----------------------------------------------------

    def defer_free(self, mfn: Mfn, level: int, d: Domain | None = None) -> None:
        """Queue a table page (and, through the vendor, its subtree) to be freed later.

        A page unhooked from domain ``d``'s live tables names ``d``: it is freed only once ``d`` owes no
        flush, since until then a unit's caches may still lead to it (a page freed and reused while a
        paging-structure cache points at it would be walked as a table).
        """
        self._cleanup.append((expect_kind(Mfn, mfn, "mfn"), level, None if d is None else d.domid))

    @property
    def pending_frees(self) -> int:
        return len(self._cleanup)

    def deferred_frees(self) -> list[tuple[Mfn, int]]:
        """The table pages queued by ``defer_free`` and not freed yet, as (frame, level): for checkers."""
        return [(mfn, level) for mfn, level, _ in self._cleanup]

    def run_cleanup(self, dying: Domain | None = None) -> int:
        """Free the deferred pages whose domain owes no flush (or is ``dying``); returns pages freed.

        Pages still waiting for their domain's flush stay queued for a later run.
        """
        n = 0
        waiting: list[tuple[Mfn, int, int | None]] = []
        while self._cleanup:
            mfn, level, domid = self._cleanup.pop(0)
            if domid is not None and (dying is None or domid != dying.domid) and self.ledger.pending(domid):
                waiting.append((mfn, level, domid))
                continue
            if self.ops is not None and "free_page_table" in self.ops.provided:
                self.ops.free_page_table(mfn, level)
            else:
                self.machine.allocator.free(mfn)
            n += 1
        self._cleanup = waiting + self._cleanup
        return n

    # -- devices -------------------------------------------------------------------------------------------------

    def add_device(self, sbdf: object) -> None:
        from iommusim.iommu.devices import add_device

        add_device(self, sbdf)

    def remove_device(self, sbdf: object) -> None:
        from iommusim.iommu.devices import remove_device

        remove_device(self, sbdf)

    def assign_device(self, d: Domain, sbdf: object, flag: int = 0) -> None:
        from iommusim.iommu.devices import assign_device

        assign_device(self, d, sbdf, flag)

    def deassign_device(self, d: Domain, sbdf: object) -> None:
        from iommusim.iommu.devices import deassign_device

        deassign_device(self, d, sbdf)

    # -- the rest of the generic entry points -------------------------------------------------------------------

    def suspend(self) -> None:
        if self.enabled and self.ops is not None and "suspend" in self.ops.provided:
            self.ops.suspend()

    def resume(self) -> None:
        if self.enabled and self.ops is not None and "resume" in self.ops.provided:
            self.ops.resume()

    def crash_shutdown(self) -> None:
        if self.enabled and self.ops is not None and "crash_shutdown" in self.ops.provided:
            self.ops.crash_shutdown()
        self.enabled = False
        self.config = _replace(self.config, intremap=False)

    def share_p2m(self, d: Domain) -> None:
        if self.enabled and self.ops is not None and self.use_hap_pt(d) and "share_p2m" in self.ops.provided:
            self.ops.share_p2m(d)

    def get_reserved_device_memory(self, fn: ReservedMemoryCallback, ctxt: object = None) -> int:
        if not self.enabled or self.ops is None or "get_reserved_device_memory" not in self.ops.provided:
            return 0
        return self.ops.get_reserved_device_memory(fn, ctxt)

    def has_feature(self, d: Domain, feature: str) -> bool:
        return self.enabled and isinstance(d.iommu, DomainIommu) and feature in d.iommu.features

    def dump_page_tables(self, d: Domain) -> list[Mapping]:
        """The domain's translations read back from memory (empty where the vendor has no dump)."""
        ops = self._ops_for(d)
        if ops is None or "dump_page_tables" not in ops.provided:
            return []
        return ops.dump_page_tables(d)

    def debug_key_dump(self) -> list[str]:
        """Xen's 'o' debug key: every non-hardware domain with tables, as text."""
        if not self.enabled:
            return ["IOMMU not enabled!"]
        out: list[str] = []
        for d in sorted(self.machine.domains.values(), key=lambda x: x.domid):
            st = d.iommu
            if d.is_hardware or not isinstance(st, DomainIommu) or st.status != IommuStatus.INITIALIZED:
                continue
            out.append(f"domain{d.domid} IOMMU p2m table:")
            if self.use_hap_pt(d):
                out.append("    shared with the CPU's p2m")
                continue
            for m in self.dump_page_tables(d):
                out.append(
                    f"    dfn {m.dfn:x}..{m.dfn_end - 1:x} -> mfn {m.mfn:x}..{m.mfn + m.pages - 1:x} "
                    f"{m.perms.short()} {1 << (m.page_shift - 10)}K"
                )
        return out

    def require_ops(self) -> IommuOps:
        if self.ops is None or not self.enabled:
            raise NoDevice("no IOMMU is enabled")
        return self.ops


def _check_perms(perms: Perm) -> None:
    if not isinstance(perms, int) or int(perms) & ~_VALID_PERMS:
        raise InvalidArgument(f"bad mapping flags {perms!r}: only read (R) and write (W) exist")


def _replace(cfg: IommuConfig, **changes: object) -> IommuConfig:
    from dataclasses import replace

    return replace(cfg, **changes)  # type: ignore[arg-type]
