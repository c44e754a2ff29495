"""Memory images: physical memory someone else captured, read frame by frame for the table walkers.

Two kinds are understood:

* a **raw** image: the file's byte ``i`` is physical address ``base + i``;
* an **ELF core** (QEMU's ``dump-guest-memory``, kdump/vmcore, or one iommusim wrote): every ``PT_LOAD``
  program header maps file bytes to physical addresses (``p_paddr``); memory beyond ``p_filesz`` up to
  ``p_memsz`` reads as zeros.

Both implement the walker's ``FrameReader`` (``peek_words``).  Reading a frame the image does not contain,
or only partly contains (a truncated file), raises ``ImageError`` naming the physical address, which the
walker reports as a broken table pointer.  Writers for both formats let tests and users produce images of
a simulated machine.
"""

from __future__ import annotations

import bisect
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iommusim.errors import BadAddress
from iommusim.frames import PAGE_SHIFT, PAGE_SIZE
from iommusim.machine.memory import WORDS_PER_FRAME, MachineMemory, U64Array

__all__ = ["ElfImage", "ImageError", "MemoryImage", "RawImage", "open_image", "write_elf", "write_raw"]

_ELF_MAGIC = b"\x7fELF"
_PT_LOAD = 1


class ImageError(BadAddress):
    """The image cannot supply what was asked for (missing, truncated or corrupt)."""


class MemoryImage:
    """Base of the image readers: frame lookup over a read-only byte buffer."""

    def __init__(self, path: Path, data: mmap.mmap | bytes) -> None:
        self.path = path
        self._data = data
        self.frames_read = 0

    def _frame_bytes(self, mfn: int) -> bytes:
        raise NotImplementedError

    def peek_words(self, mfn: int) -> U64Array:
        self.frames_read += 1
        return np.frombuffer(self._frame_bytes(mfn), dtype="<u8").astype(np.uint64)

    def read_u64(self, maddr: int) -> int:
        if maddr & 7:
            raise ImageError(f"unaligned 64-bit read at {maddr:#x}")
        return int(self.peek_words(maddr >> PAGE_SHIFT)[(maddr & (PAGE_SIZE - 1)) >> 3])

    def close(self) -> None:
        if isinstance(self._data, mmap.mmap):
            self._data.close()

    def __enter__(self) -> MemoryImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _map(path: Path) -> mmap.mmap | bytes:
    with path.open("rb") as f:
        size = path.stat().st_size
        if size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class RawImage(MemoryImage):
    """A flat physical-memory file starting at physical address ``base``."""

    def __init__(self, path: str | Path, base: int = 0) -> None:
        p = Path(path)
        super().__init__(p, _map(p))
        if base % PAGE_SIZE:
            raise ImageError(f"raw image base {base:#x} is not page aligned")
        self.base = base
        self.size = len(self._data)

    def _frame_bytes(self, mfn: int) -> bytes:
        addr = mfn << PAGE_SHIFT
        off = addr - self.base
        if off < 0 or off >= self.size:
            raise ImageError(
                f"physical address {addr:#x} is outside the raw image {self.path.name} "
                f"({self.base:#x}..{self.base + self.size:#x})"
            )
        if off + PAGE_SIZE > self.size:
            raise ImageError(f"the raw image {self.path.name} is truncated inside the frame at {addr:#x}")
        return bytes(self._data[off : off + PAGE_SIZE])


@dataclass(frozen=True, slots=True)
class _Segment:
    paddr: int
    filesz: int
    memsz: int
    offset: int


