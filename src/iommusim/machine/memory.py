"""Machine (host-physical) memory: sparse, frame-granular, little-endian.

Only frames that have been written (or explicitly backed) take space.  Backed frames live in large
zero-initialised numpy segments reserved up front, so their pages become resident only when touched and
views of a frame never move.  Each frame is visible as 512 little-endian 64-bit words (for table code) and
as 4096 bytes (for DMA); reading a frame that was never backed yields zeros without backing it.

Raw integers are the currency here, because this is the level of the bus: page-table codecs and hardware
models deal in machine addresses read from entries and registers.  The typed entry points (``frame_words``,
``read``, ``write``) take ``Mfn``/``Maddr`` for callers above that level.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from iommusim.errors import BadAddress, InvalidArgument
from iommusim.frames import PAGE_SHIFT, PAGE_SIZE, Maddr, Mfn, expect_kind

__all__ = ["WORDS_PER_FRAME", "MachineMemory", "U64Array"]

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("iommusim's machine memory assumes a little-endian host")

WORDS_PER_FRAME = PAGE_SIZE // 8
U64Array = npt.NDArray[np.uint64]

#: Frames per backing segment.  A segment is reserved with calloc, so untouched frames cost no RAM.
_SEGMENT_FRAMES = 1 << 16
_ZERO_FRAME: U64Array = np.zeros(WORDS_PER_FRAME, dtype=np.uint64)
_ZERO_FRAME.setflags(write=False)


class MachineMemory:
    """Host-physical memory of a machine with a given physical address width (up to 64 bits)."""

    def __init__(self, address_width: int = 46) -> None:
        if not 32 <= address_width <= 64:
            raise InvalidArgument(f"address width {address_width} is outside 32..64 bits")
        self.address_width = address_width
        self.limit = 1 << address_width  # first machine address beyond the width
        self.max_mfn = (self.limit >> PAGE_SHIFT) - 1
        self._slot_of: dict[int, int] = {}
        self._segments: list[U64Array] = []
        self._mvs: list[memoryview] = []  # the same segments as memoryviews: 5x faster scalar access
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._index_cache: tuple[U64Array, npt.NDArray[np.int64]] | None = None
        #: Number of frame writes by kind, for tools that want to show traffic.
        self.words_written = 0

    # -- backing ---------------------------------------------------------------------------------

    def _check_mfn(self, mfn: int) -> None:
        if not 0 <= mfn <= self.max_mfn:
            raise BadAddress(f"machine frame {mfn:#x} is beyond the {self.address_width}-bit physical address width")

    def _back(self, mfn: int) -> int:
        slot = self._slot_of.get(mfn)
        if slot is not None:
            return slot
        self._check_mfn(mfn)
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot = self._next_slot
            self._next_slot += 1
            if slot >> 16 >= len(self._segments):
                seg = np.zeros(_SEGMENT_FRAMES * WORDS_PER_FRAME, dtype=np.uint64)
                self._segments.append(seg)
                self._mvs.append(memoryview(seg.data).cast("B").cast("Q"))
        self._slot_of[mfn] = slot
        self._index_cache = None
        return slot

    def _view(self, slot: int) -> U64Array:
        seg = self._segments[slot >> 16]
        base = (slot & (_SEGMENT_FRAMES - 1)) * WORDS_PER_FRAME
        return seg[base : base + WORDS_PER_FRAME]

    def is_backed(self, mfn: int) -> bool:
        return mfn in self._slot_of

    def back(self, mfn: int) -> None:
        """Give a frame storage now (reads as zeros until written)."""
        self._back(mfn)

    def release(self, mfn: int) -> None:
        """Drop a frame's storage; it reads as zeros afterwards.  Used when a page is freed."""
        slot = self._slot_of.pop(mfn, None)
        if slot is None:
            return
        self._view(slot)[:] = 0
        self._free_slots.append(slot)
        self._index_cache = None

    def back_many(self, mfns: list[int]) -> None:
        """Back several frames at once (bulk table allocation); same slots as backing them one by one."""
        back = self._back
        for mfn in mfns:
            back(mfn)

    def frame_block(self, mfns: list[int]) -> U64Array | None:
        """A writable (len, 512) view of backed frames whose storage slots are consecutive, else None.

        Frames allocated one after the other get consecutive slots, so the bulk map writes the leaf tables
        of a whole range with one numpy assignment instead of one per frame.
        """
        if not mfns:
            return None
        slot_of = self._slot_of
        first = slot_of.get(mfns[0])
        if first is None or (first & (_SEGMENT_FRAMES - 1)) + len(mfns) > _SEGMENT_FRAMES:
            return None
        for i, mfn in enumerate(mfns):
            if slot_of.get(mfn) != first + i:
                return None
        seg = self._segments[first >> 16]
        base = (first & (_SEGMENT_FRAMES - 1)) * WORDS_PER_FRAME
        return seg[base : base + len(mfns) * WORDS_PER_FRAME].reshape(len(mfns), WORDS_PER_FRAME)

    @property
    def backed_frames(self) -> int:
        return len(self._slot_of)

    def iter_backed(self) -> Iterator[int]:
        """Backed frame numbers in ascending order."""
        return iter(sorted(self._slot_of))

    def backing_bytes(self) -> int:
        """Bytes of frame storage in use (backed frames times the page size)."""
        return len(self._slot_of) * PAGE_SIZE

    # -- raw word access (the bus) -----------------------------------------------------------------

    def words(self, mfn: int) -> U64Array:
        """Writable view of a frame's 512 words, backing it if needed.  The view stays valid."""
        slot = self._slot_of.get(mfn)
        if slot is None:
            slot = self._back(mfn)
        return self._view(slot)

    def peek_words(self, mfn: int) -> U64Array:
        """Read-only view of a frame's words; an unbacked frame reads as zeros and stays unbacked."""
        slot = self._slot_of.get(mfn)
        if slot is None:
            self._check_mfn(mfn)
            return _ZERO_FRAME
        return self._view(slot)

    def load_word(self, mfn: int, index: int) -> int:
        slot = self._slot_of.get(mfn)
        if slot is None:
            self._check_mfn(mfn)
            return 0
        value: int = self._mvs[slot >> 16][((slot & 0xFFFF) << 9) | index]
        return value

    def store_word(self, mfn: int, index: int, value: int) -> None:
        slot = self._slot_of.get(mfn)
        if slot is None:
            slot = self._back(mfn)
        self._mvs[slot >> 16][((slot & 0xFFFF) << 9) | index] = value
        self.words_written += 1

    def read_u64(self, maddr: int) -> int:
        if maddr & 7:
            raise BadAddress(f"unaligned 64-bit read at {maddr:#x}")
        self._check_addr(maddr, 8)
        return self.load_word(maddr >> PAGE_SHIFT, (maddr & (PAGE_SIZE - 1)) >> 3)

    def write_u64(self, maddr: int, value: int) -> None:
        if maddr & 7:
            raise BadAddress(f"unaligned 64-bit write at {maddr:#x}")
        self._check_addr(maddr, 8)
        self.store_word(maddr >> PAGE_SHIFT, (maddr & (PAGE_SIZE - 1)) >> 3, value)

    def read_u32(self, maddr: int) -> int:
        if maddr & 3:
            raise BadAddress(f"unaligned 32-bit read at {maddr:#x}")
        word = self.read_u64(maddr & ~7)
        return (word >> (32 if maddr & 4 else 0)) & 0xFFFF_FFFF

    def write_u32(self, maddr: int, value: int) -> None:
        if maddr & 3:
            raise BadAddress(f"unaligned 32-bit write at {maddr:#x}")
        shift = 32 if maddr & 4 else 0
        old = self.read_u64(maddr & ~7)
        self.write_u64(maddr & ~7, (old & ~(0xFFFF_FFFF << shift)) | ((value & 0xFFFF_FFFF) << shift))

    def _check_addr(self, maddr: int, length: int) -> None:
        if maddr < 0 or maddr + length > self.limit:
            raise BadAddress(
                f"machine address range {maddr:#x}+{length:#x} is beyond the "
                f"{self.address_width}-bit physical address width"
            )

    # -- byte access (DMA and images) ----------------------------------------------------------------

    def read_bytes(self, maddr: int, length: int) -> bytes:
        self._check_addr(maddr, length)
        out = bytearray()
        while length > 0:
            mfn, off = maddr >> PAGE_SHIFT, maddr & (PAGE_SIZE - 1)
            n = min(length, PAGE_SIZE - off)
            out += self.peek_words(mfn).view(np.uint8)[off : off + n].tobytes()
            maddr += n
            length -= n
        return bytes(out)

    def write_bytes(self, maddr: int, data: bytes | bytearray | memoryview) -> None:
        self._check_addr(maddr, len(data))
        src = memoryview(data).cast("B")
        pos = 0
        while pos < len(src):
            mfn, off = maddr >> PAGE_SHIFT, maddr & (PAGE_SIZE - 1)
            n = min(len(src) - pos, PAGE_SIZE - off)
            self.words(mfn).view(np.uint8)[off : off + n] = np.frombuffer(src[pos : pos + n], dtype=np.uint8)
            maddr += n
            pos += n

    # -- typed entry points ---------------------------------------------------------------------------

    def frame_words(self, mfn: Mfn) -> U64Array:
        """The frame as 512 little-endian 64-bit words (writable view; backs the frame)."""
        return self.words(expect_kind(Mfn, mfn, "mfn").value)

    def frame_bytes(self, mfn: Mfn) -> memoryview:
        """The frame as 4096 bytes (writable view; backs the frame)."""
        return memoryview(self.words(expect_kind(Mfn, mfn, "mfn").value).view(np.uint8).data)

    def read(self, maddr: Maddr, length: int) -> bytes:
        return self.read_bytes(expect_kind(Maddr, maddr, "maddr").value, length)

    def write(self, maddr: Maddr, data: bytes | bytearray | memoryview) -> None:
        self.write_bytes(expect_kind(Maddr, maddr, "maddr").value, data)

    # -- vectorised access (batched walks) --------------------------------------------------------------

    def _index(self) -> tuple[U64Array, npt.NDArray[np.int64]]:
        if self._index_cache is None:
            mfns = np.fromiter(self._slot_of.keys(), dtype=np.uint64, count=len(self._slot_of))
            slots = np.fromiter(self._slot_of.values(), dtype=np.int64, count=len(self._slot_of))
            order = np.argsort(mfns)
            self._index_cache = (mfns[order], slots[order])
        return self._index_cache

    def gather(self, mfns: U64Array, indexes: npt.NDArray[np.integer]) -> U64Array:
        """Word ``indexes[i]`` of frame ``mfns[i]`` for every i; unbacked frames read as zeros."""
        mfns = np.asarray(mfns, dtype=np.uint64)
        out = np.zeros(mfns.shape, dtype=np.uint64)
        if mfns.size == 0 or not self._slot_of:
            return out
        keys, slots = self._index()
        pos = np.searchsorted(keys, mfns)
        pos_clipped = np.minimum(pos, len(keys) - 1)
        hit = keys[pos_clipped] == mfns
        if not hit.any():
            return out
        hit_slots = slots[pos_clipped[hit]]
        hit_idx = np.asarray(indexes, dtype=np.int64)
        hit_idx = np.broadcast_to(hit_idx, mfns.shape)[hit]
        seg_of = hit_slots >> 16
        flat = ((hit_slots & (_SEGMENT_FRAMES - 1)) << 9) | hit_idx
        vals = np.empty(hit_slots.shape, dtype=np.uint64)
        for seg in np.unique(seg_of):
            sel = seg_of == seg
            vals[sel] = self._segments[int(seg)][flat[sel]]
        out[hit] = vals
        return out

    # -- slot-addressed gathers (batched walks that read the same tables many times) ------------------

    def frame_slots(self, mfns: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """The storage slot of each frame of ``mfns``, -1 where the frame is not backed (reads as zeros).

        A batched walk looks its few table frames up once and then reads many words of each by slot.
        """
        m = np.asarray(mfns, dtype=np.uint64)
        out = np.full(m.shape, -1, dtype=np.int64)
        if m.size == 0 or not self._slot_of:
            return out
        keys, slots = self._index()
        pos = np.minimum(np.searchsorted(keys, m), len(keys) - 1)
        hit = keys[pos] == m
        out[hit] = slots[pos[hit]]
        return out

    def gather_slots(self, slots: npt.NDArray[np.int64], indexes: npt.NDArray[np.integer]) -> U64Array:
        """Word ``indexes[i]`` of the frame in slot ``slots[i]``; a negative slot reads as zero."""
        slots = np.asarray(slots, dtype=np.int64)
        idx = np.asarray(indexes, dtype=np.int64)
        if slots.size == 0:
            return np.zeros(slots.shape, dtype=np.uint64)
        lo, hi = int(slots.min()), int(slots.max())
        if lo >= 0 and hi < _SEGMENT_FRAMES:  # the common case: every frame in the first segment
            out: U64Array = self._segments[0][(slots << 9) | idx]
            return out
        out = np.zeros(slots.shape, dtype=np.uint64)
        seg_of = slots >> 16
        for seg in np.unique(seg_of[slots >= 0]).tolist():
            sel = (seg_of == seg) & (slots >= 0)
            out[sel] = self._segments[seg][((slots[sel] & (_SEGMENT_FRAMES - 1)) << 9) | idx[sel]]
        return out

    def gather_flat(self, flat: npt.NDArray[np.int64]) -> U64Array:
        """Words at flat positions ``slot << 9 | index`` (every slot backed): a walk's per-address read."""
        flat = np.asarray(flat, dtype=np.int64)
        if flat.size == 0:
            return np.zeros(flat.shape, dtype=np.uint64)
        if int(flat.max()) < _SEGMENT_FRAMES * WORDS_PER_FRAME:
            out: U64Array = self._segments[0][flat]
            return out
        return self.gather_slots(flat >> 9, flat & (WORDS_PER_FRAME - 1))
