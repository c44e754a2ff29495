"""The baselines build what they claim, and agree with each other on the same seeded inputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from iommusim.bench import baseline_c
from iommusim.bench.baseline_c import CBaselineUnavailable, build, find_compiler, run_c_baseline
from iommusim.bench.baseline_py import PyRadix, numpy_fill, py_insert_pages
from iommusim.bench.workloads import MFN_BASE, random_daddrs

needs_cc = pytest.mark.skipif(find_compiler() is None, reason="no C compiler on this machine")


def test_python_radix_by_hand() -> None:
    t = PyRadix()
    py_insert_pages(t, 1024)
    # frames 0..1023: one root, one level-3 and one level-2 table, and 1024/512 = 2 leaf tables
    assert t.tables == 5
    # 0x3ff_abc: frame 0x3ff, offset 0xabc -> machine frame 0x40000 + 0x3ff
    assert t.walk(0x3FF_ABC) == ((MFN_BASE + 0x3FF) << 12) | 0xABC == 0x403F_FABC
    assert t.walk(0x400_000) is None  # frame 0x400 was never mapped (its leaf table does not exist)
    assert t.walk(1 << 39) is None  # a different level-4 slot: no level-3 table there
    total, faults = t.walk_checksum([0x1008, 0x400_000, 0x2010])
    assert (total, faults) == (((MFN_BASE + 1) << 12 | 8) + ((MFN_BASE + 2) << 12 | 0x10), 1)


def test_python_radix_and_numpy_fill_build_the_same_leaves() -> None:
    n = 1000  # not a multiple of 512: the second leaf table is partly empty
    t = PyRadix()
    py_insert_pages(t, n)
    out = np.empty(n, dtype=np.uint64)
    numpy_fill(out)
    leaves = t.leaves()
    assert leaves.size == 1024 and np.array_equal(leaves[:n], out) and not leaves[n:].any()
    assert t.leaf_sum() == int(out.sum(dtype=np.uint64))


def test_python_radix_sparse_frames() -> None:
    t = PyRadix()
    t.insert(0, 0x1003)
    t.insert((1 << 27) + 5, 0x2003)  # another level-4 slot: three more tables
    assert t.tables == 1 + 3 + 3
    assert t.walk(((1 << 27) + 5) << 12) == 0x2000
    assert t.leaf_sum() == 0x1003 + 0x2003


@needs_cc
def test_c_checksums_match_python_on_the_same_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    pages = 3000
    # a fifth of the walks land beyond the mapped frames, so both sides must count the same faults
    daddrs = random_daddrs(4000, pages + pages // 4)
    c = run_c_baseline(pages, daddrs, repeats=2)
    t = PyRadix()
    py_insert_pages(t, pages)
    checksum, faults = t.walk_checksum(daddrs.tolist())
    assert faults > 0
    assert (c.tables, c.leaf_sum, c.walk_checksum, c.walk_faults) == (t.tables, t.leaf_sum(), checksum, faults)
    assert len(c.map.samples_ns) == 2 and c.map.items == pages and c.walk.items == 4000
    assert c.max_rss_kib > 0 and c.compiler


@needs_cc
def test_the_program_is_built_once_per_source_and_compiler(tmp_path: Path) -> None:
    first = build(cache_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build(cache_dir=tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert os.access(first, os.X_OK)


def test_no_compiler_is_a_clear_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(baseline_c, "find_compiler", lambda: None)
    with pytest.raises(CBaselineUnavailable, match="no C compiler"):
        run_c_baseline(16, random_daddrs(16, 16))


def test_a_broken_compiler_is_a_clear_note(tmp_path: Path) -> None:
    with pytest.raises(CBaselineUnavailable, match="could not build"):
        build("/bin/false", cache_dir=tmp_path)
