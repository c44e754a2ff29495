"""ReferenceBatch, the definition the fast paths are held to: how it counts replay steps."""

from __future__ import annotations

import numpy as np
from batch_rigs import SID, VtdRig

from iommusim.frames import PAGE_SHIFT
from iommusim.hw.batch import ReferenceBatch


def test_replay_step_before_any_iotlb_lookup_counts_neither_hit_nor_miss() -> None:
    """A unit that counts IOTLB lookups is judged by its counters for every step, even those before its
    first lookup: a fault ahead of the IOTLB (an address beyond the width) is neither a hit nor a miss.
    (It used to be called a miss when it came first, and nothing when it came later.)"""
    for order in ((1 << 60, 0x3000, 0x3008, 1 << 60), (0x3000, 1 << 60, 0x3008, 1 << 60)):
        rig = VtdRig(aw=2, cm=False, sllps=3, nfr=4, handler=False, iotlb=4, pde=2)
        rig.store(*rig.slot(0x3000, 1), (0x77 << PAGE_SHIFT) | 3)
        trace = np.array(order, dtype=np.uint64)
        r = ReferenceBatch(rig.unit).replay(SID, trace, np.ones(4, dtype=np.uint8))
        beyond = trace == np.uint64(1 << 60)
        assert not r.hits[beyond].any() and not r.misses[beyond].any()
        assert r.misses[~beyond].tolist() == [1, 0] and r.hits[~beyond].tolist() == [0, 1]
        assert r.faults[beyond].all() and not r.faults[~beyond].any()
