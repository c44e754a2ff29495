"""The shared hardware pieces: the LRU IOTLB with exact invalidation, and the MMIO register file."""

from __future__ import annotations

import pytest

from iommusim.errors import BadAddress, InvalidArgument
from iommusim.hw.iotlb import Iotlb, IotlbEntry, LruCache
from iommusim.hw.mmio import Register, RegisterBlock
from iommusim.perms import Perm


def entry(tag: int, daddr: int, shift: int = 12, out: int = 0x100000) -> IotlbEntry:
    return IotlbEntry(tag, daddr >> shift, shift, out, Perm.RW)


def test_lookup_finds_any_page_size_and_counts() -> None:
    t = Iotlb(8)
    t.insert(entry(1, 0x4000))
    t.insert(entry(1, 0x20_0000, 21, 0x4000_0000))
    assert t.lookup(1, 0x4123) is not None
    hit = t.lookup(1, 0x21_2345)
    assert hit is not None and hit.translate(0x21_2345) == 0x4001_2345
    assert t.lookup(2, 0x4000) is None  # other tag
    assert t.counters["iotlb_hits"] == 2 and t.counters["iotlb_misses"] == 1


def test_lru_eviction_order() -> None:
    t = Iotlb(2)
    t.insert(entry(1, 0x1000))
    t.insert(entry(1, 0x2000))
    assert t.lookup(1, 0x1000) is not None  # 0x1000 is now most recent
    t.insert(entry(1, 0x3000))  # evicts 0x2000
    assert t.lookup(1, 0x2000) is None and t.lookup(1, 0x1000) is not None
    assert t.counters["iotlb_evictions"] == 1 and len(t) == 2


def test_invalidation_removes_exactly_what_it_covers() -> None:
    t = Iotlb(64)
    for tag in (1, 2):
        for a in (0x0, 0x1000, 0x5000, 0x40_0000):
            t.insert(entry(tag, a))
    t.insert(entry(1, 0x20_0000, 21))  # 2 MiB page at 2 MiB
    # a 4 KiB range inside the 2 MiB page drops the superpage entry (it overlaps) and nothing else
    assert t.invalidate_range(1, 0x20_3000, 0x1000) == 1
    assert t.lookup(1, 0x20_3000) is None and t.lookup(1, 0x1000) is not None
    # an 8 KiB range at 0 drops two 4 KiB entries of tag 1 only
    assert t.invalidate_range(1, 0, 0x2000) == 2
    assert t.lookup(2, 0) is not None and t.lookup(1, 0x5000) is not None
    # a large range uses the scan path
    assert t.invalidate_range(1, 0, 1 << 30) == 2
    assert t.invalidate_tag(2) == 4 and len(t) == 0
    t.insert(entry(3, 0))
    assert t.invalidate_all() == 1
    c = t.counters
    assert (c["iotlb_inv_page"], c["iotlb_inv_domain"], c["iotlb_inv_global"]) == (3, 1, 1)
    with pytest.raises(InvalidArgument):
        t.invalidate_range(1, 0, 0)


def test_event_recording_and_bad_sizes() -> None:
    t = Iotlb(1, page_shifts=(12,), record=True)
    t.insert(entry(1, 0))
    t.lookup(1, 0)
    t.insert(entry(1, 0x1000))
    assert [e[0] for e in t.events or []] == ["fill", "hit", "evict", "fill"]
    with pytest.raises(InvalidArgument):
        t.insert(entry(1, 0, 21))


def test_lru_cache_generic() -> None:
    c: LruCache[str, int] = LruCache(2, prefix="ctx")
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1
    c.put("c", 3)
    assert "b" not in c and c.counters["ctx_evictions"] == 1 and c.get("zz") is None
    assert c.counters["ctx_misses"] == 1


def test_register_block_masks_w1c_hooks_and_halves() -> None:
    blk = RegisterBlock("unit", 0x100)
    seen: list[int] = []
    blk.add(Register("CTRL", 0x0, 8, reset=0xF0, writable=0x0F))
    blk.add(Register("STS", 0x8, 4, reset=0b101, w1c=0b100))
    blk.add(Register("TAIL", 0x10, 8, writable=~0, on_write=lambda old, new: seen.append(new) or new))
    blk.write(0x0, 0xFF, 8)
    assert blk.read(0x0, 8) == 0xFF  # read-only high nibble kept, low nibble written
    blk.write(0x8, 0b100, 4)
    assert blk.read(0x8, 4) == 0b001  # write-one-to-clear
    blk.write(0x14, 0xABCD, 4)  # upper half of a 64-bit register
    assert blk.read(0x10, 8) == 0xABCD << 32 and seen == [0xABCD << 32]
    with pytest.raises(BadAddress):
        blk.read(0x20, 4)
    with pytest.raises(BadAddress):
        blk.read(0x2, 4)
    blk.set("STS", 0x7)
    assert blk.get("STS") == 0x7 and blk["CTRL"].offset == 0
