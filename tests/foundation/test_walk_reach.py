"""The hardware-side walk never folds an address it cannot translate onto one it can.

Regression tests: ``walk`` used to take the root index modulo the root table's size, so an address beyond
the tree's reach translated like a lower one, and a pointer that skips levels (AMD v1) ignored the address
bits of the skipped levels, which the hardware requires to be zero.  Both now translate to nothing.
"""

from __future__ import annotations

from doubles import ToyFormat
from iommusim.machine import Machine
from iommusim.pagetable.amd import AmdV1Format
from iommusim.pagetable.format import EntryKind
from iommusim.pagetable.radix import RadixTable
from iommusim.pagetable.walk import mappings, walk, walk_tables
from iommusim.perms import Perm

TOY = ToyFormat()
AMD = AmdV1Format()


def test_an_address_beyond_the_reach_of_the_tree_is_not_translated() -> None:
    m = Machine(ram_bytes=64 << 20)
    t = RadixTable(m.memory, m.allocator, TOY, owner="t:pt", levels=2)
    t.set_leaf(3, (0x77 << 12) | TOY.leaf_bits(Perm.RW, 1))
    root = t.root.value  # type: ignore[union-attr]
    # two levels reach 12 + 9 + 9 = 30 bits: dfn 3 is daddr 0x3000, and 0x3000 + 1 GiB used to alias it
    assert walk(m.memory, TOY, root, 2, 0x3000).maddr == 0x77000
    r = walk(m.memory, TOY, root, 2, (1 << 30) + 0x3000)
    assert not r.ok and r.entry.kind == EntryKind.EMPTY and "30 bits" in r.entry.problem
    # two concatenated roots reach one bit more: 1 GiB + 0x3000 indexes the second root page (empty)
    t2 = RadixTable(m.memory, m.allocator, TOY, owner="t:pt", levels=2, root_pages=2)
    t2.set_leaf((1 << 18) + 3, (0x78 << 12) | TOY.leaf_bits(Perm.RW, 1))
    root2 = t2.root.value  # type: ignore[union-attr]
    assert walk(m.memory, TOY, root2, 2, (1 << 30) + 0x3000, root_pages=2).maddr == 0x78000
    assert not walk(m.memory, TOY, root2, 2, (2 << 30) + 0x3000, root_pages=2).ok


def test_a_pointer_that_skips_levels_needs_the_skipped_index_bits_zero() -> None:
    m = Machine(ram_bytes=64 << 20)
    l3 = m.allocator.alloc("t").value
    l1 = m.allocator.alloc("t").value
    # a level-3 PDE (index 0) pointing straight at a level-1 table: NextLevel 1, skipping level 2, whose
    # index is DVA bits 29:21.  Slot 5 of the level-1 table maps dfn 5 (daddr 0x5000) -> mfn 0x90.
    m.memory.store_word(l3, 0, AMD.pointer_entry(l1 << 12, 1))
    m.memory.store_word(l1, 5, (0x90 << 12) | AMD.leaf_bits(Perm.RW, 1))
    assert walk(m.memory, AMD, l3, 3, 0x5123).maddr == 0x90123
    # 0x5123 + 2 MiB sets bit 21, a bit of the skipped level's index: the hardware faults
    r = walk(m.memory, AMD, l3, 3, 0x20_5123)
    assert not r.ok and "skipped" in r.entry.problem and r.entry_maddr == l3 << 12
    # the mapping list agrees: the level-1 table covers dfn 0-511 only
    (run,) = mappings(m.memory, AMD, l3, 3)
    assert (run.dfn, run.mfn, run.pages) == (5, 0x90, 1)


def test_root_perms_cap_every_translation() -> None:
    m = Machine(ram_bytes=64 << 20)
    t = RadixTable(m.memory, m.allocator, AMD, owner="t:pt", levels=2)
    t.set_leaf(3, (0x77 << 12) | AMD.leaf_bits(Perm.RW, 1))
    root = t.root.value  # type: ignore[union-attr]
    assert walk(m.memory, AMD, root, 2, 0x3000, root_perms=Perm.R).perms == Perm.R
    (run,) = mappings(m.memory, AMD, root, 2, root_perms=Perm.R)
    assert run.perms == Perm.R
    assert all(p == Perm.W for *_, p in walk_tables(m.memory, AMD, root, 2, root_perms=Perm.W))
    # a format whose table entries grant nothing by themselves is capped the same way
    toy = RadixTable(m.memory, m.allocator, TOY, owner="t:pt", levels=2)
    toy.set_leaf(3, (0x77 << 12) | TOY.leaf_bits(Perm.RW, 1))
    assert walk(m.memory, TOY, toy.root.value, 2, 0x3000, root_perms=Perm.R).perms == Perm.R  # type: ignore[union-attr]
