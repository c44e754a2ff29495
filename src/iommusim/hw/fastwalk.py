"""A table walk over numpy arrays: many device addresses through one tree, level by level, from memory.

The entries a walk reads above level 1 depend only on the address bits from 21 up, so the walk of the
upper levels is made once per 2 MiB region the addresses touch (a dense range of regions when they are
close together, else the distinct ones), and only the level-1 read is made per address.  Each vendor
supplies a ``LevelDecoder`` that turns an array of raw entries at one level into what its scalar walker
would conclude for each: a pointer to a lower table, a leaf, or a stop.

The walk decides *success* only.  Any address whose walk would stop short (not present, reserved bits,
an unreadable table, any encoding the decoder does not accept) is marked not ``ok``; the batch engine then
asks the unit's own ``translate`` about it, so faults are classified and recorded by the one code that
defines them.  A decoder may therefore stop on anything unusual, but must never call ``ok`` a walk its
scalar walker would refuse: the equivalence tests check exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from iommusim.machine.memory import MachineMemory

__all__ = ["LevelDecoder", "Step", "VecWalk", "WalkRoot", "walk_many"]

U64Array = npt.NDArray[np.uint64]
I64Array = npt.NDArray[np.int64]
U8Array = npt.NDArray[np.uint8]
BoolArray = npt.NDArray[np.bool_]

#: Kinds of entry a decoder reports.
POINTER, LEAF, STOP = 0, 1, 2
_REGION_SHIFT = 21
_U12 = np.uint64(12)


@dataclass
class Step:
    """What a level's entries say, one element per entry read."""

    kind: npt.NDArray[np.int8]  # POINTER, LEAF or STOP
    next_mfn: U64Array  # POINTER: frame of the next table
    next_level: npt.NDArray[np.int8]  # POINTER: level of the next table (AMD may skip levels)
    perms: U8Array  # rights this entry grants (ANDed into the walk's)
    base: U64Array  # LEAF: machine address of the page (aligned)
    shift: U8Array  # LEAF: log2 of the page size


class LevelDecoder(Protocol):
    """A vendor's reading of its entries, vectorised (it must agree with its scalar walker)."""

    def readable(self, mfns: U64Array) -> BoolArray:
        """Whether a table in these frames can be read at all (inside DRAM / the address width)."""
        ...

    def step(self, raw: U64Array, level: int) -> Step:
        """Decode entries read at ``level``."""
        ...

    def leaf1(self, raw: U64Array, need: int) -> tuple[BoolArray, U64Array, U8Array | None]:
        """A quick test of level-1 entries: (plain 4 KiB leaf granting ``need``, page address, rights).

        It may refuse entries ``step`` accepts (those get ``step``), never the reverse; with ``need``
        the rights are already checked and come back as None."""
        ...


@dataclass(frozen=True)
class WalkRoot:
    """Where the walk starts: the root table's frame, its level, and (SMMU) concatenated root tables."""

    mfn: int
    level: int
    perms: int = 3
    #: index bits of the root level: 9, or 10..13 when 2..16 root tables are concatenated
    root_index_bits: int = 9
    #: AMD: a pointer may skip levels, whose address bits must then be zero
    skips: bool = False


@dataclass
class VecWalk:
    """The walk of every address: ``ok`` where it reached a leaf (whose rights are ``perms``)."""

    ok: BoolArray
    base: U64Array
    shift: U8Array
    perms: U8Array
    #: per 2 MiB region (indexed through ``inv``): entries read above level 1, and the level-1 table reached
    #: through a level-2 pointer (VT-d's paging-structure cache; all ones if none) with the rights above it
    inv: I64Array
    k_reads: U8Array
    k_l1: U64Array
    k_l1p: U8Array
    #: whether each address read a level-1 entry
    read1: BoolArray

    @property
    def reads(self) -> U8Array:
        out: U8Array = self.k_reads[self.inv] + self.read1.astype(np.uint8)
        return out

    def reads_total(self) -> int:
        """Entries read by the walks of every ``ok`` address (one pass when the regions walked alike)."""
        ok = self.ok
        if self.k_reads.size and int(self.k_reads.min()) == int(self.k_reads.max()):
            n = int(np.count_nonzero(ok))
            return int(self.k_reads[0]) * n + int(np.count_nonzero(self.read1 & ok))
        return int(self.reads[ok].sum(dtype=np.int64))

    @property
    def l1_mfn(self) -> U64Array:
        out: U64Array = self.k_l1[self.inv]
        return out

    @property
    def l1_perms(self) -> U8Array:
        out: U8Array = self.k_l1p[self.inv]
        return out


