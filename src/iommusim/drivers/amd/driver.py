"""The AMD-Vi driver (software half) behind ``IommuOps``, with Xen's seed-era semantics.

Per domain: a v1 I/O page-table tree (``RadixTable`` over ``AmdV1Format``) under the domain's mapping
lock, a paging mode (translated domains start at two levels and grow a level at a time on top; PV
domains get the levels the host's memory needs), superpages made by merging full tables and unmade by
splitting, and unity maps for firmware's IVMD ranges.  Per device: its device-table entry, bound to the
owning domain's root and followed by INVALIDATE_DEVTAB_ENTRY.  Every flush goes to every IOMMU as
INVALIDATE_IOMMU_PAGES (and INVALIDATE_IOTLB_PAGES for devices with ATS), each followed by a completion
wait.  Failures raise Xen's errno, and the domain is crashed where Xen's AMD code crashes it, the
hardware domain included.

Correct by default; the seed's defects come back with the ``amd-*`` quirks (see ``iommusim.quirks``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from iommusim.console import LogLevel
from iommusim.drivers.amd.devtable import DeviceTable
from iommusim.drivers.amd.domain import HVM_INITIAL_LEVELS, AmdDomain, UnityRange, paging_mode_for
from iommusim.drivers.amd.events import EventLogHandler
from iommusim.drivers.amd.ivrs import Ivrs
from iommusim.drivers.amd.merge import mergeable, seed_counter_ready
from iommusim.drivers.amd.unit import CMD_ENTRIES_DEFAULT, EVENT_ENTRIES_DEFAULT, UnitHandle
from iommusim.errors import (
    AddressNotAvailable,
    BadAddress,
    HypervisorBug,
    InvalidArgument,
    IommuError,
    NoDevice,
    NoSuchEntry,
    OutOfMemory,
)
from iommusim.frames import INVALID_DFN, PAGE_SHIFT, Dfn, Mfn, expect_kind
from iommusim.hw.amd import regs
from iommusim.hw.amd.structs import ALL_PAGES_ADDRESS
from iommusim.iommu.devices import move_device
from iommusim.iommu.ops import ReservedMemoryCallback
from iommusim.machine.pci import PciDevice, PciDevType
from iommusim.pagetable.amd import ADDR_MASK, NEXT_LEVEL_MASK, NEXT_LEVEL_SHIFT, PR, AmdV1Format
from iommusim.pagetable.format import EntryKind, level_shift
from iommusim.pagetable.radix import RadixTable
from iommusim.pagetable.walk import Mapping, mappings
from iommusim.perms import FlushFlags, Perm

if TYPE_CHECKING:
    from iommusim.iommu.layer import Iommu
    from iommusim.machine.domain import Domain

__all__ = ["AmdIommuDriver"]

#: Quirks that bring back a seed-era per-page behaviour; with any of them the bulk ops are not offered,
#: so that the generic layer goes through map_page/unmap_page where the quirk lives.
_SEED_PATH_QUIRKS = (
    "amd-remap-perm-no-flush",
    "amd-pv-no-map-flush",
    "amd-merge-counter",
    "amd-unmap-grows-tree",
    "amd-no-iotlb-flush-op",
)
_BASE_PROVIDED = frozenset(
    {
        "add_device",
        "remove_device",
        "get_device_group_id",
        "lookup_page",
        "free_page_table",
        "suspend",
        "resume",
        "crash_shutdown",
        "iotlb_flush",
        "iotlb_flush_all",
        "dump_page_tables",
        "map_range",
        "unmap_range",
    }
)
_DEFAULT_ADDRESS_WIDTH = 48  # Xen's DEFAULT_DOMAIN_ADDRESS_WIDTH: HVM frames stay below 2**48
_FOUR_GIB_FRAMES = (4 << 30) >> PAGE_SHIFT
_MFN_FIELD = (1 << 40) - 1  # a leaf's address field holds frame numbers below 2**40


class AmdIommuDriver:
    """Xen's amd_iommu_ops."""

    name = "amd"
    page_sizes = 1 << 12

    def __init__(
        self,
        ivrs: Ivrs,
        *,
        ats: bool = True,
        superpage_shifts: tuple[int, ...] = (21, 30),
        cmd_entries: int = CMD_ENTRIES_DEFAULT,
        event_entries: int = EVENT_ENTRIES_DEFAULT,
    ) -> None:
        self.ivrs = ivrs
        #: Xen's global ``ats`` boot option: ATS devices get DTE.I and INVALIDATE_IOTLB_PAGES.
        self.ats_enabled = ats
        self.superpage_shifts = frozenset(superpage_shifts)
        self.cmd_entries = cmd_entries
        self.event_entries = event_entries
        self.provided: frozenset[str] = _BASE_PROVIDED
        self.fmt = AmdV1Format()
        self._iommu: Iommu | None = None
        self.units: list[UnitHandle] = []
        self.handlers: list[EventLogHandler] = []
        self.devtab: DeviceTable | None = None
        self._quirks: frozenset[str] = frozenset()

    # ================================================================================================
    # plumbing
    # ================================================================================================

    @property
    def iommu(self) -> Iommu:
        if self._iommu is None:
            raise NoDevice("the AMD IOMMU driver was not set up")
        return self._iommu

    def _quirk(self, name: str) -> bool:
        return name in self._quirks

    def requestor_id(self, bdf: int) -> int:
        """Xen's get_dma_requestor_id: the IVRS alias of a device id, if it has one."""
        return self.ivrs.requestor_id(bdf)

    def _bdf(self, dev: PciDevice, devfn: int) -> int:
        return (dev.sbdf.bus << 8) | devfn

    def unit_for(self, dev: PciDevice) -> UnitHandle | None:
        """Xen's find_iommu_for_device."""
        ivhd = self.ivrs.ivhd_for(dev.sbdf.bdf)
        return None if ivhd is None else self.units[ivhd.index]

    def arch(self, d: Domain) -> AmdDomain:
        st = d.iommu.arch if d.iommu is not None else None
        if not isinstance(st, AmdDomain):
            raise InvalidArgument(f"{d} has no AMD IOMMU state", domain=d)
        return st

    def _devtab(self) -> DeviceTable:
        if self.devtab is None:
            raise NoDevice("the AMD IOMMU has no device table")
        return self.devtab

    def _devfns(self, dev: PciDevice) -> list[int]:
        return [dev.sbdf.devfn, *dev.phantom_devfns]

    def _implicit_flush_allowed(self) -> bool:
        """Xen flushes inside map/unmap unless the caller batches; the seed (no flush ops) always did."""
        return not self.iommu.dont_flush_iotlb or self._quirk("amd-no-iotlb-flush-op")

    # ================================================================================================
    # hardware set-up
    # ================================================================================================

    def hardware_setup(self, iommu: Iommu) -> None:
        """Find the IOMMUs firmware described, give them their tables and rings, and turn them on."""
        self._iommu = iommu
        cfg = iommu.config
        self._quirks = frozenset(q for q in cfg.quirks if q.startswith("amd-"))
        self.fmt = AmdV1Format(split_children_rw=cfg.quirk("amd-split-rw-children"))
        provided = set(_BASE_PROVIDED)
        if cfg.quirk("amd-no-iotlb-flush-op"):
            provided -= {"iotlb_flush", "iotlb_flush_all"}
        if cfg.quirk("amd-no-lookup-op"):
            provided.discard("lookup_page")
        if any(cfg.quirk(q) for q in _SEED_PATH_QUIRKS):
            provided -= {"map_range", "unmap_range"}
        self.provided = frozenset(provided)
        if not self.ivrs.ivhds:
            raise NoDevice("AMD-Vi: IOMMU not found")
        machine = iommu.machine
        devtab = DeviceTable(machine.memory, machine.allocator, self.ivrs.bdf_entries)
        units = [UnitHandle(h, iommu, self.cmd_entries, self.event_entries) for h in self.ivrs.ivhds]
        try:
            devtab.allocate()
            for u in units:
                u.allocate()
        except OutOfMemory as exc:
            for u in units:
                u.release()
            devtab.release()
            iommu.console.printk(LogLevel.ERR, "AMD-Vi: error initialising the IOMMU")
            raise NoDevice(f"AMD-Vi: initialisation failed: {exc.message}") from None
        self.devtab, self.units = devtab, units
        self.handlers = []
        for u in units:
            handler = EventLogHandler(self, u)
            self.handlers.append(handler)
            u.ivhd.connect_irq(handler)
            u.enable(devtab.maddr, devtab.pages)
            efr = u.mmio.read(regs.EXT_FEATURE, 8)
            iommu.console.printk(
                LogLevel.INFO,
                f"AMD-Vi: {u.name} enabled: {u.cmd_entries}-entry command buffer, {u.event_entries}-entry event "
                f"log, extended features {efr:#x}",
            )

    def uses_shared_tables(self, d: Domain) -> bool:
        return False  # the model keeps x86 p2m tables out of memory: the IOMMU has its own

    # ================================================================================================
    # domains
    # ================================================================================================

    def init(self, d: Domain) -> None:
        """Translated domains start with two levels; PV ones with what the host's memory needs."""
        machine = self.iommu.machine
        if d.is_hvm:
            levels = HVM_INITIAL_LEVELS
        else:
            # Xen sizes for max_page; the model never goes below the 4 GiB the hardware domain's identity
            # map spans, so that no frame it maps falls beyond the tree's reach.
            levels = paging_mode_for(max(machine.pages.frames, _FOUR_GIB_FRAMES))
        table = RadixTable(machine.memory, machine.allocator, self.fmt, owner=f"d{d.domid}:amd-pt", levels=levels)
        d.iommu.arch = AmdDomain(table)

    def hwdom_init(self, d: Domain) -> None:
        """Root first (BUG on failure), then the x86 identity map, then the hardware domain's devices."""
        st = self.arch(d)
        with d.iommu.mapping_lock:
            try:
                st.table.ensure_root()
            except OutOfMemory:
                raise HypervisorBug("AMD-Vi: no memory for the hardware domain's root table") from None
        for u in self.units:
            # Xen denies the hardware domain access to the IOMMU's MMIO window here.
            if self.iommu.config.verbose:
                self.iommu.console.printk(
                    LogLevel.INFO, f"AMD-Vi: {u.name} MMIO at {u.ivhd.mmio_base:#x} kept from d{d.domid}"
                )
        self.iommu.arch_hwdom_init(d)
        for dev in list(self.iommu.machine.pci):
            if dev.owner is None:
                move_device(dev, d)
            elif dev.owner is not d:
                continue
            for devfn in self._devfns(dev):
                try:
                    self.add_device(devfn, dev)
                except IommuError as exc:
                    self.iommu.console.printk(
                        LogLevel.ERR, f"setup {dev.sbdf.with_devfn(devfn)} for d{d.domid} failed ({exc.rc})"
                    )
                    if devfn == dev.sbdf.devfn:
                        break

    def teardown(self, d: Domain) -> None:
        """Queue the whole tree for the deferred free (root at the paging mode's level), then flush all."""
        st = d.iommu.arch if d.iommu is not None else None
        if not isinstance(st, AmdDomain):
            return
        with d.iommu.mapping_lock:
            root = st.table.root
            if root is not None:
                self.iommu.defer_free(root, st.table.levels)
                st.table.set_root(None)
            st.unity.clear()
        self.flush_all_pages(d)

    def free_page_table(self, mfn: Mfn, level: int) -> None:
        """Free one table page; queue each table it points to with that table's level."""
        mem = self.iommu.machine.memory
        if level > 1:
            words = mem.peek_words(mfn.value)
            nl = (words & np.uint64(NEXT_LEVEL_MASK)) >> np.uint64(NEXT_LEVEL_SHIFT)
            addr = words & np.uint64(ADDR_MASK)
            tables = ((words & np.uint64(PR)) != 0) & (addr != 0) & (nl != 0) & (nl != 7)
            for i in np.nonzero(tables)[0]:
                next_level = int(nl[i])
                if next_level != level - 1:
                    raise HypervisorBug(f"AMD-Vi: table {mfn!r} level {level} skips to level {next_level}")
                self.iommu.defer_free(Mfn(int(addr[i]) >> PAGE_SHIFT), next_level)
        self.iommu.machine.allocator.free(mfn)

    # ================================================================================================
    # growing the tree (HVM) and the reach of a table
    # ================================================================================================

    def _rewrite_dtes(self, d: Domain, st: AmdDomain) -> None:
        root = st.table.root
        assert root is not None
        devtab = self._devtab()
        for dev in list(d.pci_devices):
            unit = self.unit_for(dev)
            if unit is None:
                raise NoDevice(f"AMD-Vi: no IOMMU for {dev.sbdf}", domain=d)
            for devfn in self._devfns(dev):
                req = self.requestor_id(self._bdf(dev, devfn))
                devtab.set_root_page_table(req, root.value << PAGE_SHIFT, d.domid, st.table.levels, True)
                unit.flush_device(req)

    def _update_paging_mode(self, d: Domain, st: AmdDomain, dfn: int) -> Callable[[], None] | None:
        """Add levels on top until ``dfn`` is in reach; returns how to undo it (None if nothing changed).

        Each new root's entry 0 points at the previous root.  The devices' DTEs then get the new root and
        mode, each followed by INVALIDATE_DEVTAB_ENTRY, and the domain's pages are all flushed.
        """
        if dfn == INVALID_DFN.value:
            raise AddressNotAvailable("invalid DFN", domain=d)
        if dfn >> _DEFAULT_ADDRESS_WIDTH:
            raise HypervisorBug(f"AMD-Vi: dfn {dfn:#x} beyond the {_DEFAULT_ADDRESS_WIDTH}-bit domain address width")
        table = st.table
        level = table.levels
        offset = dfn >> (9 * (level - 1))
        if offset < 512:
            return None
        old_root, old_levels = table.root, table.levels
        assert old_root is not None
        machine = self.iommu.machine
        new_roots: list[Mfn] = []
        below = old_root
        try:
            while offset >= 512:
                new = machine.allocator.alloc(table.owner)
                new_roots.append(new)
                machine.memory.store_word(new.value, 0, self.fmt.table_entry(below.value << PAGE_SHIFT, level + 1))
                below = new
                level += 1
                offset >>= 9
        except OutOfMemory:
            for f in reversed(new_roots):
                machine.allocator.free(f)
            raise
        table.set_root(new_roots[-1], level)
        self._rewrite_dtes(d, st)
        self.flush_all_pages(d)

        def undo() -> None:
            table.set_root(old_root, old_levels)
            self._rewrite_dtes(d, st)
            self.flush_all_pages(d)
            for f in reversed(new_roots):
                machine.allocator.free(f)

        return undo

    # ================================================================================================
    # map / unmap / lookup
    # ================================================================================================

    def _fail(self, d: Domain, exc: IommuError, what: str) -> IommuError:
        """Where Xen's AMD code gives up: debug line, domain_crash (even the hardware domain), errno."""
        if self.iommu.config.debug:
            self.iommu.console.printk(LogLevel.DEBUG, f"AMD-Vi: {what}")
        d.crash(f"AMD-Vi: {what}")
        return exc

    def _prepare(self, d: Domain, st: AmdDomain, last_dfn: int, op: str) -> tuple[bool, Callable[[], None] | None]:
        """Root, then reach (growth for HVM): (root made by this call, undo of growth).  Lock held."""
        table = st.table
        made_root = table.root is None
        try:
            table.ensure_root()
        except OutOfMemory as exc:
            err = exc.with_context(op=op, domain=d)
            raise self._fail(d, err, f"root table alloc failed, dfn {last_dfn:#x}") from None
        if d.is_hvm:
            try:
                undo = self._update_paging_mode(d, st, last_dfn)
            except IommuError as exc:
                self._drop_root(st, made_root)
                err = BadAddress(f"update of the paging mode failed: {exc.message}", op=op, domain=d)
                raise self._fail(d, err, f"update page mode failed, dfn {last_dfn:#x}") from None
            return made_root, undo
        if last_dfn >= table.dfn_limit:
            self._drop_root(st, made_root)
            err = BadAddress(f"dfn {last_dfn:#x} beyond the {table.levels}-level table", op=op, domain=d)
            raise self._fail(d, err, f"invalid IO pagetable entry dfn {last_dfn:#x}")
        return made_root, None

    @staticmethod
    def _drop_root(st: AmdDomain, made_root: bool) -> None:
        if made_root and st.table.root is not None:
            st.table.free_all()

    def _allowed_merge_level(self, level: int, st: AmdDomain) -> bool:
        return (
            level <= st.table.levels
            and level in self.fmt.leaf_levels
            and level_shift(level) in self.superpage_shifts
            and self.iommu.config.superpages
        )

    def _merge_up(self, st: AmdDomain, dfn: int) -> list[Mfn]:
        """Replace every full, contiguous, uniform table above ``dfn`` by a leaf; the unhooked tables.

        Climbs from level 2: a table that can merge becomes a leaf, a leaf already there lets the climb go
        on to the level above, anything else ends it.
        """
        mem = self.iommu.machine.memory
        table = st.table
        freed: list[Mfn] = []
        if not self._allowed_merge_level(2, st):
            return freed
        l1 = table.table_for(dfn, 1)
        if l1 is not None and not (mem.load_word(l1.value, 511) & mem.load_word(l1.value, 0) & PR):
            return freed  # the usual case: a level-1 table that is not full yet
        level = 2
        while self._allowed_merge_level(level, st):
            holder = table.table_for(dfn, level)
            if holder is None:
                break
            index = (dfn >> (9 * (level - 1))) & 511
            entry = self.fmt.decode(mem.load_word(holder.value, index), level)
            if entry.kind == EntryKind.TABLE and entry.next_level == level - 1:
                found = mergeable(mem, entry.address >> PAGE_SHIFT, level - 1)
                if found is None:
                    break
                base, attrs = found
                mem.store_word(holder.value, index, base | attrs)
                freed.append(Mfn(entry.address >> PAGE_SHIFT))
            elif entry.kind != EntryKind.LEAF:
                break
            level += 1
        return freed

    def _seed_merge(self, d: Domain, st: AmdDomain, dfn: int, mfn: int, perms: Perm) -> None:
        """The seed's counter-driven merge (quirk ``amd-merge-counter``), flushing and freeing at once."""
        mem = self.iommu.machine.memory
        table = st.table
        for level in range(2, table.levels + 1):
            at = table.table_for(dfn, level)
            if at is None or not seed_counter_ready(mem, at.value, level, dfn, mfn):
                break
            index = (dfn >> (9 * (level - 1))) & 511
            pde = mem.load_word(at.value, index)
            child = (pde & ADDR_MASK) >> PAGE_SHIFT
            first = mem.load_word(child, 0) & ADDR_MASK
            if child == 0 or first == 0:
                err = BadAddress(f"merge at level {level} found no table", op="map_page", domain=d)
                raise self._fail(d, err, f"merge iommu page failed at level {level}, dfn {dfn:#x}")
            mem.store_word(at.value, index, first | self.fmt.leaf_bits(perms, level))
            self.flush_all_pages(d)
            self.iommu.machine.allocator.free(Mfn(child))

    def _after_structure_change(self, d: Domain, st: AmdDomain, merged: list[Mfn], split: bool) -> FlushFlags:
        """A merge or split needs every page flushed before unhooked tables may go: now, or by the caller."""
        if not merged and not split:
            return FlushFlags.NONE
        st.pending_free.extend(merged)
        if self._implicit_flush_allowed():
            self.flush_all_pages(d)
            return FlushFlags.NONE
        return FlushFlags.MODIFIED | FlushFlags.ALL

    def map_page(self, d: Domain, dfn: Dfn, mfn: Mfn, perms: Perm) -> FlushFlags:
        """Xen's amd_iommu_map_page (4 KiB)."""
        expect_kind(Dfn, dfn, "dfn")
        expect_kind(Mfn, mfn, "mfn")
        if mfn.value > _MFN_FIELD:
            raise InvalidArgument(f"{mfn!r} does not fit a v1 entry's address field", domain=d)
        st = self.arch(d)
        raw = (mfn.value << PAGE_SHIFT) | self.fmt.leaf_bits(perms, 1)
        counter = self._quirk("amd-merge-counter")
        with d.iommu.mapping_lock:
            made_root, undo = self._prepare(d, st, dfn.value, "map_page")
            try:
                change = st.table.set_leaf(dfn.value, raw, 1)
            except OutOfMemory:
                if undo is not None:
                    undo()
                self._drop_root(st, made_root)
                err = BadAddress("no memory for an I/O page table", op="map_page", domain=d, frame=dfn)
                raise self._fail(d, err, f"invalid IO pagetable entry dfn {dfn.value:#x}") from None
            old = change.old
            flags = change.flush & 3
            address_changed = (old & ADDR_MASK) != (raw & ADDR_MASK)
            if self._quirk("amd-remap-perm-no-flush"):
                need_flush = address_changed
                flags &= ~2
                if address_changed and old & PR:
                    flags |= 2
            else:
                need_flush = bool(flags & 2)
            merged: list[Mfn] = []
            if counter:
                if address_changed:
                    self._seed_merge(d, st, dfn.value, mfn.value, perms)
            elif change.flush:
                merged = self._merge_up(st, dfn.value)
        if need_flush and self._implicit_flush_allowed() and not (d.is_pv and self._quirk("amd-pv-no-map-flush")):
            self.flush_pages(d, dfn.value, 0)
        if merged or change.split:
            return FlushFlags(flags) | self._after_structure_change(d, st, merged, bool(change.split))
        return FlushFlags(flags)

    def unmap_page(self, d: Domain, dfn: Dfn) -> FlushFlags:
        """Xen's amd_iommu_unmap_page: clear the 4 KiB entry and flush it."""
        expect_kind(Dfn, dfn, "dfn")
        st = self.arch(d)
        if self._quirk("amd-unmap-grows-tree"):
            return self._seed_unmap(d, st, dfn)
        with d.iommu.mapping_lock:
            table = st.table
            if table.root is None or dfn.value >= table.dfn_limit:
                return FlushFlags.NONE
            try:
                change = table.clear_leaf(dfn.value)
            except OutOfMemory:
                err = BadAddress("no memory to split a superpage", op="unmap_page", domain=d, frame=dfn)
                raise self._fail(d, err, f"invalid IO pagetable entry dfn {dfn.value:#x}") from None
        flags = FlushFlags(change.flush & 2)
        if flags and self._implicit_flush_allowed():
            self.flush_pages(d, dfn.value, 0)
        return flags | self._after_structure_change(d, st, [], bool(change.split))

    def _seed_unmap(self, d: Domain, st: AmdDomain, dfn: Dfn) -> FlushFlags:
        """The seed's unmap (quirk ``amd-unmap-grows-tree``): grow, walk allocating, clear, always flush."""
        mem = self.iommu.machine.memory
        with d.iommu.mapping_lock:
            table = st.table
            if table.root is None:
                return FlushFlags.NONE
            if d.is_hvm:
                try:
                    self._update_paging_mode(d, st, dfn.value)
                except IommuError as exc:
                    if isinstance(exc, AddressNotAvailable):
                        raise exc.with_context(op="unmap_page", domain=d) from None
                    err = exc.with_context(op="unmap_page", domain=d)
                    raise self._fail(d, err, f"update page mode failed, dfn {dfn.value:#x}") from None
            elif dfn.value >= table.dfn_limit:
                err = BadAddress(f"dfn beyond the {table.levels}-level table", op="unmap_page", domain=d, frame=dfn)
                raise self._fail(d, err, f"invalid IO pagetable entry dfn {dfn.value:#x}")
            try:
                t, i = table.entry_slot(dfn.value, 1)
            except OutOfMemory:
                err = BadAddress("no memory for an I/O page table", op="unmap_page", domain=d, frame=dfn)
                raise self._fail(d, err, f"invalid IO pagetable entry dfn {dfn.value:#x}") from None
            old = mem.load_word(t, i)
            mem.store_word(t, i, 0)
        if self._implicit_flush_allowed():
            self.flush_pages(d, dfn.value, 0)
        return FlushFlags.MODIFIED if old & PR else FlushFlags.NONE

    def lookup_page(self, d: Domain, dfn: Dfn) -> tuple[Mfn, Perm]:
        expect_kind(Dfn, dfn, "dfn")
        st = self.arch(d)
        with d.iommu.mapping_lock:
            leaf = st.table.lookup(dfn.value)
        if leaf is None:
            raise NoSuchEntry("not mapped", op="lookup_page", domain=d, frame=dfn)
        offset = dfn.value & ((1 << (leaf.page_shift - PAGE_SHIFT)) - 1)
        return Mfn((leaf.address >> PAGE_SHIFT) + offset), leaf.perms

    def map_range(self, d: Domain, dfn: Dfn, mfn: Mfn, count: int, perms: Perm) -> FlushFlags:
        """Bulk map, leaving the tables exactly as mapping page by page (with its merges) would.

        Whole aligned blocks are written directly as the superpages merging would have made of them; only
        the blocks at either end, which may combine with what was mapped before, go through the merge.
        """
        expect_kind(Dfn, dfn, "dfn")
        expect_kind(Mfn, mfn, "mfn")
        if count <= 0:
            return FlushFlags.NONE
        if mfn.value + count - 1 > _MFN_FIELD:
            raise InvalidArgument(f"{mfn!r}+{count} does not fit a v1 entry's address field", domain=d)
        st = self.arch(d)
        last = dfn.value + count - 1
        with d.iommu.mapping_lock:
            made_root, undo = self._prepare(d, st, last, "map_range")
            bits = {1: self.fmt.leaf_bits(perms, 1)}
            if not self._quirk("amd-merge-counter"):
                bits.update(
                    {lv: self.fmt.leaf_bits(perms, lv) for lv in range(2, 7) if self._allowed_merge_level(lv, st)}
                )
            try:
                change = st.table.map_range(dfn.value, mfn.value << PAGE_SHIFT, count, bits)
            except OutOfMemory:
                if undo is not None:
                    undo()
                self._drop_root(st, made_root)
                err = BadAddress("no memory for I/O page tables", op="map_range", domain=d, frame=dfn)
                raise self._fail(d, err, f"invalid IO pagetable entry dfn {dfn.value:#x}") from None
            unhooked = [Mfn(f) for f in change.freed_tables]
            if change.flush:
                unhooked += self._merge_up(st, dfn.value)
                if last >> 9 != dfn.value >> 9:
                    unhooked += self._merge_up(st, last)
        flags = FlushFlags(change.flush & 3)
        if unhooked or change.split:
            st.pending_free.extend(unhooked)
            flags |= FlushFlags.MODIFIED | FlushFlags.ALL
        return flags

    def unmap_range(self, d: Domain, dfn: Dfn, count: int) -> FlushFlags:
        expect_kind(Dfn, dfn, "dfn")
        st = self.arch(d)
        with d.iommu.mapping_lock:
            table = st.table
            if count <= 0 or table.root is None or dfn.value >= table.dfn_limit:
                return FlushFlags.NONE
            count = min(count, table.dfn_limit - dfn.value)
            try:
                change = table.unmap_range(dfn.value, count)
            except OutOfMemory:
                err = BadAddress("no memory to split a superpage", op="unmap_range", domain=d, frame=dfn)
                raise self._fail(d, err, f"invalid IO pagetable entry dfn {dfn.value:#x}") from None
        flags = FlushFlags(change.flush & 2)
        if change.split:
            flags |= FlushFlags.MODIFIED | FlushFlags.ALL
        return flags

    # ================================================================================================
    # flushing
    # ================================================================================================

    def _flush(self, d: Domain, daddr: int, order: int) -> None:
        for u in self.units:
            u.invalidate_pages(d.domid, daddr, order)
        if self.ats_enabled:
            for dev in list(d.pci_devices):
                for devfn in self._devfns(dev):
                    self.flush_device_iotlb(devfn, dev, daddr, order)

    def flush_pages(self, d: Domain, dfn: int, order: int) -> None:
        """Xen's amd_iommu_flush_pages: every IOMMU, then the IOTLBs of the domain's ATS devices."""
        self._flush(d, dfn << PAGE_SHIFT, order)

    def flush_all_pages(self, d: Domain) -> None:
        self._flush(d, ALL_PAGES_ADDRESS, 0)
        st = d.iommu.arch if d.iommu is not None else None
        if isinstance(st, AmdDomain):
            alloc = self.iommu.machine.allocator
            while st.pending_free:
                alloc.free(st.pending_free.pop())

    def flush_device_iotlb(self, devfn: int, dev: PciDevice, daddr: int, order: int) -> None:
        """Xen's amd_iommu_flush_iotlb: only for a device whose ATS is on, behind an IOTLB-capable IOMMU."""
        if not self.ats_enabled or not dev.ats_enabled:
            return
        unit = self.unit_for(dev)
        if unit is None or not unit.has_cap(regs.CAP_IOTLB_SUP):
            return
        req = self.requestor_id(self._bdf(dev, devfn))
        unit.invalidate_iotlb(req, dev.ats_queue_depth, daddr, order)

    def iotlb_flush(self, d: Domain, dfn: Dfn, count: int, flags: FlushFlags) -> None:
        """The smallest single flush that covers [dfn, dfn + count) (cbe21fd047), if anything changed."""
        expect_kind(Dfn, dfn, "dfn")
        if not flags & FlushFlags.MODIFIED or count <= 0:
            return
        first, last = dfn.value, dfn.value + count - 1
        if flags & FlushFlags.ALL or last >= 1 << 64:
            self.flush_all_pages(d)
        elif count == 1:
            self.flush_pages(d, first, 0)
        elif first >> 9 == last >> 9:
            self.flush_pages(d, first, 9)
        elif first >> 18 == last >> 18:
            self.flush_pages(d, first, 18)
        else:
            self.flush_all_pages(d)

    def iotlb_flush_all(self, d: Domain) -> None:
        self.flush_all_pages(d)

    # ================================================================================================
    # devices
    # ================================================================================================

    def _setup_device(self, d: Domain, unit: UnitHandle, devfn: int, dev: PciDevice) -> None:
        """Bind a device's DTE to ``d`` unless it already translates; then ATS, as Xen does."""
        st = self.arch(d)
        root = st.table.root
        if root is None or not st.table.levels:
            raise HypervisorBug(f"AMD-Vi: {d} has no root table for {dev.sbdf}")
        devtab = self._devtab()
        valid = not (self.iommu.config.hwdom_passthrough and d.is_hardware)
        req = self.requestor_id(self._bdf(dev, devfn))
        if not devtab.translation_valid(req):
            devtab.set_root_page_table(req, root.value << PAGE_SHIFT, d.domid, st.table.levels, valid)
            if dev.ats and self.ats_enabled and unit.has_cap(regs.CAP_IOTLB_SUP):
                devtab.set_iotlb(req, True)
            unit.flush_device(req)
            if self.iommu.config.debug:
                self.iommu.console.printk(
                    LogLevel.DEBUG,
                    f"AMD-Vi: setup I/O page table: device id {req:#x}, root {root.value << PAGE_SHIFT:#x}, "
                    f"domain {d.domid}, paging mode {st.table.levels}",
                )
        if dev.ats and self.ats_enabled and not dev.ats_enabled:
            if devfn == dev.sbdf.devfn:
                dev.ats_enabled = True
            self.flush_device_iotlb(devfn, dev, ALL_PAGES_ADDRESS, 0)

    def _disable_device(self, d: Domain | None, unit: UnitHandle, devfn: int, dev: PciDevice) -> None:
        devtab = self._devtab()
        req = self.requestor_id(self._bdf(dev, devfn))
        if devtab.translation_valid(req):
            devtab.disable_translation(req)
            if dev.ats and self.ats_enabled and unit.has_cap(regs.CAP_IOTLB_SUP):
                devtab.set_iotlb(req, False)
            unit.flush_device(req)
        if devfn == dev.sbdf.devfn and dev.ats and self.ats_enabled and dev.ats_enabled:
            dev.ats_enabled = False

    def add_device(self, devfn: int, dev: PciDevice) -> None:
        if dev.owner is None:
            raise InvalidArgument(f"{dev.sbdf} has no owner", op="add_device")
        unit = self.unit_for(dev)
        if unit is None:
            if dev.type == PciDevType.HOST_BRIDGE and dev.owner.is_hardware:
                return
            raise NoDevice(f"AMD-Vi: no IOMMU for {dev.sbdf}; it cannot be handed to {dev.owner}", op="add_device")
        self._setup_device(dev.owner, unit, devfn, dev)

    def enable_device(self, dev: PciDevice) -> None:  # not provided: Xen's AMD driver has none
        raise NoDevice("AMD-Vi has no enable_device")

    def remove_device(self, devfn: int, dev: PciDevice) -> None:
        if dev.owner is None:
            raise InvalidArgument(f"{dev.sbdf} has no owner", op="remove_device")
        unit = self.unit_for(dev)
        if unit is None:
            raise NoDevice(f"AMD-Vi: no IOMMU for {dev.sbdf}", op="remove_device")
        self._disable_device(dev.owner, unit, devfn, dev)

    def reassign_device(self, source: Domain, target: Domain | None, devfn: int, dev: PciDevice) -> None:
        """Move a device: the target's root is made first, so a failure changes nothing."""
        unit = self.unit_for(dev)
        if unit is None:
            raise NoDevice(f"AMD-Vi: no IOMMU for {dev.sbdf}", op="reassign_device", domain=target)
        if target is not None:
            tst = self.arch(target)
            with target.iommu.mapping_lock:
                tst.table.ensure_root()
        self._disable_device(source, unit, devfn, dev)
        if devfn == dev.sbdf.devfn:
            move_device(dev, target)
        if target is not None:
            self._setup_device(target, unit, devfn, dev)
        if not self._quirk("amd-unity-map-seed"):
            self._release_unity(source, self.requestor_id(self._bdf(dev, devfn)))
        if self.iommu.config.debug:
            self.iommu.console.printk(
                LogLevel.DEBUG, f"AMD-Vi: re-assign {dev.sbdf.with_devfn(devfn)} from {source} to {target}"
            )

    def assign_device(self, d: Domain, devfn: int, dev: PciDevice, flag: int) -> None:
        """Map the device's IVMD unity ranges into ``d``, then take the device from the hardware domain."""
        hwdom = self.iommu.machine.hardware_domain
        if hwdom is None:
            raise NoDevice("there is no hardware domain to take the device from", op="assign_device", domain=d)
        req = self.requestor_id(self._bdf(dev, devfn))
        made = self._reserve_unity(d, req)
        try:
            self.reassign_device(hwdom, d, devfn, dev)
        except IommuError:
            self._undo_unity(d, req, made)
            raise

    # -- unity maps -----------------------------------------------------------------------------------

    def _reserve_unity(self, d: Domain, req: int) -> list[UnityRange]:
        """Map each IVMD range of ``req`` 1:1 (Xen's amd_iommu_reserve_domain_unity_map).

        By default a failure undoes the ranges this call mapped and is raised; with quirk
        ``amd-unity-map-seed`` it is ignored, as the seed did.
        """
        st = self.arch(d)
        made: list[UnityRange] = []
        for ivmd in self.ivrs.unity_ranges(req):
            rng = UnityRange(ivmd.first_pfn, ivmd.pages, ivmd.perms)
            users = st.unity.get(rng)
            if users is not None:
                users.add(req)
                continue
            try:
                for i in range(rng.pages):
                    self.map_page(d, Dfn(rng.first_pfn + i), Mfn(rng.first_pfn + i), rng.perms)
            except IommuError:
                if self._quirk("amd-unity-map-seed"):
                    st.unity[rng] = {req}
                    continue
                self._unmap_unity(d, rng)
                self._undo_unity(d, req, made)
                raise
            st.unity[rng] = {req}
            made.append(rng)
        return made

    def _unmap_unity(self, d: Domain, rng: UnityRange) -> None:
        for i in range(rng.pages):
            with contextlib.suppress(IommuError):
                self.unmap_page(d, Dfn(rng.first_pfn + i))

    def _undo_unity(self, d: Domain, req: int, made: list[UnityRange]) -> None:
        st = self.arch(d)
        for rng in made:
            self._unmap_unity(d, rng)
            st.unity.pop(rng, None)
        for users in st.unity.values():
            users.discard(req)

    def _release_unity(self, d: Domain, req: int) -> None:
        """The device left ``d``: ranges no other device of ``d`` needs are unmapped."""
        st = d.iommu.arch if d.iommu is not None else None
        if not isinstance(st, AmdDomain) or d.is_hardware:
            return
        for rng, users in list(st.unity.items()):
            users.discard(req)
            if not users:
                del st.unity[rng]
                self._unmap_unity(d, rng)

    # ================================================================================================
    # the rest of the ops
    # ================================================================================================

    def get_device_group_id(self, seg: int, bus: int, devfn: int) -> int:
        bdf = (bus << 8) | devfn
        return self.requestor_id(bdf) if bdf < self.ivrs.bdf_entries else bdf

    def suspend(self) -> None:
        self.crash_shutdown()

    def resume(self) -> None:
        devtab = self._devtab()
        for u in self.units:
            u.disable()
            u.enable(devtab.maddr, devtab.pages)
        if self.units and not self.units[0].has_feature(regs.EFR_IA_SUP):
            for u in self.units:
                for req in range(min(self.ivrs.bdf_entries, devtab.entries)):
                    u.flush_device(req)
            for d in self.iommu.machine.domains.values():
                if isinstance(d.iommu.arch if d.iommu is not None else None, AmdDomain):
                    self.flush_all_pages(d)

    def crash_shutdown(self) -> None:
        for u in self.units:
            u.disable()

    def share_p2m(self, d: Domain) -> None:  # not provided: the model keeps no x86 p2m tables in memory
        raise NoDevice("AMD-Vi: sharing the p2m is not modelled")

    def get_reserved_device_memory(self, fn: ReservedMemoryCallback, ctxt: object) -> int:
        return 0  # not provided (NULL in Xen's AMD ops)

    def dump_page_tables(self, d: Domain) -> list[Mapping]:
        st = self.arch(d)
        root = st.table.root
        if root is None:
            return []
        return mappings(self.iommu.machine.memory, self.fmt, root.value, st.table.levels)
