"""The inputs every benchmark shares, made deterministically from the seed: addresses, traces, leaf values.

``random_daddrs`` is the random-walk input (uniform over a mapped range, any 8-byte aligned offset in the
page), used alike by the model, the C program and the plain-Python model.  ``dma_trace`` is a DMA trace
with the locality a real device shows: most accesses stream through a few descriptor rings and buffers,
the rest land anywhere in the mapped range.  ``LEAF_BITS`` and ``leaf`` fix what a baseline writes into a
4 KiB leaf so that the C, Python and numpy baselines can be compared entry for entry.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from iommusim.bench.timing import rng
from iommusim.errors import InvalidArgument
from iommusim.perms import Perm

__all__ = [
    "LEAF_BITS",
    "MFN_BASE",
    "STREAM_ADDRESSES",
    "STREAM_TRACE",
    "dma_trace",
    "leaf",
    "random_daddrs",
]

#: Bits of a baseline leaf besides the address: readable (bit 0) and writable (bit 1), as VT-d encodes them.
LEAF_BITS = 0x3
#: First machine frame the baselines map device frame 0 to (any value works; a non-zero one catches mix-ups).
MFN_BASE = 0x40000
#: Seed streams of the inputs.
STREAM_ADDRESSES = 1
STREAM_TRACE = 2

U64Array = npt.NDArray[np.uint64]
U8Array = npt.NDArray[np.uint8]


def leaf(dfn: int, mfn_base: int = MFN_BASE) -> int:
    """The 4 KiB leaf a baseline writes for device frame ``dfn`` (mapped to ``mfn_base + dfn``)."""
    return ((mfn_base + dfn) << 12) | LEAF_BITS


def random_daddrs(count: int, pages: int, *, first_dfn: int = 0, stream: int = STREAM_ADDRESSES) -> U64Array:
    """``count`` device addresses drawn uniformly over ``pages`` pages from ``first_dfn`` (8-byte aligned)."""
    if count < 0 or pages < 1:
        raise InvalidArgument("random addresses need a positive number of pages to land in")
    g = rng(stream)
    dfns = g.integers(0, pages, size=count, dtype=np.uint64) + np.uint64(first_dfn)
    offsets = g.integers(0, 512, size=count, dtype=np.uint64) << np.uint64(3)
    out: U64Array = (dfns << np.uint64(12)) | offsets
    return out


def dma_trace(
    count: int,
    pages: int,
    *,
    first_dfn: int = 0,
    rings: int = 16,
    ring_pages: int = 64,
    stride: int = 256,
    scattered: float = 0.2,
    write_share: float = 1 / 3,
    stream: int = STREAM_TRACE,
) -> tuple[U64Array, U8Array]:
    """A trace of ``count`` accesses over ``pages`` mapped pages: (device addresses, ``Perm`` of each).

    ``rings`` regions of ``ring_pages`` pages each are walked sequentially ``stride`` bytes at a time
    (wrapping around), each access picking a ring at random; a ``scattered`` share of accesses land
    uniformly anywhere instead.  A ``write_share`` of the accesses are writes, the rest reads.
    """
    if count < 0 or pages < 1 or rings < 1 or ring_pages < 1 or stride < 1 or not 0 <= scattered <= 1:
        raise InvalidArgument("a trace needs positive sizes and a share of scattered accesses in [0, 1]")
    g = rng(stream)
    ring_pages = min(ring_pages, pages)
    ring_bytes = ring_pages << 12
    starts = g.integers(0, pages - ring_pages + 1, size=rings, dtype=np.int64) << 12
    which = g.integers(0, rings, size=count, dtype=np.int64)
    daddrs = np.empty(count, dtype=np.int64)
    for r in range(rings):
        sel = np.nonzero(which == r)[0]
        daddrs[sel] = starts[r] + (np.arange(sel.size, dtype=np.int64) * stride) % ring_bytes
    loose = g.random(count) < scattered
    n_loose = int(loose.sum())
    daddrs[loose] = (g.integers(0, pages, size=n_loose, dtype=np.int64) << 12) | (
        g.integers(0, 512, size=n_loose, dtype=np.int64) << 3
    )
    daddrs += first_dfn << 12
    accesses = np.where(g.random(count) < write_share, np.uint8(Perm.W), np.uint8(Perm.R)).astype(np.uint8)
    return daddrs.astype(np.uint64), accesses
