"""Random map/unmap sequences against a plain dictionary, checked through DMA after every step.

The window spans two 2 MiB blocks whose frames are mostly mapped 1:1 onto an aligned machine block, so
that merges into superpages and splits out of them happen often; the hardware must always translate
exactly what the dictionary says, and destroying the domain must give every table page back.
"""

from __future__ import annotations

from typing import Any

from amd_support import scenario
from hypothesis import given, settings
from hypothesis import strategies as st

from iommusim.errors import DmaFault
from iommusim.frames import Dfn, Mfn
from iommusim.perms import Perm

BASE_DFN = 0x40000  # 2 MiB aligned, beyond the guest's RAM
BASE_MFN = 0x20000  # 2 MiB aligned, unused machine frames
WINDOW = 1024

_offset = st.integers(0, WINDOW - 1)
_perms = st.sampled_from([Perm.RW, Perm.RW, Perm.RW, Perm.R])
_mfn_shift = st.sampled_from([0, 0, 0, 7])  # mostly 1:1 onto the aligned block, so that tables merge

_ops = st.one_of(
    st.tuples(st.just("map"), _offset, _mfn_shift, _perms),
    st.tuples(st.just("unmap"), _offset),
    st.tuples(st.just("map_range"), _offset, st.integers(1, 700), _mfn_shift, _perms),
    st.tuples(st.just("unmap_range"), _offset, st.integers(1, 300)),
    st.tuples(st.just("fill"), st.integers(0, 1), _perms),
)


def _check(s: Any, ref: dict[int, tuple[int, Perm]], offsets: set[int]) -> None:
    unit = s.unit
    rid = s.rid()
    for off in offsets:
        dfn = BASE_DFN + off
        want = ref.get(dfn)
        try:
            tr = unit.translate(rid, dfn << 12, Perm.R)
            got: tuple[int, Perm] | None = (tr.maddr >> 12, tr.perms)
        except DmaFault:
            got = None
        assert got == want, f"dfn {dfn:#x}: DMA sees {got}, the model says {want}"


@settings(max_examples=20, deadline=None)
@given(ops=st.lists(_ops, min_size=1, max_size=14), sample=st.lists(_offset, min_size=8, max_size=8))
def test_random_sequences_follow_the_model(ops: list[tuple[Any, ...]], sample: list[int]) -> None:
    s = scenario(hwdom_passthrough=True)
    s.nic.bus_master = True
    iommu, g = s.p.iommu, s.guest
    ref: dict[int, tuple[int, Perm]] = {}
    for op in ops:
        touched: set[int] = set(sample)
        if op[0] == "map":
            _, off, shift, perms = op
            iommu.map_page(g, Dfn(BASE_DFN + off), Mfn(BASE_MFN + off + shift), perms)
            ref[BASE_DFN + off] = (BASE_MFN + off + shift, perms)
            touched.add(off)
        elif op[0] == "unmap":
            _, off = op
            iommu.unmap_page(g, Dfn(BASE_DFN + off))
            ref.pop(BASE_DFN + off, None)
            touched.add(off)
        elif op[0] == "map_range":
            _, off, n, shift, perms = op
            n = min(n, WINDOW - off)
            iommu.map(g, Dfn(BASE_DFN + off), Mfn(BASE_MFN + off + shift), n, perms)
            for i in range(n):
                ref[BASE_DFN + off + i] = (BASE_MFN + off + shift + i, perms)
            touched |= {off, off + n - 1}
        elif op[0] == "unmap_range":
            _, off, n = op
            n = min(n, WINDOW - off)
            iommu.unmap(g, Dfn(BASE_DFN + off), n)
            for i in range(n):
                ref.pop(BASE_DFN + off + i, None)
            touched |= {off, off + n - 1}
        else:
            _, block, perms = op
            for i in range(512):
                iommu.map_page(g, Dfn(BASE_DFN + block * 512 + i), Mfn(BASE_MFN + block * 512 + i), perms)
                ref[BASE_DFN + block * 512 + i] = (BASE_MFN + block * 512 + i, perms)
            touched |= {block * 512, block * 512 + 511}
        _check(s, ref, touched)
    _check(s, ref, set(range(WINDOW)))
    dumped = {
        m.dfn + i: (m.mfn + i, m.perms)
        for m in iommu.dump_page_tables(g)
        if BASE_DFN <= m.dfn < BASE_DFN + WINDOW
        for i in range(m.pages)
    }
    assert dumped == ref
    assert not g.crashed
    s.p.destroy(g)
    assert s.p.machine.allocator.owned("d1:") == 0
