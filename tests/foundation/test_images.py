"""Raw and ELF memory images: written from a machine, read back by the walkers, and broken on purpose."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from doubles import ToyFormat
from iommusim.images import ElfImage, ImageError, RawImage, open_image, write_elf, write_raw
from iommusim.machine import Machine
from iommusim.pagetable.radix import RadixTable
from iommusim.pagetable.walk import TableWalkError, mappings, walk
from iommusim.perms import Perm

FMT = ToyFormat()


@pytest.fixture
def tree() -> tuple[Machine, RadixTable]:
    m = Machine(ram_bytes=64 << 20)
    t = RadixTable(m.memory, m.allocator, FMT, owner="img:pt", levels=4)
    t.map_range(0x100, 0x2000 << 12, 700, {1: FMT.leaf_bits(Perm.RW, 1)})
    t.map_range(0x4_0000, 0x300 << 12, 5, {1: FMT.leaf_bits(Perm.R, 1)})
    return m, t


def test_raw_and_elf_images_decode_like_live_memory(tree: tuple[Machine, RadixTable], tmp_path: Path) -> None:
    m, t = tree
    root = t.root.value  # type: ignore[union-attr]
    live = mappings(m.memory, FMT, root, 4)
    write_raw(m.memory, tmp_path / "mem.raw")
    write_elf(m.memory, tmp_path / "mem.elf")
    for path in ("mem.raw", "mem.elf"):
        with open_image(tmp_path / path) as img:
            assert mappings(img, FMT, root, 4) == live
            assert walk(img, FMT, root, 4, (0x101 << 12) + 5).maddr == (0x2001 << 12) + 5
    assert isinstance(open_image(tmp_path / "mem.elf"), ElfImage)
    assert isinstance(open_image(tmp_path / "mem.raw"), RawImage)


def test_raw_image_with_a_base(tree: tuple[Machine, RadixTable], tmp_path: Path) -> None:
    m, t = tree
    frames = sorted(f for f in m.memory.iter_backed())
    start = frames[0] << 12
    write_raw(m.memory, tmp_path / "part.raw", start=start)
    img = RawImage(tmp_path / "part.raw", base=start)
    assert mappings(img, FMT, t.root.value, 4) == mappings(m.memory, FMT, t.root.value, 4)  # type: ignore[union-attr]
    with pytest.raises(ImageError, match="outside the raw image"):
        img.peek_words(0)
    with pytest.raises(ImageError, match="page aligned"):
        RawImage(tmp_path / "part.raw", base=5)


def test_truncated_raw_image_names_the_address(tree: tuple[Machine, RadixTable], tmp_path: Path) -> None:
    m, t = tree
    path = tmp_path / "mem.raw"
    size = write_raw(m.memory, path)
    root = t.root.value  # type: ignore[union-attr]
    assert (root + 1) << 12 == size  # tables come from the top of RAM: the root is the last frame
    with path.open("r+b") as f:
        f.truncate((root << 12) + 100)  # cut inside the root table
    with pytest.raises(TableWalkError, match=f"truncated inside the frame at {root << 12:#x}"):
        mappings(open_image(path), FMT, root, 4)


def test_pointer_outside_the_image(tree: tuple[Machine, RadixTable], tmp_path: Path) -> None:
    m, t = tree
    root = t.root.value  # type: ignore[union-attr]
    m.memory.store_word(root, 9, (0x7777 << 12) | 7)  # points at a frame that is in no image
    write_elf(m.memory, tmp_path / "mem.elf")
    with pytest.raises(TableWalkError, match="0x7777000"):
        mappings(open_image(tmp_path / "mem.elf"), FMT, root, 4)


def test_corrupt_elf_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\x7fELF" + b"\x02\x01\x01" + bytes(100))
    with pytest.raises(ImageError):
        open_image(bad)
    m = Machine(ram_bytes=16 << 20)
    m.memory.store_word(300, 0, 1)
    good = tmp_path / "good.elf"
    write_elf(m.memory, good)
    data = bytearray(good.read_bytes())
    # grow the PT_LOAD's p_filesz (offset 64 + 32) far beyond the file
    struct.pack_into("<Q", data, 64 + 32, 1 << 30)
    (tmp_path / "lying.elf").write_bytes(bytes(data))
    with pytest.raises(ImageError, match="file ends"):
        open_image(tmp_path / "lying.elf")
    (tmp_path / "short.elf").write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ImageError):
        open_image(tmp_path / "short.elf")
    with pytest.raises(ImageError, match="no such image"):
        open_image(tmp_path / "missing")
    img = open_image(good)
    with pytest.raises(ImageError, match="no PT_LOAD"):
        img.peek_words(5)


def test_elf_memsz_beyond_filesz_reads_zeros(tmp_path: Path) -> None:
    m = Machine(ram_bytes=16 << 20)
    m.memory.store_word(300, 0, 0xABC)
    path = tmp_path / "m.elf"
    write_elf(m.memory, path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, 64 + 40, 2 * 4096)  # p_memsz: two frames, only one in the file
    path.write_bytes(bytes(data))
    img = ElfImage(path)
    assert int(img.peek_words(300)[0]) == 0xABC
    assert not img.peek_words(301).any()
