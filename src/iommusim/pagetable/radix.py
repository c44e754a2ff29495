"""One radix-table algorithm for every format: the software half that drivers use to edit tables in memory.

A ``RadixTable`` is a tree of 4 KiB tables of 512 64-bit entries in machine memory, rooted at a frame (or a
run of concatenated root frames, as ARM stage 2 allows).  It allocates intermediate tables on demand,
writes leaves at any level the caller allows (superpages), splits a superpage when part of it changes, and
reports what it changed as flush flags so that the driver can flush exactly once.

Every operation is all-or-nothing: allocations and writes are journalled, and if an allocation fails part
way, every write is undone and every table allocated by the call is freed before the error propagates.
Table frames that a change made unreachable (a table replaced by a superpage, a table reclaimed by unmap)
are *not* freed here: the hardware may still walk them until the IOTLB flush, so they are handed back to
the caller to free after it.

Two speeds, one result.  ``set_leaf`` writes in place without a journal when every table down to the leaf
exists (the per-page hot path).  ``map_range`` writes 4 KiB runs spanning many leaf tables a level-2 table
at a time: the missing leaf tables are taken in one allocator call (same frames, same order, same failure
points as one by one) and their leaves written with one numpy operation; ``unmap_range`` clears whole leaf
tables together.  ``RadixTable.bulk = False`` turns both off: the per-table loop is the reference the
equivalence tests compare them with, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from iommusim.errors import BadAddress, FrameRangeError, InvalidArgument, OutOfMemory
from iommusim.frames import PAGE_SHIFT, Mfn
from iommusim.machine.allocator import PageAllocator
from iommusim.machine.memory import MachineMemory
from iommusim.pagetable.format import Decoded, EntryKind, PageTableFormat, U64Array

__all__ = ["Change", "Journal", "RadixTable"]


class Change:
    """What an edit did.  Slotted, its lists made on first use: one is made per page on the hot path."""

    __slots__ = ("_freed", "_split", "flush", "old", "table", "tables_allocated")

    def __init__(self, flush: int = 0, old: int = 0, tables_allocated: int = 0) -> None:
        self.flush = flush  # FlushFlags bits (kept as int on the hot path)
        self.old = old  # per-entry edits: the entry that was there before
        self.tables_allocated = tables_allocated
        self.table: int | None = None  # per-entry edits: the frame of the table holding the entry
        self._freed: list[int] | None = None
        self._split: list[tuple[int, int]] | None = None

    @property
    def freed_tables(self) -> list[int]:
        """Table frames to free once the flush is done."""
        if self._freed is None:
            self._freed = []
        return self._freed

    @property
    def split(self) -> list[tuple[int, int]]:
        """(first dfn, level) of every superpage split."""
        if self._split is None:
            self._split = []
        return self._split

    def __repr__(self) -> str:
        return (
            f"Change(flush={self.flush}, old={self.old:#x}, freed_tables={self.freed_tables}, "
            f"split={self.split}, tables_allocated={self.tables_allocated})"
        )


class Journal:
    """Undo log of one edit: entries overwritten and frames allocated."""

    __slots__ = ("allocated", "undo", "writes")

    def __init__(self) -> None:
        self.writes: list[tuple[int, int, U64Array | int]] = []
        self.allocated: list[int] = []
        self.undo: list[Callable[[], None]] = []

    def rollback(self, memory: MachineMemory, allocator: PageAllocator) -> None:
        for mfn, index, old in reversed(self.writes):
            if isinstance(old, int):
                memory.store_word(mfn, index, old)
            else:
                memory.words(mfn)[index : index + len(old)] = old
        for mfn in reversed(self.allocated):
            allocator.free(Mfn(mfn))
        for hook in reversed(self.undo):
            hook()
        self.writes.clear()
        self.allocated.clear()
        self.undo.clear()


class RadixTable:
    """A page-table tree in machine memory, edited through one ``PageTableFormat``."""

    #: Whether ``map_range`` may write runs spanning many leaf tables in bulk (and ``unmap_range`` clear whole
    #: leaf tables together).  Turning it off gives the plain per-table loop, the reference the bulk paths
    #: are tested against.
    bulk: bool = True

    def __init__(
        self,
        memory: MachineMemory,
        allocator: PageAllocator,
        fmt: PageTableFormat,
        *,
        owner: str,
        levels: int,
        root: Mfn | None = None,
        root_pages: int = 1,
    ) -> None:
        if not 1 <= levels <= 6:
            raise InvalidArgument(f"a table has 1 to 6 levels, not {levels}")
        if root_pages < 1 or root_pages & (root_pages - 1) or root_pages > 16:
            raise InvalidArgument("concatenated root tables come in powers of two up to 16")
        self.memory = memory
        self.allocator = allocator
        self.fmt = fmt
        self.owner = owner
        self.levels = levels
        self.root_pages = root_pages
        self._root: int | None = None if root is None else int(root)
        self._present = fmt.present_mask
        self._addr_mask = fmt.addr_mask

    # -- geometry -----------------------------------------------------------------------------------

    @property
    def root(self) -> Mfn | None:
        return None if self._root is None else Mfn(self._root)

    @property
    def dfn_limit(self) -> int:
        """First frame number beyond what the tree can translate."""
        return self.root_pages << (9 * self.levels)

    def set_root(self, root: Mfn | None, levels: int | None = None) -> None:
        """Point at another root (e.g. after adding a level on top); frees nothing."""
        self._root = None if root is None else int(root)
        if levels is not None:
            self.levels = levels

    def _slot(self, table: int, level: int, dfn: int) -> tuple[int, int]:
        """(frame, index) of the entry for ``dfn`` in a table at ``level`` (the root may span frames)."""
        idx = dfn >> (9 * (level - 1))
        if level == self.levels:
            idx &= (self.root_pages << 9) - 1
            return table + (idx >> 9), idx & 511
        return table, idx & 511

    def check_dfn(self, dfn: int, count: int = 1) -> None:
        if dfn < 0 or count < 0 or dfn + count > self.dfn_limit:
            raise FrameRangeError(
                f"frames {dfn:#x}+{count:#x} are beyond the {self.levels}-level table's reach "
                f"({self.dfn_limit:#x} frames)"
            )

    # -- allocation ---------------------------------------------------------------------------------

    def _alloc_table(self, journal: Journal) -> int:
        mfn = self.allocator.alloc(self.owner).value
        journal.allocated.append(mfn)
        return mfn

    def _forget_root(self) -> None:
        self._root = None

    def ensure_root(self) -> Mfn:
        """Allocate the root table if there is none (zeroed)."""
        if self._root is None:
            order = self.root_pages.bit_length() - 1
            self._root = self.allocator.alloc(self.owner, self.root_pages, align_order=order).value
        return Mfn(self._root)

    # -- walking (software side) -----------------------------------------------------------------------

    def _descend(self, dfn: int, to_level: int, journal: Journal | None, change: Change | None) -> int | None:
        """Frame of the table at ``to_level`` covering ``dfn``; allocates and splits only with a journal."""
        table = self._root
        if table is None:
            if journal is None:
                return None
            table = self.ensure_root().value
            journal.allocated.extend(range(table, table + self.root_pages))
            journal.undo.append(self._forget_root)
        mem = self.memory
        load = mem.load_word
        is_table = self.fmt.is_table
        present = self._present
        level = self.levels
        while level > to_level:
            if level == self.levels:
                t, i = self._slot(table, level, dfn)
            else:
                t, i = table, (dfn >> (9 * (level - 1))) & 511
            raw = load(t, i)
            if not raw & present:
                if journal is None:
                    return None
                new = self._alloc_table(journal)
                journal.writes.append((t, i, raw))
                mem.store_word(t, i, self.fmt.table_entry(new << PAGE_SHIFT, level))
                if change is not None:
                    change.tables_allocated += 1
                table = new
            elif is_table(raw, level):
                table = (raw & self._addr_mask) >> PAGE_SHIFT
            else:
                d = self.fmt.decode(raw, level)
                if d.kind != EntryKind.LEAF:
                    raise BadAddress(f"malformed entry {raw:#018x} at level {level} in table {t:#x}: {d.problem}")
                if journal is None:
                    return None
                table = self._split(t, i, raw, level, dfn, journal, change)
            level -= 1
        return table

    def _split(self, t: int, i: int, raw: int, level: int, dfn: int, journal: Journal, change: Change | None) -> int:
        """Replace a superpage leaf at ``level`` by a table of 512 leaves that map the same memory."""
        new = self._alloc_table(journal)
        child_size = 1 << (9 * (level - 2))
        base = raw & self._addr_mask & ~((child_size << (9 + PAGE_SHIFT)) - 1)
        bits = self.fmt.split_leaf_bits(raw, level)
        outs = np.uint64(base) + np.arange(512, dtype=np.uint64) * np.uint64(child_size << PAGE_SHIFT)
        self.memory.words(new)[:] = outs | np.uint64(bits)
        journal.writes.append((t, i, raw))
        self.memory.store_word(t, i, self.fmt.table_entry(new << PAGE_SHIFT, level))
        if change is not None:
            span = 9 * (level - 1)
            change.split.append(((dfn >> span) << span, level))
            change.tables_allocated += 1
        return new

    def _find_leaf_table(self, dfn: int) -> int | None:
        """The level-1 table for ``dfn`` if the walk down to it meets only table entries (``dfn`` in reach)."""
        table = self._root
        assert table is not None
        load = self.memory.load_word
        is_table = self.fmt.is_table
        mask = self._addr_mask
        present = self._present
        level = self.levels
        if level > 1:  # the top level may span concatenated root frames
            t, i = self._slot(table, level, dfn)
            raw = load(t, i)
            if not raw & present or not is_table(raw, level):  # is_table is only asked of present entries
                return None
            table = (raw & mask) >> PAGE_SHIFT
            level -= 1
        while level > 1:
            raw = load(table, (dfn >> (9 * level - 9)) & 511)
            if not raw & present or not is_table(raw, level):
                return None
            table = (raw & mask) >> PAGE_SHIFT
            level -= 1
        return table

    def table_for(self, dfn: int, level: int = 1) -> Mfn | None:
        """The existing table at ``level`` that covers ``dfn`` (no allocation)."""
        if level == 1 and self.levels > 1 and self._root is not None and 0 <= dfn < self.dfn_limit:
            found = self._find_leaf_table(dfn)
            if found is not None:
                return Mfn(found)  # otherwise the full descent says why not (or raises on a malformed entry)
        t = self._descend(dfn, level, None, None)
        return None if t is None else Mfn(t)

    def entry_slot(self, dfn: int, level: int) -> tuple[int, int]:
        """(frame, index) of the entry at ``level`` for ``dfn``, allocating tables down to it."""
        self.check_dfn(dfn)
        journal = Journal()
        try:
            table = self._descend(dfn, level, journal, None)
        except OutOfMemory:
            journal.rollback(self.memory, self.allocator)
            raise
        assert table is not None
        return self._slot(table, level, dfn)

    def lookup(self, dfn: int) -> Decoded | None:
        """The leaf that translates ``dfn`` (any level), or None."""
        if self._root is None or not 0 <= dfn < self.dfn_limit:
            return None
        table = self._root
        level = self.levels
        load = self.memory.load_word
        is_table = self.fmt.is_table
        while True:
            t, i = self._slot(table, level, dfn) if level == self.levels else (table, (dfn >> (9 * (level - 1))) & 511)
            raw = load(t, i)
            if not raw & self._present:
                return None
            if level > 1 and is_table(raw, level):
                table = (raw & self._addr_mask) >> PAGE_SHIFT
                level -= 1
                continue
            d = self.fmt.decode(raw, level)
            return d if d.kind == EntryKind.LEAF else None

    # -- per-entry edits (the fast path) -------------------------------------------------------------

    def set_leaf(self, dfn: int, raw: int, level: int = 1) -> Change:
        """Write one leaf (``raw`` including its address) at ``level``; ADDED, plus MODIFIED if one was there."""
        if level == 1 and self.levels > 1 and self._root is not None and 0 <= dfn < self.dfn_limit:
            # the per-page hot path: every table is there already, so nothing to allocate or journal
            table = self._find_leaf_table(dfn)
            if table is not None:
                mem = self.memory
                i = dfn & 511
                old = mem.load_word(table, i)
                change = Change(old=old)
                change.table = table
                if old != raw:
                    if old & self._present:
                        change.flush = 3 if raw & self._present else 2
                    elif raw & self._present:
                        change.flush = 1
                    mem.store_word(table, i, raw)
                return change
        self.check_dfn(dfn, 1 << (9 * (level - 1)))
        journal = Journal()
        change = Change()
        try:
            table = self._descend(dfn, level, journal, change)
        except OutOfMemory:
            journal.rollback(self.memory, self.allocator)
            raise
        assert table is not None
        t, i = self._slot(table, level, dfn)
        old = self.memory.load_word(t, i)
        change.old = old
        change.table = t
        if old == raw:
            return change
        if old & self._present:
            change.flush |= 2  # MODIFIED
            if level > 1 and self.fmt.is_table(old, level):
                change.freed_tables.extend(self.subtree_tables((old & self._addr_mask) >> PAGE_SHIFT, level - 1))
                change.flush |= 4  # ALL: a whole table's worth of translations went away
        if raw & self._present:
            change.flush |= 1  # ADDED
        self.memory.store_word(t, i, raw)
        return change

    def clear_leaf(self, dfn: int) -> Change:
        """Clear the 4 KiB translation of ``dfn``, splitting a superpage around it if needed."""
        return self.unmap_range(dfn, 1)

    # -- range edits (bulk paths) ------------------------------------------------------------------------

    def map_range(
        self,
        dfn: int,
        maddr: int,
        count: int,
        leaf_bits: dict[int, int],
    ) -> Change:
        """Map ``count`` 4 KiB frames from ``dfn`` to machine address ``maddr`` onwards.

        ``leaf_bits`` gives, for every level the caller allows a leaf at, the non-address bits of a leaf
        there; the largest level that the alignment of both sides and the remaining count permit is used.
        """
        if maddr & ((1 << PAGE_SHIFT) - 1):
            raise InvalidArgument(f"machine address {maddr:#x} is not page aligned")
        if 1 not in leaf_bits:
            raise InvalidArgument("4 KiB leaves must be allowed")
        self.check_dfn(dfn, count)
        levels_desc = sorted(leaf_bits, reverse=True)
        journal = Journal()
        change = Change()
        mem = self.memory
        mfn = maddr >> PAGE_SHIFT
        pos = 0
        try:
            while pos < count:
                d, m, left = dfn + pos, mfn + pos, count - pos
                level = next(
                    lv for lv in levels_desc if not ((d | m) & ((1 << (9 * (lv - 1))) - 1)) and left >> (9 * (lv - 1))
                )
                if level == 1 and self.levels > 2 and self.bulk:
                    run4k = _level1_extent(d, m, left, levels_desc)
                    if run4k > 512 - (d & 511):  # more than one leaf table: the bulk path
                        self._map_4k_bulk(d, m, run4k, leaf_bits[1], journal, change)
                        pos += run4k
                        continue
                span = 9 * (level - 1)
                table = self._descend(d, level, journal, change)
                assert table is not None
                t, i = self._slot(table, level, d)
                run = min(512 - i, left >> span)
                words = mem.words(t)
                old = words[i : i + run].copy()
                new = (
                    np.uint64(m << PAGE_SHIFT) + np.arange(run, dtype=np.uint64) * np.uint64(1 << (span + PAGE_SHIFT))
                ) | np.uint64(leaf_bits[level])
                if not np.array_equal(old, new):
                    journal.writes.append((t, i, old))
                    was = self.fmt.present_array(old)
                    if was.any():
                        change.flush |= 2
                        if level > 1:
                            tables = was & self.fmt.table_array(old, level)
                            for raw in old[tables]:
                                change.freed_tables.extend(
                                    self.subtree_tables((int(raw) & self._addr_mask) >> PAGE_SHIFT, level - 1)
                                )
                                change.flush |= 4
                    change.flush |= 1
                    words[i : i + run] = new
                pos += run << span
        except OutOfMemory:
            journal.rollback(mem, self.allocator)
            raise
        return change

    def _map_4k_bulk(self, dfn: int, mfn: int, count: int, bits: int, journal: Journal, change: Change) -> None:
        """4 KiB leaves for ``count`` frames spanning several leaf tables, one level-2 table at a time.

        Writes exactly what the per-table loop (and so the per-page path) writes, allocating the missing leaf
        tables in the same order: the level-2 table by the ordinary descent, then its missing leaf tables in
        ascending order in one allocator call; the leaves of new tables (all zero before) are written with
        one numpy assignment where their storage is contiguous.  A region whose level-2 entries hold
        superpages (to split) or malformed entries goes through the per-table loop instead.
        """
        end = dfn + count
        g = dfn
        while g < end:
            region_end = min(end, ((g >> 18) + 1) << 18)
            self._map_4k_region(g, mfn + (g - dfn), region_end - g, bits, journal, change)
            g = region_end

    def _map_4k_region(self, dfn: int, mfn: int, count: int, bits: int, journal: Journal, change: Change) -> None:
        """The part of ``_map_4k_bulk`` under one level-2 table (at most 1 GiB)."""
        mem = self.memory
        fmt = self.fmt
        t2 = self._descend(dfn, 2, journal, change)
        assert t2 is not None
        i0, i1 = (dfn >> 9) & 511, ((dfn + count - 1) >> 9) & 511
        words2 = mem.words(t2)
        ent = words2[i0 : i1 + 1]
        present = fmt.present_array(ent)
        has_any = bool(present.any())
        if has_any and not bool((present <= fmt.table_array(ent, 2)).all()):
            self._map_4k_per_table(dfn, mfn, count, bits, journal, change)
            return
        empties = np.flatnonzero(~present) if has_any else np.arange(len(ent))
        new: list[int] = []
        if len(empties):
            try:
                self.allocator.alloc_frames(self.owner, len(empties), new)
            finally:
                journal.allocated.extend(new)
            journal.writes.append((t2, i0, ent.copy()))
            ent[empties] = fmt.table_entry_array(np.asarray(new, dtype=np.uint64) << np.uint64(PAGE_SHIFT), 2)
            change.tables_allocated += len(new)
        off0 = dfn & 511
        first_word = (mfn << PAGE_SHIFT) | bits
        if len(new) == len(ent):
            block = mem.frame_block(new)
            if block is not None:
                flat = block.reshape(-1)[off0 : off0 + count]
                _fill_leaves(flat, first_word, bits)
                change.flush |= 1 if first_word or count > 1 else 0
                return
        # general case: table by table (new tables are zero, existing ones are compared and journalled)
        new_set = set(empties.tolist())
        pos = 0
        for j in range(len(ent)):
            first = off0 if j == 0 else 0
            run = min(512 - first, count - pos)
            t = (int(ent[j]) & self._addr_mask) >> PAGE_SHIFT
            words = mem.words(t)
            vals = np.empty(run, dtype=np.uint64)
            _fill_leaves(vals, first_word + (pos << PAGE_SHIFT), bits)
            if j in new_set:
                words[first : first + run] = vals
                change.flush |= 1 if run > 1 or first_word + (pos << PAGE_SHIFT) else 0
            else:
                self._write_leaves(t, words, first, vals, journal, change)
            pos += run

    def _map_4k_per_table(self, dfn: int, mfn: int, count: int, bits: int, journal: Journal, change: Change) -> None:
        pos = 0
        while pos < count:
            d = dfn + pos
            table = self._descend(d, 1, journal, change)
            assert table is not None
            i = d & 511
            run = min(512 - i, count - pos)
            vals = np.empty(run, dtype=np.uint64)
            _fill_leaves(vals, ((mfn + pos) << PAGE_SHIFT) | bits, bits)
            self._write_leaves(table, self.memory.words(table), i, vals, journal, change)
            pos += run

    def _write_leaves(self, t: int, words: U64Array, i: int, new: U64Array, journal: Journal, change: Change) -> None:
        """Level-1 leaves into an existing table: journalled, flags as the per-table loop sets them."""
        run = len(new)
        old = words[i : i + run].copy()
        if np.array_equal(old, new):
            return
        journal.writes.append((t, i, old))
        if self.fmt.present_array(old).any():
            change.flush |= 2
        change.flush |= 1
        words[i : i + run] = new

    def unmap_range(self, dfn: int, count: int, *, reclaim: bool = False) -> Change:
        """Remove the translations of ``count`` frames from ``dfn``.

        Superpages partly covered are split first (which can allocate, and so fail); with ``reclaim``,
        tables wholly covered are unhooked and handed back in ``freed_tables``, otherwise they stay (empty).
        """
        self.check_dfn(dfn, count)
        change = Change()
        if self._root is None or count == 0:
            return change
        journal = Journal()
        try:
            for r in range(self.root_pages):
                top_span = 9 * self.levels
                base = r << top_span
                lo, hi = max(dfn, base), min(dfn + count, base + (1 << top_span))
                if lo < hi:
                    self._unmap_in(self._root + r, self.levels, base, lo, hi, journal, change, reclaim)
        except OutOfMemory:
            journal.rollback(self.memory, self.allocator)
            raise
        return change

    def _unmap_in(
        self,
        table: int,
        level: int,
        base: int,
        lo: int,
        hi: int,
        journal: Journal,
        change: Change,
        reclaim: bool,
    ) -> None:
        span = 9 * (level - 1)
        words = self.memory.words(table)
        first, last = (lo - base) >> span, (hi - 1 - base) >> span
        if level == 1:
            old = words[first : last + 1].copy()
            if self.fmt.present_array(old).any():
                journal.writes.append((table, first, old))
                words[first : last + 1] = 0
                change.flush |= 2
            return
        emptied: list[int] = []  # whole leaf tables to clear, done together after the loop (no allocation)
        for i in range(first, last + 1):
            raw = int(words[i])
            if not raw & self._present:
                continue
            e_lo = base + (i << span)
            e_hi = e_lo + (1 << span)
            full = lo <= e_lo and e_hi <= hi
            is_table = self.fmt.is_table(raw, level)
            if full and is_table and level == 2 and not reclaim and self.bulk:
                emptied.append((raw & self._addr_mask) >> PAGE_SHIFT)
                continue
            if full and (not is_table or reclaim):
                journal.writes.append((table, i, raw))
                words[i] = 0
                change.flush |= 2
                if is_table:
                    change.freed_tables.extend(self.subtree_tables((raw & self._addr_mask) >> PAGE_SHIFT, level - 1))
                    change.flush |= 4
                continue
            if is_table:
                child = (raw & self._addr_mask) >> PAGE_SHIFT
            else:
                child = self._split(table, i, raw, level, e_lo, journal, change)
            self._unmap_in(child, level - 1, e_lo, max(lo, e_lo), min(hi, e_hi), journal, change, reclaim)
        if emptied:
            self._clear_leaf_tables(emptied, journal, change)

    def _clear_leaf_tables(self, frames: list[int], journal: Journal, change: Change) -> None:
        """Clear whole level-1 tables as the per-table path does (journal those with a present entry),
        in one numpy pass where their storage is contiguous."""
        mem = self.memory
        block = mem.frame_block(frames)
        old = block.copy() if block is not None else np.stack([mem.peek_words(f) for f in frames])
        rows = self.fmt.present_array(old).any(axis=1)
        if not rows.any():
            return
        for r in np.flatnonzero(rows).tolist():
            journal.writes.append((frames[r], 0, old[r]))
            if block is None:
                mem.words(frames[r])[:] = 0
        if block is not None:
            block[rows] = 0
        change.flush |= 2

    # -- whole-tree operations ---------------------------------------------------------------------------

    def subtree_tables(self, table: int, level: int) -> list[int]:
        """Every table frame of the subtree rooted at ``table`` (a table at ``level``), root first."""
        out = [table]
        if level == 1:
            return out
        stack = [(table, level)]
        while stack:
            t, lv = stack.pop()
            words = self.memory.peek_words(t)
            present = self.fmt.present_array(words)
            if not present.any():
                continue
            tables = present & self.fmt.table_array(words, lv)
            for raw in words[tables]:
                child = (int(raw) & self._addr_mask) >> PAGE_SHIFT
                out.append(child)
                if lv - 1 > 1:
                    stack.append((child, lv - 1))
        return out

    def table_frames(self) -> list[int]:
        """Every table frame reachable from the root (the root frames included)."""
        if self._root is None:
            return []
        out: list[int] = []
        for r in range(self.root_pages):
            out.extend(self.subtree_tables(self._root + r, self.levels))
        return out

    def free_all(self) -> int:
        """Free every table and forget the root; returns how many frames were freed."""
        frames = self.table_frames()
        self.free_frames(frames)
        self._root = None
        return len(frames)

    def free_frames(self, frames: Iterable[int]) -> None:
        for f in frames:
            self.allocator.free(Mfn(f))


def _level1_extent(dfn: int, mfn: int, left: int, levels_desc: list[int]) -> int:
    """How many frames from ``dfn`` get 4 KiB leaves before a larger allowed leaf becomes usable."""
    out = left
    for lv in levels_desc:
        if lv == 1:
            continue
        size = 1 << (9 * (lv - 1))
        if (dfn - mfn) & (size - 1):
            continue  # the two sides are never aligned together at this size
        first = -dfn & (size - 1)
        if left - first >= size:
            out = min(out, first)
    return out


def _fill_leaves(out: U64Array, first_word: int, bits: int) -> None:
    """``out[k] = first_word + k pages``: consecutive 4 KiB leaves (the non-address bits stay ``bits``).

    Adding page offsets to the first leaf equals ORing the bits into each address, because the address
    field never carries into the bits above it.  The offsets come from one cached ramp, so that no
    temporary as large as the run is made (fresh pages cost more than the arithmetic).
    """
    if first_word & ((1 << PAGE_SHIFT) - 1) & ~bits:
        raise InvalidArgument("a leaf's bits and its address overlap")
    ramp = _page_ramp()
    base = np.uint64(first_word)
    for pos in range(0, len(out), len(ramp)):
        chunk = out[pos : pos + len(ramp)]
        np.add(ramp[: len(chunk)], base + np.uint64(pos << PAGE_SHIFT), out=chunk)


_RAMP: list[U64Array] = []


def _page_ramp() -> U64Array:
    """0, 4096, 8192, ... for one level-2 table's worth of pages (2 MiB of words, made once)."""
    if not _RAMP:
        _RAMP.append(np.arange(1 << 18, dtype=np.uint64) << np.uint64(PAGE_SHIFT))
    return _RAMP[0]
