"""Map, unmap and lookup on a domain's v1 I/O page tables (Xen's iommu_map.c), under its mapping lock.

Translated (HVM) domains start with two levels and grow one level at a time on top when a frame is beyond
reach; the walk allocates and splits through the radix engine (all or nothing); a table that becomes full,
contiguous, aligned and uniform is merged into a leaf one level up (or, with quirk ``amd-merge-counter``,
whatever the seed's counter says), and a superpage that changes in part is split again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from iommusim.drivers.amd.domain import AmdDomain
from iommusim.drivers.amd.merge import mergeable, seed_counter_ready
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
from iommusim.pagetable.amd import ADDR_MASK, NEXT_LEVEL_MASK, NEXT_LEVEL_SHIFT, PR
from iommusim.pagetable.format import EntryKind, level_shift
from iommusim.pagetable.walk import Mapping, mappings
from iommusim.perms import FlushFlags, Perm

if TYPE_CHECKING:
    from iommusim.machine.domain import Domain

from iommusim.drivers.amd.base import AmdDriverBase

__all__ = ["PageTableOps"]

_DEFAULT_ADDRESS_WIDTH = 48  # Xen's DEFAULT_DOMAIN_ADDRESS_WIDTH: HVM frames stay below 2**48
_MFN_FIELD = (1 << 40) - 1  # a leaf's address field holds frame numbers below 2**40
_FLAGS = tuple(FlushFlags(i) for i in range(8))  # by value: building IntFlags per page is slow


class PageTableOps(AmdDriverBase):
    """The domain's tables: growth, the walk, merge and split, and reading them back."""

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

    def _merge_up(self, st: AmdDomain, dfn: int, l1_frame: int | None = None) -> list[Mfn]:
        """Replace every full, contiguous, uniform table above ``dfn`` by a leaf; the unhooked tables.

        Climbs from level 2: a table that can merge becomes a leaf, a leaf already there lets the climb go
        on to the level above, anything else ends it.  ``l1_frame``, when the caller just wrote ``dfn``'s
        level-1 entry, is that table (saving a walk on every map).
        """
        mem = self.iommu.machine.memory
        table = st.table
        freed: list[Mfn] = []
        if not self._allowed_merge_level(2, st):
            return freed
        l1 = Mfn(l1_frame) if l1_frame is not None else table.table_for(dfn, 1)
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
                merged = self._merge_up(st, dfn.value, change.table)
        if need_flush and self._implicit_flush_allowed() and not (d.is_pv and self._quirk("amd-pv-no-map-flush")):
            self.flush_pages(d, dfn.value, 0)
        if merged or change.split:
            return FlushFlags(flags) | self._after_structure_change(d, st, merged, bool(change.split))
        return _FLAGS[flags]

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

    def dump_page_tables(self, d: Domain) -> list[Mapping]:
        st = self.arch(d)
        root = st.table.root
        if root is None:
            return []
        return mappings(self.iommu.machine.memory, self.fmt, root.value, st.table.levels)
