"""Superpage merging: a table that maps one contiguous, aligned, uniform block becomes a leaf one level up.

Two ways to decide that a table is ready:

* ``mergeable`` (the default) reads the table from memory: every one of its 512 entries is a present
  default-size leaf, entry i maps entry 0's address plus i times the entry size, entry 0's address is
  aligned to the size of the leaf one level up, and all entries carry identical attribute bits;
* ``seed_counter_ready`` is the seed-era Xen's test (quirk ``amd-merge-counter``): a 9-bit counter in
  the PDE's ignored bits counts changed mappings that sit at the right offset from entry 0; the 512th
  such event says "ready" whether or not the table is full, so a never-mapped page can end up mapped.
"""

from __future__ import annotations

import numpy as np

from iommusim.machine.memory import MachineMemory
from iommusim.pagetable.amd import ADDR_MASK, NEXT_LEVEL_MASK, PR, pde_counter, with_pde_counter
from iommusim.pagetable.format import level_shift

__all__ = ["mergeable", "seed_counter_ready"]

_IDX = np.arange(512, dtype=np.uint64)


def mergeable(memory: MachineMemory, table: int, table_level: int) -> tuple[int, int] | None:
    """(base address, attribute bits) of the leaf that can replace the table at ``table_level``, or None."""
    if not memory.load_word(table, 511) & PR or not memory.load_word(table, 0) & PR:
        return None  # the cheap refusal first: tables usually fill from one end
    words = memory.peek_words(table)
    if not np.all(words & np.uint64(PR)):
        return None
    if np.any(words & np.uint64(NEXT_LEVEL_MASK)):
        return None  # a pointer or a NextLevel-7 page among the entries
    addrs = words & np.uint64(ADDR_MASK)
    base = int(addrs[0])
    if base & ((1 << level_shift(table_level + 1)) - 1):
        return None
    step = np.uint64(1 << level_shift(table_level))
    if not np.array_equal(addrs, np.uint64(base) + _IDX * step):
        return None
    attrs = words & ~np.uint64(ADDR_MASK)
    if not np.all(attrs == attrs[0]):
        return None
    return base, int(attrs[0])


def seed_counter_ready(memory: MachineMemory, table: int, merge_level: int, dfn: int, mfn: int) -> bool:
    """Xen's iommu_update_pde_count on the PDE for ``dfn`` in ``table`` (a table at ``merge_level``).

    The PDE's counter goes up by one when the table it points to has an aligned frame in entry 0 and
    ``mfn`` sits at ``dfn``'s offset from it; otherwise it goes back to 0.  At 511 it says ready.
    """
    index = (dfn >> (9 * (merge_level - 1))) & 511
    pde = memory.load_word(table, index)
    child = (pde & ADDR_MASK) >> 12
    first = (memory.load_word(child, 0) & ADDR_MASK) >> 12
    if first == 0:
        return False
    mask = (1 << (9 * (merge_level - 1))) - 1
    if first & mask == 0 and (dfn & mask) | first == mfn:
        count = pde_counter(pde)
        if count == 511:
            return True
        memory.store_word(table, index, with_pde_counter(pde, count + 1))
    else:
        memory.store_word(table, index, with_pde_counter(pde, 0))
    return False
