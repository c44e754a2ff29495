"""iommusim decode on images iommusim wrote itself (raw and ELF), for every registered format, and on broken ones.

The formats come from the decoder registry, each with the vendor whose machines write it; a format whose
vendor is installed is tested by building that vendor's machine, asking its tools adapter how to decode
its trees (``decode_targets``) and decoding images of it, so a vendor that registers a format is tested
here without a line of new test code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tools_helpers import TOOLED, cli, run

from iommusim.images import write_elf, write_raw
from iommusim.pagetable.format import EntryKind
from iommusim.platform import Platform
from iommusim.tools.decode import DECODERS, available_decoders, decoder
from iommusim.tools.tables import TableRoot, table_mappings
from iommusim.tools.vendors import DecodeTarget, vendor_tools

FORMATS = sorted(DECODERS)


def _machine(fmt: str) -> Platform:
    if fmt not in available_decoders():
        pytest.skip(f"the {fmt} decoder is not installed")
    vendor = decoder(fmt).vendor
    if vendor not in TOOLED:
        pytest.skip(f"{fmt} needs a {vendor} machine, which is not installed")
    res = run("superpage-split", vendor, until="split")
    assert res.platform is not None and res.ok
    return res.platform


def _targets(p: Platform, fmt: str) -> list[DecodeTarget]:
    targets = [t for t in vendor_tools(p.vendor).decode_targets(p) if t.format == fmt]
    assert targets, f"{p.vendor}'s tools give no way to decode its machine as {fmt}"
    return targets


def _args(image: Path, t: DecodeTarget, *extra: str) -> list[str]:
    opts = [x for k, v in t.options.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    return ["decode", str(image), "--format", t.format, "--root", f"{t.root:#x}", *opts, *extra]


def _decode(tmp: Path, image: Path, t: DecodeTarget, *extra: str) -> tuple[int, str, Any]:
    out = tmp / "decoded.json"
    result = cli(*_args(image, t, *extra), "--json", out)
    assert "Traceback" not in result.output
    data = json.loads(out.read_text()) if out.exists() else None
    return result.exit_code, " ".join(result.output.split()), data


def _tree_of(p: Platform, t: DecodeTarget) -> TableRoot:
    assert t.domid is not None
    tables = vendor_tools(p.vendor).domain_tables(p, p.machine.domains[t.domid])
    assert tables is not None and tables.root_maddr == t.root
    return tables


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["raw", "elf"])
def test_decode_reads_back_what_the_machine_holds(fmt: str, kind: str, tmp_path: Path) -> None:
    p = _machine(fmt)
    image = tmp_path / f"mem.{kind}"
    (write_raw if kind == "raw" else write_elf)(p.machine.memory, image)
    dec = decoder(fmt)
    for t in _targets(p, fmt):
        code, out, data = _decode(tmp_path, image, t, "--tree")
        assert code == 0, out
        live = dec.decode(p.machine.memory, t.root, t.options, max_tables=1 << 16).to_json()
        assert data["spaces"] == live["spaces"] and data["ok"]
        assert data["trees"]
        mapped = [s["mappings"] for s in data["spaces"]]
        if t.domid is not None:  # one domain's tree: exactly what the domain's tables map
            want = table_mappings(p.machine.memory, _tree_of(p, t))
            assert [[(int(m["dfn"], 16), int(m["mfn"], 16), m["pages"]) for m in ms] for ms in mapped] == [
                [(m.dfn, m.mfn, m.pages) for m in want]
            ]
        else:  # a device table: some space is the guest's, used by its NIC
            d1 = vendor_tools(p.vendor).domain_tables(p, p.machine.domains[1])
            assert d1 is not None
            assert any(s["tables"] and s["tables"]["root"] == f"{d1.root_maddr:#x}" for s in data["spaces"])
        assert "->" in out and "page(s) in" in out


def test_every_available_format_has_a_vendor_that_writes_it() -> None:
    for fmt in available_decoders():
        dec = decoder(fmt)
        assert dec.summary and dec.vendor
    result = cli("decode", "--list-formats")
    assert result.exit_code == 0
    for fmt in available_decoders():
        assert fmt in result.output


def _tree_target(p: Platform, fmt: str) -> DecodeTarget:
    """A target that is one domain's tree (the guest's), for the corruption tests."""
    tree = [t for t in vendor_tools(p.vendor).decode_targets(p) if t.domid == 1]
    if not tree:
        pytest.skip(f"{p.vendor} has no per-domain tree format")
    return tree[0]


TREE_FORMATS = [f for f in FORMATS if f not in ("vtd-root", "amd-dt")]


def _corrupt(tmp: Path, fmt: str, how: str) -> tuple[int, str, DecodeTarget]:
    p = _machine(fmt)
    t = _tree_target(p, fmt)
    tables = _tree_of(p, t)
    mem = p.machine.memory
    fmt = tables.fmt
    root = mem.words(tables.root_mfn)
    # the first table the root points at (the root may also hold superpages, as AMD's two-level trees do)
    i = next(k for k in np.nonzero(root)[0].tolist() if fmt.decode(int(root[k]), tables.levels).kind == EntryKind.TABLE)
    child = fmt.decode(int(root[i]), tables.levels)
    below = mem.words(child.address >> 12)
    j = int(np.nonzero(below)[0][0])
    # a pointer fits only in a table above level 1: the one below the root, or the root of a two-level tree
    host, level, slot = (below, child.next_level, j) if child.next_level > 1 else (root, tables.levels, i)
    if how == "loop":  # a table that points back at the root
        host[slot] = fmt.table_entry(tables.root_maddr, level)
    elif how == "outside":  # a table pointer past the end of the image
        host[slot] = fmt.table_entry(p.machine.ram_frames + 0x1000 << 12, level)
    elif how == "shared":  # every entry of the root at one subtree, every entry below at one more
        root[:] = root[i]
        below[:] = below[j]
    elif how == "malformed":  # reserved bits in a leaf
        leaf_table = min((f for f, *_ in _walk(mem, tables)), key=lambda f: -1 if _has_leaf(mem, tables, f) else 0)
        words = mem.words(leaf_table)
        k = int(np.nonzero(words)[0][0])
        words[k] = _with_reserved_bit(tables, int(words[k]))
    image = tmp / "bad.raw"
    write_raw(mem, image)
    code, out, _ = _decode(tmp, image, t)
    return code, out, t


def _walk(mem: Any, tables: TableRoot) -> list[tuple[int, int]]:
    from iommusim.pagetable.walk import walk_tables

    return [
        (f, lv)
        for f, lv, *_ in walk_tables(mem, tables.fmt, tables.root_mfn, tables.levels, root_pages=tables.root_pages)
    ]


def _has_leaf(mem: Any, tables: TableRoot, frame: int) -> bool:
    level = dict(_walk(mem, tables))[frame]
    return level == 1 and bool(np.count_nonzero(mem.peek_words(frame)))


def _with_reserved_bit(tables: TableRoot, raw: int) -> int:
    for bit in [*range(2, 12), *range(48, 64)]:
        if tables.fmt.decode(raw | (1 << bit), 1).kind == EntryKind.MALFORMED:
            return raw | (1 << bit)
    raise AssertionError("the format has no reserved bit in a leaf")


@pytest.mark.parametrize("fmt", TREE_FORMATS)
@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("loop", "table loop"),
        ("outside", "is outside memory"),
        ("shared", "is reached twice"),
        ("malformed", "malformed entry"),
    ],
)
def test_broken_trees_are_reported_with_their_address(fmt: str, how: str, message: str, tmp_path: Path) -> None:
    code, out, _t = _corrupt(tmp_path, fmt, how)
    assert code == 3, out
    assert message in out
    assert "0x" in out


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_images(fmt: str, tmp_path: Path) -> None:
    p = _machine(fmt)
    t = _targets(p, fmt)[0]
    elf = tmp_path / "mem.elf"
    write_elf(p.machine.memory, elf)
    cut = tmp_path / "cut.raw"
    write_raw(p.machine.memory, cut, end=t.root - 0x3000)  # the tables sit at the top of RAM: all cut off
    code, out, _ = _decode(tmp_path, cut, t)
    assert code == 3 and f"{t.root:#x}" in out and "outside the raw image" in out
    half = tmp_path / "cut.elf"
    half.write_bytes(elf.read_bytes()[: elf.stat().st_size // 2])
    code, out, _ = _decode(tmp_path, half, t)
    assert code == 3 and "the file ends at" in out
    junk = tmp_path / "junk.elf"
    junk.write_bytes(b"\x7fELF" + bytes(60))
    code, out, _ = _decode(tmp_path, junk, t)
    assert code == 3 and "junk.elf" in out


@pytest.mark.skipif("vtd" not in TOOLED, reason="VT-d is not installed")
def test_a_root_table_whose_context_table_is_outside_the_image(tmp_path: Path) -> None:
    p = _machine("vtd-root")
    (t,) = _targets(p, "vtd-root")
    mem = p.machine.memory
    roots = mem.words(t.root >> 12)
    roots[2 * 0x7F] = (0x40_0000_0000) | 1  # bus 0x7f: present, context table far away
    image = tmp_path / "mem.raw"
    write_raw(mem, image)
    code, out, data = _decode(tmp_path, image, t)
    assert code == 3
    assert "bus 0x7f: context table at 0x4000000000" in out
    assert data is not None and not data["ok"] and data["spaces"]  # the rest is still decoded


def test_a_raw_image_that_starts_above_zero(tmp_path: Path) -> None:
    fmt = TREE_FORMATS[0]
    p = _machine(fmt)
    t = _tree_target(p, fmt)
    base = 0x100_0000
    image = tmp_path / "high.raw"
    write_raw(p.machine.memory, image, start=base)
    code, out, _ = _decode(tmp_path, image, t, "--base", hex(base))
    assert code == 0, out
    code, out, _ = _decode(tmp_path, image, t, "--base", "0x123")
    assert code == 3 and "not page aligned" in out


def test_usage_mistakes(tmp_path: Path) -> None:
    fmt = TREE_FORMATS[0]
    p = _machine(fmt)
    image = tmp_path / "mem.raw"
    write_raw(p.machine.memory, image)
    assert cli("decode", image, "--format", "nosuch", "--root", "0x1000").exit_code == 2
    result = cli("decode", image, "--format", "vtd-root", "--root", "0x1000", "--levels", "4")
    assert result.exit_code == 2 and "vtd-root does not take --levels" in result.output
    result = cli("decode", image, "--format", fmt, "--root", "zzz")
    assert result.exit_code == 2
    result = cli("decode", image)
    assert result.exit_code == 2
    result = cli("decode", tmp_path / "none.raw", "--format", fmt, "--root", "0")
    assert result.exit_code == 3 and "no such image file" in result.output
