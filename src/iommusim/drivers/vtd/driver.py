"""The Intel VT-d driver behind ``IommuOps`` (Xen's drivers/passthrough/vtd/iommu.c, seed era).

Domains get second-level tables of the domain's width (Xen: 48 bits, 4 levels) built with the shared radix
engine and the unit-independent VT-d entry codec; devices are pointed at them through root and context
tables per unit; every change is followed by the invalidation Xen issues for it, through the invalidation
queue or the command registers.  Where the seed code has a defect the facts file lists, the default here
is the corrected behaviour and the seed behaviour is a quirk.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import TYPE_CHECKING

from iommusim.console import LogLevel
from iommusim.drivers.vtd.context import context_map, context_unmap
from iommusim.drivers.vtd.dmar import DmarTable
from iommusim.drivers.vtd.rmrr import RDM_RELAXED, rmrr_identity_map, rmrr_identity_unmap
from iommusim.drivers.vtd.state import VtdDomain
from iommusim.drivers.vtd.unit import Granularity, IommuUnit
from iommusim.errors import (
    AddressNotAvailable,
    InvalidArgument,
    IommuError,
    NoDevice,
    NoSuchEntry,
    NotPermitted,
    NotSupported,
    OutOfMemory,
)
from iommusim.frames import INVALID_DFN, PAGE_SHIFT, Dfn, Mfn, expect_kind
from iommusim.hw.vtd.regs import FSTS, Reg, agaw_to_levels, agaw_to_width, width_to_agaw
from iommusim.iommu.devices import check_disable_device, move_device
from iommusim.iommu.ops import ReservedMemoryCallback
from iommusim.machine.pci import PciDevice, Sbdf
from iommusim.pagetable.format import EntryKind
from iommusim.pagetable.radix import RadixTable
from iommusim.pagetable.vtd import VtdSecondLevelFormat
from iommusim.pagetable.walk import Mapping, mappings
from iommusim.perms import FlushFlags, Perm

if TYPE_CHECKING:
    from iommusim.iommu.layer import Iommu
    from iommusim.machine.domain import Domain
    from iommusim.machine.machine import Machine

__all__ = ["DEFAULT_DOMAIN_WIDTH", "VtdDriver"]

DEFAULT_DOMAIN_WIDTH = 48  # Xen's DEFAULT_DOMAIN_ADDRESS_WIDTH
_FLAGS = tuple(FlushFlags(i) for i in range(8))  # by value: building IntFlags per call is slow

_PROVIDED = frozenset(
    {
        "add_device",
        "enable_device",
        "remove_device",
        "get_device_group_id",
        "lookup_page",
        "free_page_table",
        "suspend",
        "resume",
        "crash_shutdown",
        "iotlb_flush",
        "iotlb_flush_all",
        "get_reserved_device_memory",
        "dump_page_tables",
        "map_range",
        "unmap_range",
    }
)


class VtdDriver:
    """Xen's intel_iommu_ops over the units a DMAR table describes."""

    name = "vtd"
    provided = _PROVIDED

    def __init__(self, dmar: DmarTable, *, domain_width: int = DEFAULT_DOMAIN_WIDTH, ats: bool = False) -> None:
        self.dmar = dmar
        self.domain_width = domain_width
        self.ats = ats  # Xen's "ats" boot option (off by default)
        self.iommu: Iommu | None = None
        self.units: list[IommuUnit] = []
        self.page_sizes = 1 << 12
        self.snoop = False
        self.coherent = True
        self.fmt = VtdSecondLevelFormat(haw=dmar.haw, superpage_levels=frozenset())
        self.domain_agaw = width_to_agaw(domain_width)
        self._leaf_cache: tuple[object, bool, dict[Perm, int]] = (None, False, {})

    # -- helpers --------------------------------------------------------------------------------------

    def require_iommu(self) -> Iommu:
        if self.iommu is None:
            raise NoDevice("the VT-d driver has not been set up")
        return self.iommu

    @property
    def machine(self) -> Machine:
        return self.require_iommu().machine

    def state(self, d: Domain) -> VtdDomain:
        st = d.iommu.arch if d.iommu is not None else None
        if not isinstance(st, VtdDomain):
            raise InvalidArgument(f"d{d.domid} has no VT-d state", domain=d)
        return st

    def unit_of(self, dev: PciDevice) -> IommuUnit:
        idx = self.dmar.unit_index_for(dev.sbdf)
        if idx is None or idx >= len(self.units):
            raise NoDevice(f"{dev.sbdf} is not behind any VT-d unit")
        return self.units[idx]

    def is_passthrough_hwdom(self, d: Domain) -> bool:
        return d.is_hardware and self.require_iommu().config.hwdom_passthrough

    def _log(self, level: LogLevel, text: str) -> None:
        self.require_iommu().console.printk(level, text)

    def _check_width(self, st: VtdDomain, d: Domain, dfn: Dfn, count: int = 1) -> None:
        if dfn.value + count > st.dfn_limit:
            raise AddressNotAvailable(
                f"dfn {dfn.xen()}+{count:#x} is beyond d{d.domid}'s {st.width}-bit DMA address width",
                domain=d,
                frame=dfn,
            )

    def _page_dfn(self, st: VtdDomain, d: Domain, dfn: Dfn) -> Dfn:
        """The dfn a per-page op works on: refused beyond the width, or (seed quirk) masked into it."""
        if self.require_iommu().config.quirk("vtd-dfn-truncated"):
            return Dfn(dfn.value & (st.dfn_limit - 1))
        self._check_width(st, d, dfn)
        return dfn

    def _check_mfn(self, d: Domain, mfn: Mfn, count: int = 1) -> None:
        """A machine frame the entry's address field cannot hold (beyond the units' width) is EINVAL.

        Written as it is, its high bits would land in reserved or software fields and the entry would
        map some other frame, or fault, while the caller is told the page is mapped.
        """
        if (mfn.value + count) << PAGE_SHIFT > 1 << self.fmt.haw:
            raise InvalidArgument(
                f"{mfn!r}+{count} is beyond the {self.fmt.haw}-bit address width of the remapping units", domain=d
            )

    def _leaf(self, mfn: Mfn, perms: Perm, level: int = 1) -> int:
        if level == 1:
            return (mfn.value << PAGE_SHIFT) | self._leaf_bits1(perms)
        return (mfn.value << PAGE_SHIFT) | self.fmt.leaf_bits(perms, level, self.snoop if perms else None)

    def _leaf_bits1(self, perms: Perm) -> int:
        """4 KiB leaf bits per permission, worked out once per format (the per-page map's hot path)."""
        cache = self._leaf_cache
        if cache[0] is not self.fmt or cache[1] != self.snoop:
            cache = self._leaf_cache = (self.fmt, self.snoop, {})
        bits = cache[2].get(perms)
        if bits is None:
            bits = cache[2][perms] = self.fmt.leaf_bits(perms, 1, self.snoop if perms else None)
        return bits

    # -- set-up ---------------------------------------------------------------------------------------

    def hardware_setup(self, iommu: Iommu) -> None:
        """Probe every DRHD, pick widths and features, allocate and initialise the units (all or nothing)."""
        self.iommu = iommu
        if not self.dmar.drhds:
            raise NoDevice("the DMAR table lists no remapping unit")
        units = [IommuUnit(i, desc, iommu) for i, desc in enumerate(self.dmar.drhds)]
        best = max((a for u in units for a in range(5) if u.cap.supports_agaw(a)), default=-1)
        if best < 0:
            raise NoDevice("no VT-d unit reports a supported address width")
        if self.domain_agaw > best:
            self._log(
                LogLevel.WARNING,
                f"VT-d: domain width {self.domain_width} bits exceeds what the units walk; "
                f"using {agaw_to_width(best)} bits",
            )
            self.domain_agaw = best
        for u in units:
            u.pick_agaw(self.domain_agaw)
        cfg = iommu.config
        use_qi = cfg.qinval and all(u.ecap.qi for u in units)
        self.snoop = cfg.snoop and all(u.ecap.sc for u in units)
        self.coherent = all(u.ecap.c for u in units)
        sp = frozenset.intersection(*(u.cap.superpage_levels for u in units)) if cfg.superpages else frozenset()
        self.fmt = VtdSecondLevelFormat(
            haw=self.dmar.haw,
            superpage_levels=sp,
            snoop_control=self.snoop,
            device_tlb=all(u.ecap.dt for u in units),
        )
        self.page_sizes = (1 << 12) | sum(1 << (12 + 9 * (lv - 1)) for lv in sp)
        done: list[IommuUnit] = []
        try:
            for u in units:
                u.allocate(use_qi)
                done.append(u)
        except OutOfMemory:
            for u in done:
                u.release()
            raise
        self.units = units
        try:
            for u in units:
                u.desc.fault_irq.connect(partial(self._fault_handler, u))
                u.init_hw()
        except IommuError:
            for u in units:
                u.desc.fault_irq.connect(None)
                u.disable_qi()
                u.release()
            self.units = []
            raise
        names = {12: "4kB", 21: "2MB", 30: "1GB"}
        sizes = ", ".join(names.get(s, f"2^{s}B") for s in self._page_shifts())
        self._log(LogLevel.INFO, f"Intel VT-d: {len(units)} unit(s), page sizes {sizes}")
        self._log(LogLevel.INFO, f"Intel VT-d: queued invalidation {'enabled' if use_qi else 'not enabled'}")
        self._log(LogLevel.INFO, f"Intel VT-d: snoop control {'enabled' if self.snoop else 'not enabled'}")

    def _page_shifts(self) -> list[int]:
        return [s for s in range(12, 40) if self.page_sizes >> s & 1]

    def uses_shared_tables(self, d: Domain) -> bool:
        """EPT sharing is not modelled (the model has no EPT in memory): VT-d tables are always separate."""
        return False

    def share_p2m(self, d: Domain) -> None:
        """Not provided: the model has no EPT in memory for the unit to walk (see ``uses_shared_tables``)."""
        raise NotSupported("sharing the EPT with VT-d is not modelled", domain=d)

    def init(self, d: Domain) -> None:
        """Xen's intel_iommu_domain_init: the domain's width; the tables come on first use."""
        m = self.machine
        table = RadixTable(
            m.memory, m.allocator, self.fmt, owner=f"d{d.domid}:iommu-pt", levels=agaw_to_levels(self.domain_agaw)
        )
        d.iommu.arch = VtdDomain(table, self.domain_agaw, agaw_to_width(self.domain_agaw))
        if self.coherent:
            d.iommu.features.add("coherent-walk")

    def pgd_for_unit(self, d: Domain, unit: IommuUnit) -> int:
        """Address of the table a unit's context entry points at (the caller holds the mapping lock).

        Tables exist at least down to the unit's top level; for a unit that walks fewer levels than the
        domain's tables have, entry 0 of each upper table is followed, as Xen does.
        """
        st = self.state(d)
        table = st.table
        table.entry_slot(0, min(unit.levels, table.levels))
        frame = table.root
        assert frame is not None
        addr = frame.value << PAGE_SHIFT
        mem = self.machine.memory
        for level in range(table.levels, unit.levels, -1):
            d_ = self.fmt.decode(mem.read_u64(addr), level)
            if d_.kind != EntryKind.TABLE:
                raise OutOfMemory(f"d{d.domid}: no level-{level - 1} table under entry 0 for {unit.name}")
            addr = d_.address
        return addr

    # -- the hardware domain --------------------------------------------------------------------------

    def hwdom_init(self, d: Domain) -> None:
        """Xen's intel_iommu_hwdom_init: contexts, RMRRs, the identity map, global flushes, translation on."""
        iommu = self.require_iommu()
        for dev in list(d.pci_devices):
            try:
                context_map(self, d, dev.sbdf.devfn, dev)
            except IommuError as exc:
                self._log(LogLevel.ERR, f"VT-d: setting up {dev.sbdf} for d{d.domid} failed ({exc.rc})")
        for rmrr in self.dmar.rmrrs:
            if not rmrr.devices:
                continue
            try:
                rmrr_identity_map(self, d, rmrr)
            except IommuError as exc:
                self._log(LogLevel.ERR, f"VT-d: RMRR {rmrr.base_pfn:#x}-{rmrr.end_pfn:#x} not mapped ({exc.rc})")
        iommu.arch_hwdom_init(d)
        for u in self.units:
            try:
                u.flush_all()
            except IommuError as exc:
                self._log(LogLevel.ERR, f"{u.name}: global flush failed ({exc.rc})")
        for u in self.units:
            u.enable_translation()

    # -- map / unmap / lookup ----------------------------------------------------------------------------

    def map_page(self, d: Domain, dfn: Dfn, mfn: Mfn, perms: Perm) -> FlushFlags:
        expect_kind(Dfn, dfn, "dfn")
        expect_kind(Mfn, mfn, "mfn")
        if self.uses_shared_tables(d) or self.is_passthrough_hwdom(d):
            return FlushFlags.NONE
        st = self.state(d)
        dfn = self._page_dfn(st, d, dfn)
        self._check_mfn(d, mfn)
        new = (mfn.value << PAGE_SHIFT) | self._leaf_bits1(perms)
        with d.iommu.mapping_lock:
            change = st.table.set_leaf(dfn.value, new)
        old = change.old
        if old == new:
            return FlushFlags.NONE
        old_present = bool(old & 3)
        flags = _FLAGS[(1 if new & 3 else 0) | (2 if old_present else 0)]
        if not self.require_iommu().dont_flush_iotlb:
            self._flush(d, dfn, 1, old_present)
        return flags

    def unmap_page(self, d: Domain, dfn: Dfn) -> FlushFlags:
        expect_kind(Dfn, dfn, "dfn")
        if self.uses_shared_tables(d) or self.is_passthrough_hwdom(d):
            return FlushFlags.NONE
        st = self.state(d)
        dfn = self._page_dfn(st, d, dfn)
        table = st.table
        with d.iommu.mapping_lock:
            leaf = table.lookup(dfn.value)
            if leaf is None:
                return FlushFlags.NONE
            # a 4 KiB leaf is cleared in place; a superpage around it is split by the range path
            change = table.set_leaf(dfn.value, 0) if leaf.level == 1 else table.clear_leaf(dfn.value)
        if not change.flush:
            return FlushFlags.NONE
        if not self.require_iommu().dont_flush_iotlb:
            self._flush(d, dfn, 1, True)
        return FlushFlags.MODIFIED

    def lookup_page(self, d: Domain, dfn: Dfn) -> tuple[Mfn, Perm]:
        expect_kind(Dfn, dfn, "dfn")
        if self.uses_shared_tables(d) or self.is_passthrough_hwdom(d):
            raise NotSupported(f"d{d.domid} has no VT-d tables of its own", domain=d)
        st = self.state(d)
        dfn = self._page_dfn(st, d, dfn)
        with d.iommu.mapping_lock:
            leaf = st.table.lookup(dfn.value)
            no_leaf_table = leaf is None and st.table.table_for(dfn.value, 1) is None
        if leaf is None and no_leaf_table and self.require_iommu().config.quirk("vtd-lookup-enomem"):
            raise OutOfMemory(f"dfn {dfn.xen()} has no leaf table", domain=d, frame=dfn)
        if leaf is None:
            raise NoSuchEntry(f"dfn {dfn.xen()} is not mapped", domain=d, frame=dfn)
        offset = dfn.value & ((1 << (leaf.page_shift - PAGE_SHIFT)) - 1)
        return Mfn((leaf.address >> PAGE_SHIFT) + offset), leaf.perms

    def map_range(self, d: Domain, dfn: Dfn, mfn: Mfn, count: int, perms: Perm) -> FlushFlags:
        """Bulk map with 2 MiB / 1 GiB leaves where the units and the alignment allow; no flush."""
        expect_kind(Dfn, dfn, "dfn")
        expect_kind(Mfn, mfn, "mfn")
        if count <= 0 or self.uses_shared_tables(d) or self.is_passthrough_hwdom(d):
            return FlushFlags.NONE
        st = self.state(d)
        self._check_width(st, d, dfn, count)
        self._check_mfn(d, mfn, count)
        bits = {lv: self.fmt.leaf_bits(perms, lv, self.snoop if perms else None) for lv in self.fmt.leaf_levels}
        if not perms:
            bits = {1: 0}
        with d.iommu.mapping_lock:
            change = st.table.map_range(dfn.value, mfn.value << PAGE_SHIFT, count, bits)
        self._defer_tables(d, change.freed_tables)
        return FlushFlags(change.flush)

    def unmap_range(self, d: Domain, dfn: Dfn, count: int) -> FlushFlags:
        expect_kind(Dfn, dfn, "dfn")
        if count <= 0 or self.uses_shared_tables(d) or self.is_passthrough_hwdom(d):
            return FlushFlags.NONE
        st = self.state(d)
        self._check_width(st, d, dfn, count)
        with d.iommu.mapping_lock:
            change = st.table.unmap_range(dfn.value, count)
        self._defer_tables(d, change.freed_tables)
        return FlushFlags(change.flush & (FlushFlags.MODIFIED | FlushFlags.ALL))

    def _defer_tables(self, d: Domain, frames: list[int]) -> None:
        iommu = self.require_iommu()
        for f in frames:
            iommu.defer_free(Mfn(f), 1, d)

    # -- flushing -------------------------------------------------------------------------------------

    def _flush(self, d: Domain, dfn: Dfn | None, count: int, old_present: bool) -> None:
        """Xen's iommu_flush_iotlb: PSI for one page, DSI otherwise, on every unit the domain uses."""
        iommu = self.require_iommu()
        st = self.state(d)
        keep_last = iommu.config.quirk("vtd-flush-rc-overwritten")
        first: IommuError | None = None
        last: IommuError | None = None
        for idx in sorted(st.iommu_bitmap):
            u = self.units[idx]
            did = u.did_for(d.domid, alloc=False)
            if did is None:
                continue
            dev_iotlb = bool(u.ats_devices)
            timeout = iommu.config.dev_iotlb_timeout_ms
            try:
                if count != 1 or dfn is None or dfn == INVALID_DFN:
                    rc = u.flush_iotlb(did, 0, 0, Granularity.DOMAIN, False, dev_iotlb, timeout)
                else:
                    rc = u.flush_iotlb(
                        did, dfn.value << PAGE_SHIFT, 0, Granularity.DEVICE_OR_PAGE, not old_present, dev_iotlb, timeout
                    )
                if rc > 0:
                    u.flush_write_buffer()
                last = None
            except IommuError as exc:
                first = first or exc
                last = exc
        err = last if keep_last else first
        if err is not None:
            raise err

    def iotlb_flush(self, d: Domain, dfn: Dfn, count: int, flags: FlushFlags) -> None:
        expect_kind(Dfn, dfn, "dfn")
        if self.uses_shared_tables(d):
            return
        count = 0 if flags & FlushFlags.ALL else count
        self._flush(d, dfn, count, bool(flags & (FlushFlags.MODIFIED | FlushFlags.ALL)))

    def iotlb_flush_all(self, d: Domain) -> None:
        if self.uses_shared_tables(d):
            return
        self._flush(d, None, 0, False)

    # -- devices ------------------------------------------------------------------------------------------

    def enable_ats(self, unit: IommuUnit, dev: PciDevice) -> None:
        dev.ats_enabled = True
        if dev not in unit.ats_devices:
            unit.ats_devices.append(dev)

    def add_device(self, devfn: int, dev: PciDevice) -> None:
        if dev.owner is None:
            raise InvalidArgument(f"{dev.sbdf} has no owner")
        context_map(self, dev.owner, devfn, dev)
        for rmrr in self.dmar.rmrrs_of(dev.sbdf):
            try:
                rmrr_identity_map(self, dev.owner, rmrr)
            except IommuError as exc:
                self._log(LogLevel.ERR, f"VT-d: RMRR of {dev.sbdf} not mapped ({exc.rc})")

    def enable_device(self, dev: PciDevice) -> None:
        unit = self.unit_of(dev)
        if dev.ats and unit.ecap.dt and self.ats and not dev.ats_enabled:
            self.enable_ats(unit, dev)

    def remove_device(self, devfn: int, dev: PciDevice) -> None:
        owner = dev.owner
        if owner is None:
            raise InvalidArgument(f"{dev.sbdf} has no owner")
        for rmrr in self.dmar.rmrrs_of(dev.sbdf):
            with contextlib.suppress(NoSuchEntry):
                rmrr_identity_unmap(self, owner, rmrr)
        context_unmap(self, owner, devfn, dev)

    def assign_device(self, d: Domain, devfn: int, dev: PciDevice, flag: int) -> None:
        if not self.units:
            raise NoDevice("no VT-d unit")
        rmrrs = self.dmar.rmrrs_of(dev.sbdf)
        for rmrr in rmrrs:
            if len(rmrr.devices) > 1:
                if not flag & RDM_RELAXED:
                    raise NotPermitted(f"{dev.sbdf} shares an RMRR with other devices and cannot be assigned")
                self._log(LogLevel.WARNING, f"{dev.sbdf} shares an RMRR with other devices (relaxed)")
        hwdom = self.machine.hardware_domain
        source = dev.owner if dev.owner is not None else hwdom
        assert source is not None
        self.reassign_device(source, d, devfn, dev)
        done = []
        try:
            for rmrr in rmrrs:
                rmrr_identity_map(self, d, rmrr, flag)
                done.append(rmrr)
        except IommuError as exc:
            for rmrr in reversed(done):
                with contextlib.suppress(IommuError):
                    rmrr_identity_unmap(self, d, rmrr)
            with contextlib.suppress(IommuError):
                self.reassign_device(d, source, devfn, dev)
            self._log(LogLevel.ERR, f"VT-d: identity map of {dev.sbdf}'s RMRR into d{d.domid} failed ({exc.rc})")
            raise

    def reassign_device(self, source: Domain, target: Domain | None, devfn: int, dev: PciDevice) -> None:
        if not source.is_hardware:
            for rmrr in self.dmar.rmrrs_of(dev.sbdf):
                with contextlib.suppress(NoSuchEntry):
                    rmrr_identity_unmap(self, source, rmrr)
        context_unmap(self, source, devfn, dev)
        if target is not None:
            try:
                context_map(self, target, devfn, dev)
            except IommuError:
                # put the device back where it was, so a failure leaves no device without a context
                with contextlib.suppress(IommuError):
                    context_map(self, source, devfn, dev)
                raise
        if devfn == dev.sbdf.devfn:
            move_device(dev, target)

    def get_device_group_id(self, seg: int, bus: int, devfn: int) -> int:
        dev = self.machine.pci.find(Sbdf(seg, bus, devfn >> 3, devfn & 7))
        if dev is None:
            return -1
        seen = 0
        while dev.upstream_bridge is not None and seen < 256:
            bridge = self.machine.pci.find(dev.upstream_bridge)
            if bridge is None:
                return -1
            dev = bridge
            seen += 1
        return dev.sbdf.bdf

    def get_reserved_device_memory(self, fn: ReservedMemoryCallback, ctxt: object) -> int:
        for rmrr in self.dmar.rmrrs:
            for sbdf in rmrr.devices:
                rc = fn(rmrr.base_pfn, rmrr.pages, (sbdf.seg << 16) | sbdf.bdf, ctxt)
                if rc < 0:
                    return rc
                if rc > 0:
                    break
        return 0

    # -- teardown -------------------------------------------------------------------------------------------

    def teardown(self, d: Domain) -> None:
        st = self.state(d)
        st.mapped_rmrrs.clear()
        if self.uses_shared_tables(d):
            return
        root = st.table.root
        if root is not None:
            self.require_iommu().defer_free(root, st.levels, d)
            st.table.set_root(None)

    def free_page_table(self, mfn: Mfn, level: int) -> None:
        """Free one table page, queueing the tables its entries point to (never the pages leaves map)."""
        iommu = self.require_iommu()
        words = self.machine.memory.frame_words(mfn)
        if level > 1:
            for i in range(512):
                raw = int(words[i])
                if raw and self.fmt.decode(raw, level).kind == EntryKind.TABLE:
                    iommu.defer_free(Mfn((raw & self.fmt.addr_mask) >> PAGE_SHIFT), level - 1)
        words[:] = 0
        self.machine.allocator.free(mfn)

    def dump_page_tables(self, d: Domain) -> list[Mapping]:
        st = self.state(d)
        root = st.table.root
        if root is None:
            return []
        return mappings(self.machine.memory, self.fmt, root.value, st.levels)

    # -- power management --------------------------------------------------------------------------------

    def suspend(self) -> None:
        for u in self.units:
            u.flush_all()
        cfg = self.require_iommu().config
        for u in self.units:
            u.save_fault_regs()
            if not cfg.force:
                u.disable_translation()
                u.disable_qi()

    def resume(self) -> None:
        for u in self.units:
            u.init_hw()
            u.restore_fault_regs()
        for u in self.units:
            u.enable_translation()

    def crash_shutdown(self) -> None:
        for u in self.units:
            with contextlib.suppress(IommuError):
                u.flush_all()
            u.disable_translation()
            u.disable_qi()

    # -- faults ---------------------------------------------------------------------------------------------

    def _fault_handler(self, unit: IommuUnit) -> None:
        """The unit's fault interrupt: read and clear every pending record, log it, count it per device."""
        iommu = self.require_iommu()
        fsts = unit.read32(Reg.FSTS)
        if fsts & FSTS.PPF:
            index = fsts >> FSTS.FRI_SHIFT & 0xFF
            for _ in range(unit.cap.nfr):
                rec = unit.read_fault(index)
                if not rec.fault:
                    break
                unit.clear_fault(index)
                sbdf = Sbdf.from_bdf(rec.sid, unit.desc.segment)
                self._log(
                    LogLevel.WARNING,
                    f"[VT-D] DMA {'Read' if rec.is_read else 'Write'} fault from device [{sbdf}] at address "
                    f"{rec.addr:x} (unit {unit.name}, registers at {unit.desc.base_addr:#x}): "
                    f"reason {rec.reason:02x}, {rec.reason_text}",
                )
                dev = self.machine.pci.find(sbdf)
                if dev is not None:
                    check_disable_device(iommu, dev)
                index = (index + 1) % unit.cap.nfr
        if fsts & FSTS.PFO:
            unit.write32(Reg.FSTS, FSTS.PFO)