_NO_TABLE = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_ADDR_BITS = np.int64(511)


def _index_at(keys: U64Array, level: int, root: WalkRoot, mfn: U64Array) -> tuple[U64Array, I64Array]:
    """(table frame, entry index) that keys of 2 MiB regions read at ``level`` (level >= 2)."""
    bits = root.root_index_bits if level == root.level else 9
    index = (keys >> np.uint64(9 * (level - 2))) & np.uint64((1 << bits) - 1)
    if bits > 9:
        mfn = mfn + (index >> np.uint64(9))
        index = index & np.uint64(511)
    return mfn, index.astype(np.int64)


@dataclass
class _Regions:
    """The walk of the levels above 1, once per 2 MiB region (key)."""

    keys: U64Array
    inv: I64Array  # key of each address
    mfn: U64Array  # POINTER: the table to read next
    perms: U8Array
    state: npt.NDArray[np.int8]  # POINTER (still walking), LEAF or STOP
    level: npt.NDArray[np.int8]
    reads: U8Array
    base: U64Array
    shift: U8Array
    l1: U64Array
    l1p: U8Array

    @classmethod
    def start(cls, keys: U64Array, inv: I64Array, root: WalkRoot) -> _Regions:
        k = keys.size
        return cls(
            keys,
            inv,
            np.full(k, root.mfn, dtype=np.uint64),
            np.full(k, root.perms, dtype=np.uint8),
            np.zeros(k, dtype=np.int8),
            np.full(k, root.level, dtype=np.int8),
            np.zeros(k, dtype=np.uint8),
            np.zeros(k, dtype=np.uint64),
            np.zeros(k, dtype=np.uint8),
            np.full(k, _NO_TABLE, dtype=np.uint64),
            np.zeros(k, dtype=np.uint8),
        )


def _regions_of(addrs: U64Array, ok: BoolArray, root: WalkRoot) -> _Regions:
    n = addrs.size
    if root.level < 2:
        return _Regions.start(np.zeros(1, dtype=np.uint64), np.zeros(n, dtype=np.int64), root)
    regions = addrs >> np.uint64(_REGION_SHIFT)
    live = regions if ok.all() else regions[ok]
    lo, hi = int(live.min()), int(live.max())
    if hi - lo < max(1 << 16, n):
        keys = np.arange(lo, hi + 1, dtype=np.uint64)
        regions -= np.uint64(lo)
        inv = regions.view(np.int64)
        if not ok.all():
            inv[~ok] = 0
    else:
        keys, inv_ok = np.unique(live, return_inverse=True)
        inv = np.zeros(n, dtype=np.int64)
        inv[ok] = inv_ok
    return _Regions.start(keys, inv, root)


def _walk_upper(memory: MachineMemory, dec: LevelDecoder, root: WalkRoot, r: _Regions) -> None:
    for level in range(root.level, 1, -1):
        act = np.flatnonzero((r.state == POINTER) & (r.level == level))
        if act.size == 0:
            continue
        mfn, index = _index_at(r.keys[act], level, root, r.mfn[act])
        readable = dec.readable(mfn)
        r.state[act[~readable]] = STOP
        act, mfn, index = act[readable], mfn[readable], index[readable]
        raw = memory.gather_slots(memory.frame_slots(mfn), index)
        r.reads[act] += np.uint8(1)
        st = dec.step(raw, level)
        r.perms[act] &= st.perms
        kind = st.kind
        if root.skips:
            skipped = (kind == POINTER) & (st.next_level < level - 1)
            if skipped.any():
                # the address bits of every skipped level (all >= bit 21) must be zero
                nl = st.next_level[skipped].astype(np.uint64)
                low = np.uint64(12) + np.uint64(9) * nl  # first bit of level nl + 1
                top = np.uint64(12 + 9 * (level - 1))
                mask = ((np.uint64(1) << top) - np.uint64(1)) & ~((np.uint64(1) << low) - np.uint64(1))
                bad = ((r.keys[act[skipped]] << np.uint64(_REGION_SHIFT)) & mask) != 0
                kind = kind.copy()
                kind[np.flatnonzero(skipped)[bad]] = STOP
        r.state[act] = kind
        is_ptr = kind == POINTER
        ptr = act[is_ptr]
        r.mfn[ptr] = st.next_mfn[is_ptr]
        r.level[ptr] = st.next_level[is_ptr]
        if level == 2:
            r.l1[ptr] = r.mfn[ptr]
            r.l1p[ptr] = r.perms[ptr]
        leaf = kind == LEAF
        r.base[act[leaf]] = st.base[leaf]
        r.shift[act[leaf]] = st.shift[leaf]


