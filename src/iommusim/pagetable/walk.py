"""The hardware side of a radix table: walk one address, or enumerate every mapping, from memory alone.

Nothing here knows who wrote the tables.  Given something that can read frames (live machine memory or a
memory image), a format, a root and a level count, ``walk`` translates one address the way the hardware
does and says where it stopped if it could not; ``mappings`` lists every translation the tree makes,
coalesced into runs, for dumps, decoding of images and isolation checks.  Corrupt trees (a pointer outside
the image, a table that points back to one of its ancestors, an explosion of shared subtrees) produce a
``TableWalkError`` naming the address, never a hang.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from iommusim.errors import BadAddress
from iommusim.frames import PAGE_SHIFT
from iommusim.pagetable.format import Decoded, EntryKind, PageTableFormat, U64Array, level_shift
from iommusim.perms import Perm

__all__ = ["FrameReader", "Mapping", "TableWalkError", "WalkResult", "mappings", "walk", "walk_tables"]


class FrameReader(Protocol):
    """Anything that yields the 512 words of a frame (machine memory, a memory image)."""

    def peek_words(self, mfn: int) -> U64Array: ...


class TableWalkError(BadAddress):
    """The tables themselves are broken: the message names the table or entry address."""


@dataclass(frozen=True, slots=True)
class WalkResult:
    """Where a walk of one address ended."""

    entry: Decoded  # the leaf, or the entry that stopped the walk (EMPTY or MALFORMED)
    level: int  # level of that entry
    entry_maddr: int  # machine address of that entry
    perms: Perm  # effective permissions (ANDed over the walk where the format says so)
    maddr: int  # output machine address of the input address (leaf only)
    tables: tuple[int, ...]  # table frames visited, root first

    @property
    def ok(self) -> bool:
        return self.entry.kind == EntryKind.LEAF


def walk(
    reader: FrameReader,
    fmt: PageTableFormat,
    root_mfn: int,
    levels: int,
    daddr: int,
    *,
    root_pages: int = 1,
    root_perms: Perm = Perm.RW,
) -> WalkResult:
    """Translate ``daddr`` through the tree at ``root_mfn``; never raises for absent or bad entries.

    An address with bits set above what the tree reaches, or in the index of a level a pointer skips
    (a format that lets a pointer skip levels requires those bits to be zero), translates to nothing:
    the hardware faults on it rather than folding it onto a lower address.  ``root_perms`` caps what the
    tree grants, as the structure that names the root may do (an AMD device-table entry's IR and IW).
    """
    reach = level_shift(levels + 1) + (root_pages.bit_length() - 1)
    if daddr >> reach:
        beyond = Decoded(EntryKind.EMPTY, 0, levels, problem=f"address beyond the {reach} bits the tree reaches")
        return WalkResult(beyond, levels, root_mfn << PAGE_SHIFT, Perm.NONE, 0, ())
    table = root_mfn
    level = levels
    perms = root_perms
    visited: list[int] = []
    while True:
        idx = daddr >> (PAGE_SHIFT + 9 * (level - 1))
        if level == levels:
            idx &= (root_pages << 9) - 1
            frame, i = table + (idx >> 9), idx & 511
        else:
            frame, i = table, idx & 511
        visited.append(frame)
        raw = int(reader.peek_words(frame)[i])
        d = fmt.decode(raw, level)
        where = (frame << PAGE_SHIFT) | (i << 3)
        if d.kind == EntryKind.TABLE and level > 1 and 1 <= d.next_level < level:
            skipped = ((1 << level_shift(level)) - 1) & ~((1 << level_shift(d.next_level + 1)) - 1)
            if daddr & skipped:
                why = f"address bits of the levels skipped below level {level} are not zero"
                return WalkResult(
                    Decoded(EntryKind.EMPTY, raw, level, problem=why), level, where, Perm.NONE, 0, tuple(visited)
                )
            if fmt.hierarchical_perms:
                perms &= d.perms
            table = d.address >> PAGE_SHIFT
            level = d.next_level
            continue
        if d.kind == EntryKind.TABLE:  # a table pointer where none can be: the format said so
            d = Decoded(EntryKind.MALFORMED, raw, level, problem=f"table pointer at level {level}")
        if d.kind != EntryKind.LEAF:
            return WalkResult(d, level, where, Perm.NONE, 0, tuple(visited))
        perms = (perms if fmt.hierarchical_perms else root_perms) & d.perms
        size_mask = (1 << d.page_shift) - 1
        out = (d.address & ~size_mask) | (daddr & size_mask)
        return WalkResult(d, level, where, perms, out, tuple(visited))


@dataclass(frozen=True, slots=True)
class Mapping:
    """A run of translations: ``pages`` 4 KiB frames from ``dfn`` map to ``mfn`` onwards."""

    dfn: int
    mfn: int
    pages: int
    perms: Perm
    page_shift: int  # size of the leaves this run is made of

    @property
    def dfn_end(self) -> int:
        return self.dfn + self.pages


def walk_tables(
    reader: FrameReader,
    fmt: PageTableFormat,
    root_mfn: int,
    levels: int,
    *,
    root_pages: int = 1,
    max_tables: int = 1 << 20,
    root_perms: Perm = Perm.RW,
) -> Iterator[tuple[int, int, int, U64Array, Perm]]:
    """Every table of the tree, depth first: (frame, level, first dfn it covers, words, inherited perms).

    ``root_perms`` is what the tree may grant at most (see ``walk``); it is inherited by every table.
    """
    seen = 0
    # stack items: (frame, level, first dfn, ancestors, perms inherited from above)
    stack: list[tuple[int, int, int, frozenset[int], Perm]] = [
        (root_mfn + r, levels, r << (9 * levels), frozenset(), root_perms) for r in reversed(range(root_pages))
    ]
    while stack:
        frame, level, base, ancestors, inherited = stack.pop()
        seen += 1
        if seen > max_tables:
            raise TableWalkError(
                f"more than {max_tables} tables reachable from root {root_mfn << PAGE_SHIFT:#x}: "
                f"shared or looping tables (last one at {frame << PAGE_SHIFT:#x})"
            )
        try:
            words = reader.peek_words(frame)
        except BadAddress as exc:
            raise TableWalkError(
                f"level-{level} table at {frame << PAGE_SHIFT:#x} is outside memory: {exc.message}"
            ) from None
        yield frame, level, base, words, inherited
        if level == 1:
            continue
        present = np.nonzero(fmt.present_array(words))[0]
        span = 9 * (level - 1)
        children = []
        for i in present:
            d = fmt.decode(int(words[i]), level)
            if d.kind != EntryKind.TABLE:
                continue
            child = d.address >> PAGE_SHIFT
            if child == frame or child in ancestors:
                raise TableWalkError(
                    f"table loop: entry {int(i)} of the level-{level} table at {frame << PAGE_SHIFT:#x} "
                    f"points back to the table at {child << PAGE_SHIFT:#x}"
                )
            if not 1 <= d.next_level < level:
                raise TableWalkError(
                    f"entry {int(i)} of the level-{level} table at {frame << PAGE_SHIFT:#x} "
                    f"points to a level-{d.next_level} table"
                )
            perms = (inherited & d.perms) if fmt.hierarchical_perms else inherited
            children.append((child, d.next_level, base + (int(i) << span), ancestors | {frame}, perms))
        stack.extend(reversed(children))


def mappings(
    reader: FrameReader,
    fmt: PageTableFormat,
    root_mfn: int,
    levels: int,
    *,
    root_pages: int = 1,
    max_tables: int = 1 << 20,
    problems: list[str] | None = None,
    root_perms: Perm = Perm.RW,
) -> list[Mapping]:
    """Every translation of the tree, coalesced into runs of contiguous, same-permission frames.

    A malformed entry raises ``TableWalkError``, unless ``problems`` is given: then it is described there
    and skipped (the hardware would fault on the addresses it covers).
    """
    runs: list[Mapping] = []
    for frame, level, base, words, inherited in walk_tables(
        reader, fmt, root_mfn, levels, root_pages=root_pages, max_tables=max_tables, root_perms=root_perms
    ):
        present = fmt.present_array(words)
        if level > 1:
            present &= ~fmt.table_array(words, level)
        if not present.any():
            continue
        bad = present & fmt.malformed_array(words, level)
        if bad.any():
            for i in np.nonzero(bad)[0]:
                d = fmt.decode(int(words[i]), level)
                msg = f"malformed entry {d.raw:#018x} at {(frame << PAGE_SHIFT) | (int(i) << 3):#x}: {d.problem}"
                if problems is None:
                    raise TableWalkError(msg)
                problems.append(msg)
            present &= ~bad
        idx = np.nonzero(present)[0]
        if idx.size == 0:
            continue
        span = 9 * (level - 1)
        raws = words[idx]
        dfns = base + (idx.astype(np.int64) << span)
        shifts = fmt.leaf_shift_array(raws, level).astype(np.int64)
        size_mask = (np.int64(1) << shifts) - 1
        addrs = fmt.address_array(raws).astype(np.int64)
        outs = ((addrs & ~size_mask) | ((dfns << PAGE_SHIFT) & size_mask)) >> PAGE_SHIFT
        _coalesce_into(runs, dfns, outs, fmt.perms_array(raws, level), shifts, inherited, 1 << span)
    # tables are visited depth first, so a superpage can come before the smaller pages just below it
    runs.sort(key=lambda m: m.dfn)
    merged: list[Mapping] = []
    for m in runs:
        _append(merged, m)
    return merged


def _coalesce_into(
    runs: list[Mapping],
    dfns: npt.NDArray[np.int64],
    outs: npt.NDArray[np.int64],
    perms: npt.NDArray[np.uint8],
    shifts: npt.NDArray[np.int64],
    inherited: Perm,
    pages_each: int,
) -> None:
    if inherited != Perm.RW:
        perms = perms & np.uint8(inherited)
    brk = np.ones(dfns.shape, dtype=bool)
    brk[1:] = (
        (dfns[1:] != dfns[:-1] + pages_each)
        | (outs[1:] != outs[:-1] + pages_each)
        | (perms[1:] != perms[:-1])
        | (shifts[1:] != shifts[:-1])
    )
    starts = np.nonzero(brk)[0]
    ends = np.append(starts[1:], dfns.size)
    for s, e in zip(starts, ends, strict=True):
        run = Mapping(int(dfns[s]), int(outs[s]), int(e - s) * pages_each, Perm(int(perms[s])), int(shifts[s]))
        _append(runs, run)


def _append(runs: list[Mapping], m: Mapping) -> None:
    if runs:
        last = runs[-1]
        if (
            last.dfn_end == m.dfn
            and last.mfn + last.pages == m.mfn
            and last.perms == m.perms
            and last.page_shift == m.page_shift
        ):
            runs[-1] = Mapping(last.dfn, last.mfn, last.pages + m.pages, last.perms, last.page_shift)
            return
    runs.append(m)