class ElfImage(MemoryImage):
    """An ELF64 little-endian core file whose PT_LOAD headers carry physical addresses."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        super().__init__(p, _map(p))
        self.segments = self._parse()

    def _parse(self) -> list[_Segment]:
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile

        try:
            with self.path.open("rb") as f:
                elf = ELFFile(f)
                if elf.elfclass != 64 or not elf.little_endian:
                    raise ImageError(f"{self.path.name}: only little-endian ELF64 cores are supported")
                segs = []
                for seg in elf.iter_segments():
                    h = seg.header
                    if h["p_type"] != "PT_LOAD":
                        continue
                    s = _Segment(int(h["p_paddr"]), int(h["p_filesz"]), int(h["p_memsz"]), int(h["p_offset"]))
                    if s.offset + s.filesz > len(self._data):
                        raise ImageError(
                            f"{self.path.name}: the PT_LOAD for physical {s.paddr:#x} needs file bytes "
                            f"{s.offset:#x}..{s.offset + s.filesz:#x} but the file ends at {len(self._data):#x}"
                        )
                    segs.append(s)
        except ELFError as exc:
            raise ImageError(f"{self.path.name}: not a usable ELF core ({exc})") from None
        except (struct.error, ValueError, KeyError, OSError) as exc:
            raise ImageError(f"{self.path.name}: corrupt ELF headers ({exc})") from None
        if not segs:
            raise ImageError(f"{self.path.name}: no PT_LOAD segments, so no physical memory")
        segs.sort(key=lambda x: x.paddr)
        self._starts = [x.paddr for x in segs]
        return segs

    def _frame_bytes(self, mfn: int) -> bytes:
        addr = mfn << PAGE_SHIFT
        out = bytearray(PAGE_SIZE)
        covered = 0
        i = max(0, bisect.bisect_right(self._starts, addr) - 1)
        # segments are sorted by start; any that overlap the frame start at or after the one found
        while i < len(self.segments) and self.segments[i].paddr < addr + PAGE_SIZE:
            s = self.segments[i]
            i += 1
            lo, hi = max(addr, s.paddr), min(addr + PAGE_SIZE, s.paddr + s.memsz)
            if lo >= hi:
                continue
            covered += hi - lo
            flo, fhi = lo, min(hi, s.paddr + s.filesz)
            if flo < fhi:
                src = s.offset + (flo - s.paddr)
                out[flo - addr : fhi - addr] = self._data[src : src + (fhi - flo)]
        if covered == 0:
            raise ImageError(f"physical address {addr:#x} is in no PT_LOAD segment of {self.path.name}")
        if covered < PAGE_SIZE:
            raise ImageError(f"the frame at {addr:#x} is only partly present in {self.path.name}")
        return bytes(out)


def open_image(path: str | Path, *, base: int = 0) -> MemoryImage:
    """An ELF core if the file starts with the ELF magic, else a raw image at ``base``."""
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"no such image file: {p}")
    with p.open("rb") as f:
        magic = f.read(4)
    return ElfImage(p) if magic == _ELF_MAGIC else RawImage(p, base)


# -- writers --------------------------------------------------------------------------------------------


def _runs(frames: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for f in frames:
        if runs and runs[-1][0] + runs[-1][1] == f:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((f, 1))
    return runs


def write_raw(memory: MachineMemory, path: str | Path, *, start: int = 0, end: int | None = None) -> int:
    """Write physical memory ``[start, end)`` (default: up to the last backed frame) as a raw image."""
    backed = list(memory.iter_backed())
    if end is None:
        end = ((backed[-1] + 1) << PAGE_SHIFT) if backed else start
    with Path(path).open("wb") as f:
        f.truncate(max(0, end - start))
        for mfn in backed:
            addr = mfn << PAGE_SHIFT
            if start <= addr < end:
                f.seek(addr - start)
                f.write(memory.peek_words(mfn).astype("<u8").tobytes()[: min(PAGE_SIZE, end - addr)])
    return max(0, end - start)


def write_elf(memory: MachineMemory, path: str | Path) -> int:
    """Write every backed frame as an ELF64 core, one PT_LOAD per run of contiguous frames."""
    runs = _runs(list(memory.iter_backed()))
    ehsize, phentsize = 64, 56
    phoff = ehsize
    data_off = phoff + phentsize * len(runs)
    data_off = (data_off + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    # e_ident: magic, ELFCLASS64, ELFDATA2LSB, EV_CURRENT, System V ABI
    ident = _ELF_MAGIC + bytes([2, 1, 1, 0]) + bytes(8)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 4, 62, 1, 0, phoff, 0, 0, ehsize, phentsize, len(runs), 0, 0, 0
    )  # ET_CORE, EM_X86_64 (a core of physical memory; the machine field is informative)
    with Path(path).open("wb") as f:
        f.write(header)
        off = data_off
        for first, count in runs:
            size = count * PAGE_SIZE
            f.write(struct.pack("<IIQQQQQQ", _PT_LOAD, 6, off, 0, first << PAGE_SHIFT, size, size, 0))
            off += size
        f.seek(data_off)
        for first, count in runs:
            for mfn in range(first, first + count):
                f.write(memory.peek_words(mfn).astype("<u8").tobytes())
    return len(runs)


assert WORDS_PER_FRAME * 8 == PAGE_SIZE
