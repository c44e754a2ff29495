"""Trees read back from memory: leaves of pages larger than their slot, and trees capped by their root.

Regression: ``build_tree`` took a NextLevel-7 entry's address field (which carries the page size in its low
bits) as the frame, and counted each replica of the page as a whole page, so a 16 KiB page replicated in
four level-1 slots was shown as four overlapping 16 KiB pages at the wrong frame.
"""

from __future__ import annotations

from iommusim.machine import Machine
from iommusim.pagetable.amd import AmdV1Format
from iommusim.perms import Perm
from iommusim.tools.tables import TableRoot, build_tree, table_mappings

F = AmdV1Format()


def _tree() -> tuple[Machine, TableRoot]:
    m = Machine(ram_bytes=64 << 20)
    l2 = m.allocator.alloc("t").value
    l1 = m.allocator.alloc("t").value
    m.memory.store_word(l2, 0, F.table_entry(l1 << 12, 2))
    # a 16 KiB page at 0x10_0000 (frames 0x100-0x103) in level-1 slots 4-7: address field 0x10_1000 (bit 12
    # set marks 16 KiB), so every replica reads 0x10_1000 and slot k lands on frame 0x100 + (k - 4)
    for k in range(4, 8):
        m.memory.store_word(l1, k, F.sized_leaf(0x10_0000, 14, Perm.RW))
    # a 4 MiB page at 0x40_0000 in level-2 slots 2-3 (dfn 0x400-0x7ff): address field 0x40_0000 | 0x1F_F000
    for k in (2, 3):
        m.memory.store_word(l2, k, F.sized_leaf(0x40_0000, 22, Perm.R))
    return m, TableRoot(F, l2, 2)


def test_replicated_pages_show_each_slot_where_it_lands() -> None:
    m, root = _tree()
    tree = build_tree(m.memory, root)
    (top,) = tree.tops
    (big,) = top.leaves
    assert (big.dfn, big.mfn, big.pages, big.page_shift, big.perms) == (0x400, 0x400, 1024, 22, Perm.R)
    (small,) = top.children[0].leaves
    assert (small.dfn, small.mfn, small.pages, small.page_shift) == (4, 0x100, 4, 14)
    assert small.describe() == "[4-7] dfn 0x4-0x7 -> mfn 0x100-0x103 rw 16K in 4 slots"
    # the tree and the mapping list say the same
    runs = table_mappings(m.memory, root)
    assert [(r.dfn, r.mfn, r.pages) for r in runs] == [(4, 0x100, 4), (0x400, 0x400, 1024)]


def test_a_capped_root_caps_leaves_and_mappings() -> None:
    m, root = _tree()
    capped = TableRoot(root.fmt, root.root_mfn, root.levels, perms=Perm.W)
    assert capped.key != root.key and "capped at -w" in capped.describe()
    runs = table_mappings(m.memory, capped)
    assert [r.perms for r in runs] == [Perm.W, Perm.NONE]  # rw & w, r & w
    (top,) = build_tree(m.memory, capped).tops
    assert top.leaves[0].perms == Perm.NONE and top.children[0].leaves[0].perms == Perm.W
