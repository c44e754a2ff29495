"""The SMMU's side of the fast batch engine: the stage-2 walk over arrays, from any start level.

A plan exists when the stream reaches a translating stage-2 context bank without a global fault or a
bypass (the stream match registers, S2CR, CBAR and SCTLR.M say so) and the bank's TCR describes a walk;
the root may be 2..16 concatenated tables.  Addresses beyond the input size, and everything the walk
refuses (invalid or reserved descriptors, level-0 blocks, addresses beyond the output size, AF = 0 with
AFFD = 0), are answered by ``translate``, which records the context fault.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from iommusim.frames import PAGE_SHIFT
from iommusim.hw.fastbatch import PERMS, BatchPlan, BoolArray, U8Array, U64Array, bump, swap_attrs
from iommusim.hw.fastwalk import LEAF, POINTER, STOP, Step, VecWalk, WalkRoot, walk_many
from iommusim.hw.iotlb import Iotlb, IotlbEntry
from iommusim.pagetable.arm_s2 import AF, LEAF_RES0, OA_HIGH_MASK, OA_MASK, TABLE_BIT, TABLE_RES0, VALID, S2Geometry
from iommusim.pagetable.format import level_shift

if TYPE_CHECKING:
    from iommusim.hw.smmu.unit import SmmuV2

__all__ = ["S2Decoder", "SmmuPlan", "bypassing_caches"]

_U = np.uint64


class S2Decoder:
    """Stage-2 descriptors as ``walk_stage2`` reads them, over arrays (our level numbering)."""

    def __init__(self, max_mfn: int, oas_bits: int, affd: bool) -> None:
        self.max_mfn = _U(max_mfn)
        self.oa_limit = _U(min(1 << oas_bits, (1 << 64) - 1))
        self.affd = affd

    def readable(self, mfns: U64Array) -> BoolArray:
        out: BoolArray = mfns <= self.max_mfn
        return out

    def leaf1(self, raw: U64Array, need: int) -> tuple[BoolArray, U64Array, U8Array | None]:
        """A page descriptor without RES0 or high address bits (and with AF unless AFFD)."""
        base = raw & _U(OA_MASK)
        af = 0 if self.affd else AF
        mask = VALID | TABLE_BIT | OA_HIGH_MASK | LEAF_RES0 | af
        want = VALID | TABLE_BIT | af
        good: BoolArray = (raw & _U(mask | need << 6)) == _U(want | need << 6)
        if self.oa_limit < _U(1 << 48):
            good &= base < self.oa_limit
        return good, base, None if need else ((raw >> _U(6)) & _U(3)).astype(np.uint8)

    def step(self, raw: U64Array, level: int) -> Step:
        n = raw.size
        valid = (raw & _U(VALID)) != 0
        table_bit = (raw & _U(TABLE_BIT)) != 0
        addr = raw & _U(OA_MASK)
        in_oa = addr < self.oa_limit
        kind = np.full(n, STOP, dtype=np.int8)
        perms = ((raw >> _U(6)) & _U(3)).astype(np.uint8)
        shift = np.full(n, level_shift(level), dtype=np.uint8)
        if level > 1:
            ptr = valid & table_bit & ((raw & _U(OA_HIGH_MASK | TABLE_RES0)) == 0) & in_oa
            kind[ptr] = POINTER
            perms[ptr] = 3  # stage-2 table descriptors restrict nothing
        if level < 4:
            leaf = valid & (table_bit if level == 1 else ~table_bit)
            low = _U(OA_MASK & ((1 << level_shift(level)) - 1))
            leaf &= ((raw & _U(OA_HIGH_MASK | LEAF_RES0)) == 0) & ((raw & low) == 0) & in_oa
            if not self.affd:
                leaf &= (raw & _U(AF)) != 0
            kind[leaf] = LEAF
        nxt = np.full(n, level - 1, dtype=np.int8)
        return Step(kind, addr >> _U(PAGE_SHIFT), nxt, perms, addr, shift)


class SmmuPlan(BatchPlan):
    def __init__(self, unit: SmmuV2, bank: int, geom: S2Geometry, oas: int, conflict: bool) -> None:
        self.unit = unit
        self.bank = bank
        self.geom = geom
        self.oas = oas
        self.conflict = conflict
        self.iotlb = unit.tlb
        self.counters = unit._counters
        self.tag = self._vmid()
        self.volatile = bool(unit._irq)

    def _vmid(self) -> int:
        from iommusim.hw.smmu import regs

        return regs.Cbar.decode(self.unit._cbars[self.bank].value).vmid

    def exceptional(self, addrs: U64Array, accs: U8Array) -> BoolArray:
        if self.geom.ipa_bits >= 64:
            return np.zeros(addrs.shape, dtype=bool)
        out: BoolArray = addrs >= _U(1 << self.geom.ipa_bits)
        return out

    def walk(self, addrs: U64Array, skip: BoolArray, need: int = 0) -> VecWalk:
        from iommusim.hw.smmu import regs

        u = self.unit
        b = u.banks[self.bank]
        g = self.geom
        table = b.ttbr0.value & ~((g.root_pages << PAGE_SHIFT) - 1)
        affd = bool(b.sctlr.value & regs.Sctlr.AFFD)
        root = WalkRoot(table >> PAGE_SHIFT, 4 - g.start_level, root_index_bits=8 + g.root_pages.bit_length())
        w = walk_many(u.memory, S2Decoder(u.memory.max_mfn, self.oas, affd), root, addrs, skip, need)
        if {12, 21, 30} <= set(self.iotlb.page_shifts):  # every stage-2 leaf size (the usual TLB)
            return w
        held = np.isin(w.shift, np.asarray(self.iotlb.page_shifts, dtype=np.uint8))
        odd = np.flatnonzero(w.ok & ~held)
        if odd.size:  # a size the TLB does not hold: the unit answers (and caches) the 4 KiB piece
            size = _U(1) << w.shift[odd].astype(np.uint64)
            w.base[odd] |= addrs[odd] & (size - _U(1)) & ~_U((1 << PAGE_SHIFT) - 1)
            w.shift[odd] = PAGE_SHIFT
        return w

    def account(self, n: int, walks: int, reads: int) -> None:
        c = self.counters
        bump(c, "translations", n)
        if self.conflict:
            bump(c, "smr_conflict_unpredictable", n)
        bump(c, "walks", walks)
        bump(c, "walk_reads", reads)

    def entry(self, daddr: int, base: int, shift: int, perms: int) -> IotlbEntry:
        if shift not in self.iotlb.page_shifts:  # a size the TLB does not hold: the 4 KiB piece
            base |= daddr & ((1 << shift) - 1) & ~((1 << PAGE_SHIFT) - 1)
            shift = PAGE_SHIFT
        return IotlbEntry(self.tag, daddr >> shift, shift, base, PERMS[perms])


@contextmanager
def bypassing_caches(unit: SmmuV2) -> Iterator[None]:
    """The TLB replaced by an empty one counting elsewhere."""
    tlb = unit.tlb
    yield from swap_attrs(unit, {"tlb": lambda: Iotlb(tlb.capacity, page_shifts=tlb.page_shifts, counters=Counter())})
