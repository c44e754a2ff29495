"""The C baseline: compile ``radix_baseline.c`` with the system's C compiler and run it as a subprocess.

The program does the radix-table work in plain C (per-page map into 4-level tables of 512 64-bit entries
allocated with calloc, then random 4-level walks), times itself with ``CLOCK_MONOTONIC`` and prints JSON.
It is compiled once per source, compiler and flags into a cache directory; without a compiler the
baseline is unavailable and the report says so instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt

from iommusim.bench.timing import Measurement
from iommusim.bench.workloads import LEAF_BITS, MFN_BASE

__all__ = ["CBaselineUnavailable", "CRun", "build", "find_compiler", "run_c_baseline"]

CFLAGS = ("-O2", "-std=c11")
_SOURCE = "radix_baseline.c"


class CBaselineUnavailable(RuntimeError):
    """There is no C compiler, or the program did not build or run; the message says which."""


@dataclass(frozen=True)
class CRun:
    """What one run of the C program measured and built."""

    map: Measurement  # per-page map of ``pages`` pages (items: pages)
    walk: Measurement  # random walks (items: addresses)
    tables: int  # tables the tree of ``pages`` pages needed
    leaf_sum: int  # sum of every leaf entry, modulo 2**64
    walk_checksum: int  # sum of every walk's machine address, modulo 2**64
    walk_faults: int
    max_rss_kib: int
    compiler: str


def find_compiler() -> str | None:
    """The system C compiler: ``$CC`` if set, else ``cc``, ``gcc`` or ``clang`` on the PATH."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else []
    candidates += ["cc", "gcc", "clang"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    return None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    path = Path(base) / "iommusim" / "bench"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".probe"
        probe.touch()
        probe.unlink()
        return path
    except OSError:
        path = Path(tempfile.gettempdir()) / f"iommusim-bench-{os.getuid() if hasattr(os, 'getuid') else 0}"
        path.mkdir(parents=True, exist_ok=True)
        return path


def source_text() -> bytes:
    return resources.files("iommusim.bench").joinpath(_SOURCE).read_bytes()


def build(compiler: str | None = None, cache_dir: Path | None = None) -> Path:
    """The compiled program, building it if this source/compiler/flags combination is not cached yet."""
    cc = compiler or find_compiler()
    if cc is None:
        raise CBaselineUnavailable("no C compiler found (tried $CC, cc, gcc, clang): the C baseline is skipped")
    src = source_text()
    key = hashlib.sha256(src + cc.encode() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    out_dir = cache_dir or _cache_dir()
    exe = out_dir / f"radix_baseline-{key}"
    if exe.exists():
        return exe
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        c_file = Path(tmp) / _SOURCE
        c_file.write_bytes(src)
        tmp_exe = Path(tmp) / "radix_baseline"
        try:
            proc = subprocess.run(
                [cc, *CFLAGS, "-o", str(tmp_exe), str(c_file)], capture_output=True, text=True, timeout=120
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CBaselineUnavailable(f"running {cc} failed: {exc}") from None
        if proc.returncode != 0:
            raise CBaselineUnavailable(f"{cc} could not build the C baseline:\n{proc.stderr.strip()}")
        os.replace(tmp_exe, exe)  # atomic: concurrent builders agree on the result
    return exe


def compiler_version(cc: str) -> str:
    try:
        proc = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return cc
    first = proc.stdout.strip().splitlines()
    return first[0] if first else cc


def run_c_baseline(
    pages: int,
    daddrs: npt.NDArray[np.uint64],
    *,
    repeats: int = 5,
    mfn_base: int = MFN_BASE,
    leaf_bits: int = LEAF_BITS,
    compiler: str | None = None,
    timeout_s: float = 600.0,
) -> CRun:
    """Map ``pages`` pages and walk ``daddrs`` in C, ``repeats`` times (plus one warm-up)."""
    cc = compiler or find_compiler()
    exe = build(cc)
    assert cc is not None
    with tempfile.NamedTemporaryFile(prefix="iommusim-daddrs-", suffix=".bin", delete=False) as f:
        np.ascontiguousarray(daddrs, dtype="<u8").tofile(f)
        addr_file = f.name
    try:
        proc = subprocess.run(
            [str(exe), str(pages), str(repeats), hex(mfn_base), hex(leaf_bits), addr_file],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CBaselineUnavailable(f"the C baseline did not run: {exc}") from None
    finally:
        os.unlink(addr_file)
    if proc.returncode != 0:
        raise CBaselineUnavailable(f"the C baseline failed (exit {proc.returncode}): {proc.stderr.strip()}")
    data = json.loads(proc.stdout)
    walks = int(data["walks"])
    return CRun(
        map=Measurement("c-map", max(pages, 1), tuple(int(x) for x in data["map_ns"])),
        walk=Measurement("c-walk", max(walks, 1), tuple(int(x) for x in data["walk_ns"])),
        tables=int(data["tables"]),
        leaf_sum=int(data["leaf_sum"]),
        walk_checksum=int(data["walk_checksum"]),
        walk_faults=int(data["walk_faults"]),
        max_rss_kib=int(data["max_rss_kib"]),
        compiler=compiler_version(cc),
    )
