"""The AMD IOMMU's walk of v1 I/O page tables for one DMA address, from machine memory alone.

The walk starts at the device-table entry's root with the entry's paging mode as the level and applies,
at each entry, the checks in the order the hardware makes them: present, a next level the unit
implements, reserved bits, permission (ANDed over every level, the DTE included), then the leaf or
pointer rules of the format (``iommusim.pagetable.amd``) including skipped levels.  The outcome says
either where the page is, or which IO_PAGE_FAULT flags describe the refusal, or that a table could not be
read at all (a PAGE_TAB_HARDWARE_ERROR).
"""

from __future__ import annotations

from dataclasses import dataclass

from iommusim.errors import BadAddress
from iommusim.frames import PAGE_SHIFT
from iommusim.hw.amd.structs import EventFlag
from iommusim.machine.memory import MachineMemory
from iommusim.pagetable.amd import (
    NL_LEAF,
    NL_SIZED,
    PR,
    EntryProblem,
    beyond_reach_mask,
    entry_problem,
    next_level_of,
    sized_page_shift,
    skipped_bits_mask,
)
from iommusim.pagetable.format import level_shift
from iommusim.perms import Perm

__all__ = ["WalkFault", "WalkHit", "WalkHwError", "WalkOutcome", "walk_v1"]


@dataclass(frozen=True, slots=True)
class WalkHit:
    base: int  # machine address of the page
    page_shift: int
    perms: Perm  # permissions ANDed over the DTE and every entry of the walk
    reads: int  # entries read


@dataclass(frozen=True, slots=True)
class WalkFault:
    """The walk refused the access: an IO_PAGE_FAULT with these flags (RW is added by the caller)."""

    flags: int
    reason: str
    level: int
    reads: int


@dataclass(frozen=True, slots=True)
class WalkHwError:
    """A table could not be read (outside the physical address space): a PAGE_TAB_HARDWARE_ERROR."""

    entry_maddr: int
    reads: int


WalkOutcome = WalkHit | WalkFault | WalkHwError


def walk_v1(
    memory: MachineMemory,
    root: int,
    mode: int,
    daddr: int,
    access: Perm,
    dte_perms: Perm,
    *,
    max_levels: int = 6,
) -> WalkOutcome:
    """Translate ``daddr`` through the tree at machine address ``root`` with ``mode`` levels."""
    if daddr & beyond_reach_mask(mode):
        return WalkFault(0, f"address beyond what {mode} levels translate", mode, 0)
    perms = dte_perms
    table = root >> PAGE_SHIFT
    level = mode
    reads = 0
    pr = int(EventFlag.PR)
    while True:
        index = (daddr >> level_shift(level)) & 511
        try:
            raw = memory.load_word(table, index)
        except BadAddress:
            return WalkHwError((table << PAGE_SHIFT) | (index << 3), reads)
        reads += 1
        if not raw & PR:
            return WalkFault(0, f"level-{level} entry not present", level, reads)
        nl = next_level_of(raw)
        if nl not in (NL_LEAF, NL_SIZED) and nl > max_levels:
            return WalkFault(pr | EventFlag.RZ, f"next level {nl} beyond the unit's {max_levels}", level, reads)
        problem = entry_problem(raw, level)
        if problem == EntryProblem.RESERVED:
            return WalkFault(pr | EventFlag.RZ, f"level-{level} entry {raw:#018x}: reserved bits set", level, reads)
        entry_perms = Perm((raw >> 61) & 3)
        if access & ~entry_perms:
            return WalkFault(pr | EventFlag.PE, f"level-{level} entry denies {access.short()}", level, reads)
        perms &= entry_perms
        if problem is not None:
            return WalkFault(pr, f"level-{level} entry {raw:#018x}: {problem.value}", level, reads)
        if nl == NL_LEAF:
            shift = level_shift(level)
            return WalkHit(raw & ((1 << 52) - 1) & ~((1 << shift) - 1), shift, perms, reads)
        if nl == NL_SIZED:
            shift = sized_page_shift(raw)
            return WalkHit(raw & ((1 << 52) - 1) & ~((1 << shift) - 1), shift, perms, reads)
        if daddr & skipped_bits_mask(level, nl):
            return WalkFault(pr, f"address bits of levels skipped below level {level} are not zero", level, reads)
        table = (raw & ((1 << 52) - 1)) >> PAGE_SHIFT
        level = nl
