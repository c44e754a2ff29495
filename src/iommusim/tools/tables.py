"""Translation tables read back from memory: where a tree is, what it maps, and what it looks like.

A ``TableRoot`` names one tree the hardware walks (format, root frame, levels, concatenated root pages);
everything else here reads it through the hardware-side walker (``pagetable.walk``) from anything that
yields frames, live machine memory or a memory image:

* ``table_mappings``: the coalesced runs (Dfn range -> Mfn range, permissions, page size);
* ``MappingIndex``: those runs, searchable by Dfn;
* ``table_frames``: every table page the tree reaches;
* ``build_tree``: the tree itself, one node per table with its leaves coalesced into runs, for dumps.

Broken trees raise ``TableWalkError`` naming the address (a loop, a pointer outside the image, a level
that makes no sense), never hang: ``max_tables`` bounds every walk.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from iommusim.frames import PAGE_SHIFT
from iommusim.pagetable.format import EntryKind, PageTableFormat, U64Array, level_shift
from iommusim.pagetable.walk import FrameReader, Mapping, TableWalkError, mappings, walk, walk_tables
from iommusim.perms import Perm

__all__ = [
    "DEFAULT_MAX_TABLES",
    "LeafRun",
    "MappingIndex",
    "TableNode",
    "TableRoot",
    "build_tree",
    "mapping_json",
    "table_frames",
    "table_mappings",
]

#: Enough for any tree a simulated machine builds; an image decoder passes the image's own frame count.
DEFAULT_MAX_TABLES = 1 << 18


def _size_text(shift: int) -> str:
    size = 1 << shift
    for unit, bits in (("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << bits and size % (1 << bits) == 0:
            return f"{size >> bits}{unit}"
    return f"{size}B"


@dataclass(frozen=True)
class TableRoot:
    """One tree the hardware walks: its format, root frame, number of levels and concatenated root pages.

    ``perms`` is what the structure naming the root lets the tree grant at most (an AMD device-table
    entry's IR and IW); every translation of the tree is capped by it.
    """

    fmt: PageTableFormat
    root_mfn: int
    levels: int
    root_pages: int = 1
    perms: Perm = Perm.RW

    @property
    def root_maddr(self) -> int:
        return self.root_mfn << PAGE_SHIFT

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        """Identity of the tree for caching within one inspection (the format object, root, shape, cap)."""
        return (id(self.fmt), self.root_mfn, self.levels, self.root_pages, int(self.perms))

    def describe(self) -> str:
        roots = f" x{self.root_pages} concatenated" if self.root_pages > 1 else ""
        capped = f", capped at {self.perms.short()}" if self.perms != Perm.RW else ""
        name = self.fmt.name or type(self.fmt).__name__
        return f"{name} tables at {self.root_maddr:#x}{roots}, {self.levels} levels{capped}"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.fmt.name,
            "root": f"{self.root_maddr:#x}",
            "levels": self.levels,
            "root_pages": self.root_pages,
            "perms": self.perms.short(),
        }


def table_mappings(
    reader: FrameReader,
    root: TableRoot,
    *,
    problems: list[str] | None = None,
    max_tables: int = DEFAULT_MAX_TABLES,
) -> list[Mapping]:
    """Every translation of the tree, coalesced; malformed entries go to ``problems`` when it is given.

    The tree's shape is checked first (``table_frames``): a table reached twice, a loop or a pointer
    outside memory raises ``TableWalkError`` before any work that a shared subtree could multiply.
    """
    table_frames(reader, root, max_tables=max_tables)
    return mappings(
        reader,
        root.fmt,
        root.root_mfn,
        root.levels,
        root_pages=root.root_pages,
        max_tables=max_tables,
        problems=problems,
        root_perms=root.perms,
    )


def table_lookup(reader: FrameReader, root: TableRoot, dfn: int) -> tuple[int, Perm, int] | None:
    """(machine frame, permissions, page shift) the tree in memory gives ``dfn``, or None where it faults."""
    w = walk(
        reader,
        root.fmt,
        root.root_mfn,
        root.levels,
        dfn << PAGE_SHIFT,
        root_pages=root.root_pages,
        root_perms=root.perms,
    )
    return (w.maddr >> PAGE_SHIFT, w.perms, w.entry.page_shift) if w.ok else None


def table_frames(reader: FrameReader, root: TableRoot, *, max_tables: int = DEFAULT_MAX_TABLES) -> list[int]:
    """Every table page reachable from the root (the concatenated root pages included), depth first.

    No table may be reached twice: tables are never shared within a tree, and a tree whose entries all
    point at one subtree would otherwise make a walk exponentially long.  ``TableWalkError`` names it.
    """
    seen: dict[int, int] = {}
    for frame, level, base, *_ in walk_tables(
        reader, root.fmt, root.root_mfn, root.levels, root_pages=root.root_pages, max_tables=max_tables
    ):
        if frame in seen:
            raise TableWalkError(
                f"the level-{level} table at {frame << PAGE_SHIFT:#x} is reached twice (for dfn {seen[frame]:#x} "
                f"and dfn {base:#x}) in the tree at {root.root_maddr:#x}: tables must not be shared within a tree"
            )
        seen[frame] = base
    return list(seen)


def mapping_json(m: Mapping) -> dict[str, Any]:
    return {
        "dfn": f"{m.dfn:#x}",
        "dfn_last": f"{m.dfn_end - 1:#x}",
        "mfn": f"{m.mfn:#x}",
        "mfn_last": f"{m.mfn + m.pages - 1:#x}",
        "pages": m.pages,
        "perms": m.perms.short(),
        "page_size": _size_text(m.page_shift),
    }


class MappingIndex:
    """Coalesced runs sorted by Dfn, searchable by address."""

    def __init__(self, runs: list[Mapping]) -> None:
        self.runs = sorted(runs, key=lambda m: m.dfn)
        self._starts = [m.dfn for m in self.runs]

    def lookup(self, dfn: int) -> tuple[int, Perm, int] | None:
        """(mfn, perms, page shift) that ``dfn`` translates to, or None."""
        i = bisect.bisect_right(self._starts, dfn) - 1
        if i >= 0:
            m = self.runs[i]
            if dfn < m.dfn_end:
                return m.mfn + (dfn - m.dfn), m.perms, m.page_shift
        return None

    def overlapping(self, lo: int, hi: int) -> list[Mapping]:
        """Runs that cover any Dfn of ``[lo, hi)``, ascending."""
        i = max(0, bisect.bisect_right(self._starts, lo) - 1)
        out = []
        while i < len(self.runs) and self.runs[i].dfn < hi:
            if self.runs[i].dfn_end > lo:
                out.append(self.runs[i])
            i += 1
        return out

    def disagreement(self, lo: int, pages: int, mfn: int, perms: Perm) -> list[tuple[int, int]]:
        """Sub-ranges (first dfn, count) of ``[lo, lo + pages)`` that do not map linearly to ``mfn`` with ``perms``."""
        hi = lo + pages
        bad: list[tuple[int, int]] = []
        pos = lo

        def mark(a: int, b: int) -> None:
            if a >= b:
                return
            if bad and bad[-1][0] + bad[-1][1] == a:
                bad[-1] = (bad[-1][0], bad[-1][1] + b - a)
            else:
                bad.append((a, b - a))

        for m in self.overlapping(lo, hi):
            a, b = max(lo, m.dfn), min(hi, m.dfn_end)
            mark(pos, a)  # a hole before this run
            agrees = m.perms == perms and m.mfn + (a - m.dfn) == mfn + (a - lo)
            if not agrees:
                mark(a, b)
            pos = b
        mark(pos, hi)
        return bad

    def __len__(self) -> int:
        return len(self.runs)

    @property
    def pages(self) -> int:
        return sum(m.pages for m in self.runs)


@dataclass
class LeafRun:
    """Consecutive leaf entries of one table that map consecutive frames with the same rights.

    Each entry covers one slot of its table (``slot_pages`` frames).  A page larger than a slot (an AMD
    NextLevel-7 page) is replicated in every slot it spans, each replica translating its own slot.
    """

    first_index: int
    count: int
    dfn: int
    mfn: int  # where the first slot of the run lands
    page_shift: int
    perms: Perm
    slot_pages: int = 1

    @property
    def pages(self) -> int:
        return self.count * self.slot_pages

    def describe(self) -> str:
        idx = (
            f"[{self.first_index}]" if self.count == 1 else f"[{self.first_index}-{self.first_index + self.count - 1}]"
        )
        last_d, last_m = self.dfn + self.pages - 1, self.mfn + self.pages - 1
        span = f"dfn {self.dfn:#x}" if self.pages == 1 else f"dfn {self.dfn:#x}-{last_d:#x}"
        out = f"mfn {self.mfn:#x}" if self.pages == 1 else f"mfn {self.mfn:#x}-{last_m:#x}"
        if (1 << (self.page_shift - PAGE_SHIFT)) > self.slot_pages:  # one page replicated in several slots
            many = f" in {self.count} slot{'s' if self.count > 1 else ''}"
        else:
            many = f" x{self.count}" if self.count > 1 else ""
        return f"{idx} {span} -> {out} {self.perms.short()} {_size_text(self.page_shift)}{many}"

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.first_index,
            "count": self.count,
            "dfn": f"{self.dfn:#x}",
            "mfn": f"{self.mfn:#x}",
            "pages": self.pages,
            "perms": self.perms.short(),
            "page_size": _size_text(self.page_shift),
        }


@dataclass
class TableNode:
    """One table page: where it is, what it covers, its leaves (as runs) and the tables below it."""

    frame: int
    level: int
    dfn: int  # first Dfn the table covers
    table_entries: int = 0
    leaves: list[LeafRun] = field(default_factory=list)
    children: list[TableNode] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def maddr(self) -> int:
        return self.frame << PAGE_SHIFT

    def describe(self) -> str:
        span = 1 << (9 * self.level)  # pages one table covers
        what = []
        if self.table_entries:
            what.append(f"{self.table_entries} table pointer{'s' if self.table_entries != 1 else ''}")
        leaves = sum(r.count for r in self.leaves)
        if leaves:
            what.append(f"{leaves} lea{'ves' if leaves != 1 else 'f'}")
        if not what:
            what.append("empty")
        return f"L{self.level} table @ {self.maddr:#x} (dfn {self.dfn:#x}-{self.dfn + span - 1:#x}): {', '.join(what)}"

    def to_json(self) -> dict[str, Any]:
        return {
            "table": f"{self.maddr:#x}",
            "level": self.level,
            "dfn": f"{self.dfn:#x}",
            "table_entries": self.table_entries,
            "leaves": [r.to_json() for r in self.leaves],
            "problems": self.problems,
            "children": [c.to_json() for c in self.children],
        }


@dataclass
class TableTree:
    """The tables of one tree (several tops when root tables are concatenated), possibly cut short."""

    root: TableRoot
    tops: list[TableNode]
    tables: int  # tables in the tree
    shown: int  # tables that have a node here

    @property
    def hidden(self) -> int:
        return self.tables - self.shown

    def to_json(self) -> dict[str, Any]:
        return {"tables": self.tables, "shown": self.shown, "tops": [t.to_json() for t in self.tops]}


def _leaf_runs(fmt: PageTableFormat, words: U64Array, level: int, base: int, inherited: Perm) -> list[LeafRun]:
    present = fmt.present_array(words)
    if level > 1:
        present &= ~fmt.table_array(words, level)
    present &= ~fmt.malformed_array(words, level)
    idx = np.nonzero(present)[0]
    if idx.size == 0:
        return []
    raws = words[idx]
    shifts = fmt.leaf_shift_array(raws, level).astype(np.int64)
    perms = fmt.perms_array(raws, level)
    if inherited != Perm.RW:
        perms = perms & np.uint8(inherited)
    span_pages = 1 << (level_shift(level) - PAGE_SHIFT)
    # where each slot lands: the page's base plus the slot's offset within the page (a page that spans
    # several slots, replicated in each, carries size bits in its address field: the size mask drops them)
    size_mask = (np.int64(1) << shifts) - 1
    slot_daddr = (base + (idx.astype(np.int64) << (9 * (level - 1)))) << PAGE_SHIFT
    addrs = ((fmt.address_array(raws).astype(np.int64) & ~size_mask) | (slot_daddr & size_mask)) >> PAGE_SHIFT
    step = np.int64(span_pages)
    brk = np.ones(idx.shape, dtype=bool)
    brk[1:] = (
        (idx[1:] != idx[:-1] + 1)
        | (addrs[1:] != addrs[:-1] + step)
        | (perms[1:] != perms[:-1])
        | (shifts[1:] != shifts[:-1])
    )
    starts = np.nonzero(brk)[0]
    ends = np.append(starts[1:], idx.size)
    out = []
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        i = int(idx[s])
        out.append(
            LeafRun(
                i,
                e - s,
                base + (i << (9 * (level - 1))),
                int(addrs[s]),
                int(shifts[s]),
                Perm(int(perms[s])),
                span_pages,
            )
        )
    return out


def build_tree(
    reader: FrameReader, root: TableRoot, *, max_nodes: int = 256, max_tables: int = DEFAULT_MAX_TABLES
) -> TableTree:
    """The tree as nodes (at most ``max_nodes`` of them; the rest are only counted)."""
    fmt = root.fmt
    pending: dict[tuple[int, int], TableNode] = {}
    tops: list[TableNode] = []
    tables = shown = 0
    for frame, level, base, words, inherited in walk_tables(
        reader,
        fmt,
        root.root_mfn,
        root.levels,
        root_pages=root.root_pages,
        max_tables=max_tables,
        root_perms=root.perms,
    ):
        tables += 1
        node = pending.pop((frame, base), None)
        if node is None:
            if level != root.levels or shown >= max_nodes:
                continue  # below a node that was not built
            node = TableNode(frame, level, base)
            tops.append(node)
        shown += 1
        node.leaves = _leaf_runs(fmt, words, level, base, inherited)
        bad = fmt.present_array(words) & fmt.malformed_array(words, level)
        for i in np.nonzero(bad)[0].tolist():
            d = fmt.decode(int(words[i]), level)
            node.problems.append(f"malformed entry {d.raw:#018x} at {(frame << PAGE_SHIFT) | (i << 3):#x}: {d.problem}")
        if level == 1:
            continue
        span = 9 * (level - 1)
        for i in np.nonzero(fmt.present_array(words))[0].tolist():
            d = fmt.decode(int(words[i]), level)
            if d.kind != EntryKind.TABLE:
                continue
            node.table_entries += 1
            if shown + len(pending) >= max_nodes:
                continue
            child = TableNode(d.address >> PAGE_SHIFT, d.next_level, base + (i << span))
            node.children.append(child)
            pending[(child.frame, child.dfn)] = child
    return TableTree(root, tops, tables, shown)
