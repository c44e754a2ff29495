"""Machine memory: sparse backing, word and byte views, width limits, vectorised gather."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iommusim.errors import BadAddress, InvalidArgument
from iommusim.frames import Maddr, Mfn
from iommusim.machine.memory import WORDS_PER_FRAME, MachineMemory


def test_only_frames_in_use_are_backed() -> None:
    mem = MachineMemory(52)
    assert mem.backed_frames == 0
    assert mem.load_word(0x123456789, 7) == 0  # a read does not back the frame
    assert mem.read_bytes(0x5000, 100) == bytes(100)
    assert mem.backed_frames == 0
    mem.store_word(0x123456789, 7, 0xDEAD)
    assert mem.backed_frames == 1 and mem.is_backed(0x123456789)
    assert mem.load_word(0x123456789, 7) == 0xDEAD
    mem.release(0x123456789)
    assert mem.backed_frames == 0 and mem.load_word(0x123456789, 7) == 0


def test_words_are_little_endian_64_bit() -> None:
    mem = MachineMemory(46)
    words = mem.frame_words(Mfn(3))
    assert words.shape == (WORDS_PER_FRAME,) and words.dtype == np.uint64
    words[1] = 0x0102_0304_0506_0708
    raw = mem.frame_bytes(Mfn(3))
    # word 1 occupies bytes 8..15, least significant byte first
    assert bytes(raw[8:16]) == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert mem.read_u64((3 << 12) + 8) == 0x0102_0304_0506_0708
    assert mem.read_u32((3 << 12) + 12) == 0x0102_0304
    mem.write_u32((3 << 12) + 8, 0xAABBCCDD)
    assert mem.read_u64((3 << 12) + 8) == 0x0102_0304_AABB_CCDD


def test_views_stay_valid_while_more_frames_are_backed() -> None:
    mem = MachineMemory(46)
    words = mem.frame_words(Mfn(10))
    for f in range(11, 11 + 3000):
        mem.store_word(f, 0, f)
    words[5] = 99
    assert mem.load_word(10, 5) == 99
    assert mem.load_word(2000, 0) == 2000


def test_bytes_cross_frame_boundaries() -> None:
    mem = MachineMemory(46)
    data = bytes(range(256)) * 40
    mem.write(Maddr(0x1F80), data)
    assert mem.read(Maddr(0x1F80), len(data)) == data
    assert mem.backed_frames == 4  # 0x1f80 + 10240 bytes spans frames 1..4


def test_address_width_is_enforced() -> None:
    mem = MachineMemory(39)
    mem.store_word((1 << 27) - 1, 0, 1)  # last frame of a 39-bit space
    with pytest.raises(BadAddress, match="39-bit"):
        mem.store_word(1 << 27, 0, 1)
    with pytest.raises(BadAddress):
        mem.read_bytes((1 << 39) - 4, 8)
    with pytest.raises(BadAddress, match="unaligned"):
        mem.read_u64(4)
    with pytest.raises(InvalidArgument):
        MachineMemory(20)
    assert MachineMemory(52).max_mfn == (1 << 40) - 1


def test_typed_entry_points_reject_other_kinds() -> None:
    mem = MachineMemory(46)
    with pytest.raises(TypeError, match="mfn must be a Mfn"):
        mem.frame_words(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="maddr must be a Maddr"):
        mem.read(Mfn(5), 4)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.integers(0, 1 << 30), st.integers(0, (1 << 64) - 1), max_size=60), st.data())
def test_gather_matches_scalar_reads(contents: dict[int, int], data: st.DataObject) -> None:
    mem = MachineMemory(46)
    for mfn, value in contents.items():
        mem.store_word(mfn, mfn % 512, value)
    probes = data.draw(st.lists(st.integers(0, 1 << 30), max_size=50)) + list(contents)
    mfns = np.array(probes, dtype=np.uint64)
    idx = np.array([p % 512 for p in probes], dtype=np.int64)
    got = mem.gather(mfns, idx)
    assert [int(v) for v in got] == [mem.load_word(p, p % 512) for p in probes]
