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
    """The walk of every address: ``ok`` where it reached a leaf the access may use."""

    ok: BoolArray
    base: U64Array
    shift: U8Array
    perms: U8Array
    reads: U8Array
    #: the level-1 table reached through a level-2 pointer (VT-d's paging-structure cache), else all ones
    l1_mfn: U64Array
    #: rights ANDed over the levels down to that level-2 pointer
    l1_perms: U8Array


_NO_TABLE = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def _index_at(keys: U64Array, level: int, root: WalkRoot, mfn: U64Array) -> tuple[U64Array, I64Array]:
    """(table frame, entry index) that keys of 2 MiB regions read at ``level`` (level >= 2)."""
    bits = root.root_index_bits if level == root.level else 9
    index = (keys >> np.uint64(9 * (level - 2))) & np.uint64((1 << bits) - 1)
    if bits > 9:
        mfn = mfn + (index >> np.uint64(9))
        index = index & np.uint64(511)
    return mfn, index.astype(np.int64)


def walk_many(memory: MachineMemory, dec: LevelDecoder, root: WalkRoot, addrs: U64Array, skip: BoolArray) -> VecWalk:
    """Walk every address of ``addrs`` (those with ``skip`` set are left not ok without being walked)."""
    n = addrs.size
    ok = ~skip
    base = np.zeros(n, dtype=np.uint64)
    shift = np.zeros(n, dtype=np.uint8)
    perms = np.zeros(n, dtype=np.uint8)
    reads = np.zeros(n, dtype=np.uint8)
    l1_mfn = np.full(n, _NO_TABLE, dtype=np.uint64)
    l1_perms = np.zeros(n, dtype=np.uint8)
    out = VecWalk(ok, base, shift, perms, reads, l1_mfn, l1_perms)
    if n == 0 or not ok.any():
        return out
    if root.level < 2:
        k_mfn = np.full(1, root.mfn, dtype=np.uint64)
        k_perms = np.full(1, root.perms, dtype=np.uint8)
        inv = np.zeros(n, dtype=np.int64)
        k_state = np.zeros(1, dtype=np.int8)
        k_level = np.ones(1, dtype=np.int8)
        k_reads = np.zeros(1, dtype=np.uint8)
        k_base = np.zeros(1, dtype=np.uint64)
        k_shift = np.zeros(1, dtype=np.uint8)
        k_l1 = np.full(1, _NO_TABLE, dtype=np.uint64)
        k_l1p = np.zeros(1, dtype=np.uint8)
    else:
        regions = addrs >> np.uint64(_REGION_SHIFT)
        live = regions[ok]
        lo, hi = int(live.min()), int(live.max())
        if hi - lo < max(1 << 16, n):
            keys = np.arange(lo, hi + 1, dtype=np.uint64)
            inv = (regions - np.uint64(lo)).astype(np.int64)
            inv[~ok] = 0
        else:
            keys, inv_ok = np.unique(live, return_inverse=True)
            inv = np.zeros(n, dtype=np.int64)
            inv[ok] = inv_ok
        k = keys.size
        k_mfn = np.full(k, root.mfn, dtype=np.uint64)
        k_perms = np.full(k, root.perms, dtype=np.uint8)
        k_state = np.zeros(k, dtype=np.int8)  # POINTER: still walking; LEAF: done; STOP: refused
        k_level = np.full(k, root.level, dtype=np.int8)
        k_reads = np.zeros(k, dtype=np.uint8)
        k_base = np.zeros(k, dtype=np.uint64)
        k_shift = np.zeros(k, dtype=np.uint8)
        k_l1 = np.full(k, _NO_TABLE, dtype=np.uint64)
        k_l1p = np.zeros(k, dtype=np.uint8)
        for level in range(root.level, 1, -1):
            act = np.flatnonzero((k_state == POINTER) & (k_level == level))
            if act.size == 0:
                continue
            mfn, index = _index_at(keys[act], level, root, k_mfn[act])
            readable = dec.readable(mfn)
            k_state[act[~readable]] = STOP
            act, mfn, index = act[readable], mfn[readable], index[readable]
            raw = memory.gather_slots(memory.frame_slots(mfn), index)
            k_reads[act] += 1
            st = dec.step(raw, level)
            k_perms[act] &= st.perms
            kind = st.kind
            if root.skips:
                skipped = (kind == POINTER) & (st.next_level < level - 1)
                if skipped.any():
                    # the address bits of every skipped level (all >= bit 21) must be zero
                    nl = st.next_level[skipped].astype(np.uint64)
                    low = np.uint64(12) + np.uint64(9) * nl  # first bit of level nl + 1
                    top = np.uint64(12 + 9 * (level - 1))
                    mask = ((np.uint64(1) << top) - np.uint64(1)) & ~((np.uint64(1) << low) - np.uint64(1))
                    bad = ((keys[act[skipped]] << np.uint64(_REGION_SHIFT)) & mask) != 0
                    kind = kind.copy()
                    kind[np.flatnonzero(skipped)[bad]] = STOP
            k_state[act] = np.where(kind == POINTER, POINTER, kind)
            ptr = act[kind == POINTER]
            k_mfn[ptr] = st.next_mfn[kind == POINTER]
            k_level[ptr] = st.next_level[kind == POINTER]
            if level == 2:
                k_l1[ptr] = k_mfn[ptr]
                k_l1p[ptr] = k_perms[ptr]
            leaf = kind == LEAF
            k_base[act[leaf]] = st.base[leaf]
            k_shift[act[leaf]] = st.shift[leaf]
    # per address: the level-1 read where the region's walk is still going
    state = k_state[inv]
    ok &= state != STOP
    perms[:] = k_perms[inv]
    reads[:] = k_reads[inv]
    l1_mfn[:] = k_l1[inv]
    l1_perms[:] = k_l1p[inv]
    done = ok & (state == LEAF)
    if done.any():
        base[done] = k_base[inv[done]]
        shift[done] = k_shift[inv[done]]
    walking = ok & (state == POINTER)
    if walking.any():
        all_walking = bool(walking.all())
        sel = slice(None) if all_walking else np.flatnonzero(walking)
        k_ok = dec.readable(k_mfn) & (k_state == POINTER)
        k_slot = np.where(k_ok, memory.frame_slots(k_mfn), -1)
        a = addrs[sel]
        ki = inv[sel]
        raw = memory.gather_slots(k_slot[ki], ((a >> _U12) & np.uint64(511)).astype(np.int64))
        st = dec.step(raw, 1)
        good = (st.kind == LEAF) & k_ok[ki]
        ok[sel] &= good
        perms[sel] &= st.perms
        reads[sel] += np.uint8(1)
        base[sel] = st.base
        shift[sel] = st.shift
    return out
