"""The radix engine against a plain reference model, with superpages, splits and failure injection."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from doubles import PS, R, ToyFormat, W
from iommusim.errors import BadAddress, FrameRangeError, OutOfMemory
from iommusim.frames import PAGE_SHIFT
from iommusim.machine import Machine
from iommusim.pagetable.format import EntryKind
from iommusim.pagetable.radix import RadixTable
from iommusim.pagetable.walk import TableWalkError, mappings, walk
from iommusim.perms import Perm

FMT = ToyFormat()
LEAF = {lv: FMT.leaf_bits(Perm.RW, lv) for lv in (1, 2, 3)}
LEAF_R = {lv: FMT.leaf_bits(Perm.R, lv) for lv in (1, 2, 3)}


def make(levels: int = 4, root_pages: int = 1) -> tuple[Machine, RadixTable]:
    m = Machine(ram_bytes=256 << 20)
    return m, RadixTable(m.memory, m.allocator, FMT, owner="t:pt", levels=levels, root_pages=root_pages)


def view(m: Machine, t: RadixTable) -> dict[int, tuple[int, Perm]]:
    """dfn -> (mfn, perms) for every mapped page, read back from memory by the hardware-side walker."""
    out: dict[int, tuple[int, Perm]] = {}
    if t.root is None:
        return out
    for run in mappings(m.memory, FMT, t.root.value, t.levels, root_pages=t.root_pages):
        for i in range(run.pages):
            out[run.dfn + i] = (run.mfn + i, run.perms)
    return out


def test_golden_tree_after_one_map() -> None:
    m, t = make()
    ch = t.set_leaf(0x12345, (0xABC << 12) | LEAF[1])
    # dfn 0x12345: level-4 index 0, level-3 index 0, level-2 index 0x12345 >> 9 = 0x91, level-1 index 0x145
    root = t.root.value  # type: ignore[union-attr]
    l3 = m.memory.load_word(root, 0) >> 12
    l2 = m.memory.load_word(l3, 0) >> 12
    l1 = m.memory.load_word(l2, 0x91) >> 12
    assert m.memory.load_word(l1, 0x145) == 0xABC000 | P_RW
    assert m.memory.load_word(root, 0) == (l3 << 12) | 7  # table entries: present, read, write
    assert ch.flush == 1 and ch.tables_allocated == 3 and m.allocator.in_use["t:pt"] == 4


P_RW = 1 | R | W


def test_identical_rewrite_reports_nothing_and_modify_reports_modified() -> None:
    m, t = make()
    raw = (5 << 12) | LEAF[1]
    assert t.set_leaf(7, raw).flush == 1
    assert t.set_leaf(7, raw).flush == 0
    assert t.set_leaf(7, (6 << 12) | LEAF[1]).flush == 3
    assert t.clear_leaf(7).flush == 2
    assert t.clear_leaf(7).flush == 0


def test_superpage_map_split_and_hardware_walk() -> None:
    m, t = make()
    ch = t.map_range(0x200, 0x40000 << 12, 512 * 2 + 3, {1: LEAF[1], 2: LEAF[2]})
    assert ch.flush == 1
    r = walk(m.memory, FMT, t.root.value, 4, (0x200 << 12) + 0x1234)  # type: ignore[union-attr]
    assert r.ok and r.level == 2 and r.entry.page_shift == 21 and r.maddr == (0x40000 << 12) + 0x1234
    before = view(m, t)
    ch = t.map_range(0x201, 0x99 << 12, 1, {1: LEAF_R[1]})  # changes one page inside the first 2 MiB page
    assert ch.split == [(0x200, 2)] and ch.flush == 3
    after = view(m, t)
    assert after[0x201] == (0x99, Perm.R)
    assert {k: v for k, v in after.items() if k != 0x201} == {k: v for k, v in before.items() if k != 0x201}


def test_superpage_over_a_table_hands_the_old_table_back() -> None:
    m, t = make()
    t.map_range(0x400, 0x10 << 12, 5, {1: LEAF[1]})
    old_tables = set(t.table_frames())
    ch = t.map_range(0x400, 0x80000 << 12, 512, {1: LEAF[1], 2: LEAF[2]})
    assert ch.flush & 4 and len(ch.freed_tables) == 1
    assert ch.freed_tables[0] in old_tables and ch.freed_tables[0] not in t.table_frames()
    t.free_frames(ch.freed_tables)
    assert view(m, t)[0x400 + 77] == (0x80000 + 77, Perm.RW)


def test_unmap_reclaim_and_free_all_return_every_page() -> None:
    m, t = make()
    t.map_range(0, 0x1000 << 12, 3000, {1: LEAF[1]})
    kept = t.unmap_range(0, 3000)
    assert kept.freed_tables == [] and view(m, t) == {}
    t.map_range(0, 0x1000 << 12, 3000, {1: LEAF[1]})
    ch = t.unmap_range(0, 1024, reclaim=True)
    assert len(ch.freed_tables) == 2  # the two level-1 tables wholly covered
    t.free_frames(ch.freed_tables)
    remaining = m.allocator.in_use["t:pt"]
    assert t.free_all() == remaining
    assert m.allocator.total_in_use == 0 and t.root is None


def test_concatenated_root() -> None:
    m, t = make(levels=3, root_pages=2)
    top = 1 << 28  # frames reachable with 2 concatenated level-3 roots: 2 * 512**3 = 2**28
    assert t.dfn_limit == top
    t.set_leaf(top - 1, (9 << 12) | LEAF[1])
    assert view(m, t) == {top - 1: (9, Perm.RW)}
    with pytest.raises(FrameRangeError):
        t.set_leaf(top, (9 << 12) | LEAF[1])


def test_allocation_failure_rolls_everything_back() -> None:
    m, t = make()
    t.map_range(0x10, 0x500 << 12, 20, {1: LEAF[1]})
    before_mem = view(m, t)
    before_pages = dict(m.allocator.in_use)
    failures = 0
    for n in range(1, 10):
        m.allocator.fail_nth(n)
        try:
            # crosses a level-3 boundary far from the existing tables: needs 5 new tables
            t.map_range(0xF_FFFF_FF00 - 0x4_0000, 0x600 << 12, 600, {1: LEAF[1]})
        except OutOfMemory:
            failures += 1
            assert view(m, t) == before_mem
            assert dict(m.allocator.in_use) == before_pages
        else:
            break
    m.allocator.clear_failures()
    assert failures == 5


def test_failure_while_allocating_the_root_forgets_it() -> None:
    m, t = make()
    m.allocator.fail_nth(1)
    with pytest.raises(OutOfMemory):
        t.set_leaf(1, (1 << 12) | LEAF[1])
    assert t.root is None and m.allocator.total_in_use == 0
    t.set_leaf(1, (1 << 12) | LEAF[1])
    assert view(m, t) == {1: (1, Perm.RW)}


def test_walk_reports_where_it_stopped() -> None:
    m, t = make()
    t.set_leaf(0x1000, (0x77 << 12) | LEAF[1])
    root = t.root.value  # type: ignore[union-attr]
    # dfn 0x1001 shares every table with 0x1000 and stops at its empty level-1 entry
    r = walk(m.memory, FMT, root, 4, 0x1001 << 12)
    assert not r.ok and r.entry.kind == EntryKind.EMPTY and r.level == 1
    # dfn 1 << 18 has level-3 index 1 (dfn >> 18 & 511): no level-2 table there
    r = walk(m.memory, FMT, root, 4, 1 << 30)
    assert r.entry.kind == EntryKind.EMPTY and r.level == 3
    # dfn 1 << 28 has level-4 index 2 (dfn >> 27)
    r = walk(m.memory, FMT, root, 4, 1 << 40)
    assert r.entry.kind == EntryKind.EMPTY and r.level == 4
    l1 = t.table_for(0x1000)
    assert l1 is not None
    m.memory.store_word(l1.value, 1, (1 << 60) | P_RW)  # a reserved bit in the entry of dfn 0x1001
    r = walk(m.memory, FMT, root, 4, 0x1001 << 12)
    assert r.entry.kind == EntryKind.MALFORMED and r.entry_maddr == (l1.value << 12) + 8
    with pytest.raises(TableWalkError, match="malformed"):
        mappings(m.memory, FMT, root, 4)
    problems: list[str] = []
    assert len(mappings(m.memory, FMT, root, 4, problems=problems)) == 1 and len(problems) == 1


def test_loops_and_explosions_are_errors_not_hangs() -> None:
    m, t = make()
    t.set_leaf(0, (1 << 12) | LEAF[1])
    root = t.root.value  # type: ignore[union-attr]
    m.memory.store_word(root, 5, (root << 12) | P_RW)  # the root points to itself
    with pytest.raises(TableWalkError, match="loop"):
        mappings(m.memory, FMT, root, 4)
    m.memory.store_word(root, 5, 0)
    shared = t.table_for(0, level=3)
    assert shared is not None
    for i in range(1, 512):  # every root entry points at the same level-3 table
        m.memory.store_word(root, i, (shared.value << 12) | P_RW)
    with pytest.raises(TableWalkError, match="more than"):
        mappings(m.memory, FMT, root, 4, max_tables=1000)


def test_malformed_entry_met_while_editing_is_an_error() -> None:
    m, t = make()
    t.set_leaf(0, (1 << 12) | LEAF[1])
    root = t.root.value  # type: ignore[union-attr]
    m.memory.store_word(root, 1, (1 << 61) | P_RW)
    with pytest.raises(BadAddress, match="malformed"):
        t.set_leaf(1 << 27, (1 << 12) | LEAF[1])


class RadixMachine(RuleBasedStateMachine):
    """Random maps, unmaps and allocation failures against a dictionary."""

    def __init__(self) -> None:
        super().__init__()
        self.m, self.t = make(levels=3)
        self.ref: dict[int, tuple[int, Perm]] = {}

    dfns = st.integers(0, (1 << 20) - 1)

    @rule(dfn=dfns, mfn=st.integers(0, 1 << 24), count=st.integers(1, 1200), ro=st.booleans(), sp=st.booleans())
    def map(self, dfn: int, mfn: int, count: int, ro: bool, sp: bool) -> None:
        count = min(count, (1 << 27) - dfn)
        bits = LEAF_R if ro else LEAF
        allowed = {1: bits[1], 2: bits[2]} if sp else {1: bits[1]}
        self.t.map_range(dfn, mfn << PAGE_SHIFT, count, allowed)
        perm = Perm.R if ro else Perm.RW
        for i in range(count):
            self.ref[dfn + i] = (mfn + i, perm)

    @rule(dfn=dfns, count=st.integers(1, 1200), reclaim=st.booleans())
    def unmap(self, dfn: int, count: int, reclaim: bool) -> None:
        ch = self.t.unmap_range(dfn, count, reclaim=reclaim)
        self.t.free_frames(ch.freed_tables)
        for i in range(count):
            self.ref.pop(dfn + i, None)

    @rule(dfn=dfns, mfn=st.integers(0, 1 << 24))
    def set_one(self, dfn: int, mfn: int) -> None:
        ch = self.t.set_leaf(dfn, (mfn << PAGE_SHIFT) | LEAF[1])
        self.t.free_frames(ch.freed_tables)
        self.ref[dfn] = (mfn, Perm.RW)

    @precondition(lambda self: self.ref)
    @rule(n=st.integers(1, 4), dfn=dfns, count=st.integers(1, 2000))
    def failing_map(self, n: int, dfn: int, count: int) -> None:
        before = dict(self.m.allocator.in_use)
        self.m.allocator.fail_nth(n)
        try:
            self.t.map_range(dfn, 0x1234 << PAGE_SHIFT, count, {1: LEAF[1], 2: LEAF[2]})
            for i in range(count):
                self.ref[dfn + i] = (0x1234 + i, Perm.RW)
        except OutOfMemory:
            assert dict(self.m.allocator.in_use) == before
        finally:
            self.m.allocator.clear_failures()

    @invariant()
    def memory_matches_reference(self) -> None:
        assert view(self.m, self.t) == self.ref

    @invariant()
    def every_table_is_reachable(self) -> None:
        assert len(self.t.table_frames()) == self.m.allocator.in_use.get("t:pt", 0)

    def teardown(self) -> None:
        self.t.free_all()
        assert self.m.allocator.total_in_use == 0


TestRadixMachine = RadixMachine.TestCase
TestRadixMachine.settings = settings(max_examples=25, stateful_step_count=15, deadline=None)


def test_ps_bit_is_what_makes_upper_leaves() -> None:
    assert FMT.decode((3 << 21) | 1 | PS, 2).kind == EntryKind.LEAF
    assert FMT.decode((3 << 21) | 1, 2).kind == EntryKind.TABLE
    words = np.array([0, 1 | PS, 1, (1 << 55) | 1], dtype=np.uint64)
    assert list(FMT.table_array(words, 2)) == [False, False, True, True]