def walk_many(
    memory: MachineMemory, dec: LevelDecoder, root: WalkRoot, addrs: U64Array, skip: BoolArray, need: int = 0
) -> VecWalk:
    """Walk every address of ``addrs`` (those with ``skip`` set are left not ok without being walked).

    With ``need`` (rights an access needs), ``ok`` also says the leaf grants them (the common case is
    then decided in fewer passes over the arrays)."""
    n = addrs.size
    ok = ~skip
    if n == 0 or not ok.any():
        z8 = np.zeros(n, dtype=np.uint8)
        zi = np.zeros(n, dtype=np.int64)
        one8 = np.zeros(1, dtype=np.uint8)
        return VecWalk(ok, np.zeros(n, np.uint64), z8, z8, zi, one8, np.full(1, _NO_TABLE), one8, ok)
    r = _regions_of(addrs, ok, root)
    _walk_upper(memory, dec, root, r)
    inv = r.inv
    # every region still walking has reached level 1: one read per address there
    k_walking = r.state == POINTER
    k_slot = np.where(k_walking & dec.readable(r.mfn), memory.frame_slots(r.mfn), -1)
    k_ok = k_slot >= 0  # an unbacked table reads as zeros: nothing there is present
    if k_walking.all() and k_ok.all() and (r.perms == 3).all():
        # the common case: every region walked down to a level-1 table granting everything
        walking = ok.copy()
        flat = (k_slot << 9)[inv]
        flat |= addrs.view(np.int64) >> 12 & _ADDR_BITS
        raw = memory.gather_flat(flat)
        good, base, perms1 = dec.leaf1(raw, need)
        shift = np.full(n, 12, dtype=np.uint8)
        perms = perms1 if perms1 is not None else np.full(n, need, dtype=np.uint8)
        rest = np.flatnonzero(ok & ~good)
        if rest.size:  # what the quick test left: decoded in full (a refusal, or a leaf of another size)
            st = dec.step(raw[rest], 1)
            leaf = st.kind == LEAF
            if need:
                leaf &= (st.perms & np.uint8(need)) == need
            good[rest] = leaf
            base[rest] = st.base
            shift[rest] = st.shift
            perms[rest] = st.perms
        ok &= good
        return VecWalk(ok, base, shift, perms, inv, r.reads, r.l1, r.l1p, walking)
    state = r.state[inv]
    walking = ok & (state == POINTER)
    ok &= (state == LEAF) | (walking & k_ok[inv])
    base = r.base[inv]
    shift = r.shift[inv]
    perms = r.perms[inv]
    sel = np.flatnonzero(walking)
    if sel.size:
        ki = inv[sel]
        idx = (addrs[sel] >> _U12 & np.uint64(511)).astype(np.int64)
        raw = memory.gather_slots(np.where(k_ok[ki], k_slot[ki], -1), idx)
        st = dec.step(raw, 1)
        ok[sel] &= st.kind == LEAF
        perms[sel] &= st.perms
        base[sel] = st.base
        shift[sel] = st.shift
    if need:
        ok &= (perms & np.uint8(need)) == need
    return VecWalk(ok, base, shift, perms, inv, r.reads, r.l1, r.l1p, walking)
