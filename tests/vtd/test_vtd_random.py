"""Random map/unmap sequences against a plain dictionary, checked after every step through device DMA."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from vtd_helpers import NIC, boot, gmfn, lands_at, make, unit

from iommusim.frames import Dfn, Mfn
from iommusim.perms import Perm

# dfns in two 2 MiB regions far from the guest's own memory, so superpages and splits both happen
_BASES = (0x4_0000, 0x4_0200)
_op = st.one_of(
    st.tuples(st.just("map"), st.integers(0, 1023), st.integers(0, 511), st.sampled_from([Perm.R, Perm.RW])),
    st.tuples(st.just("unmap"), st.integers(0, 1023), st.just(0), st.just(Perm.NONE)),
    st.tuples(st.just("map_range"), st.integers(0, 1), st.integers(0, 1), st.sampled_from([Perm.R, Perm.RW])),
    st.tuples(st.just("unmap_range"), st.integers(0, 1000), st.integers(1, 40), st.just(Perm.NONE)),
)


@settings(max_examples=12, deadline=None)
@given(ops=st.lists(_op, min_size=1, max_size=12))
def test_dma_matches_a_reference_model(ops: list[tuple[str, int, int, Perm]]) -> None:
    p = make(ram=512 << 20)
    boot(p, 32 << 20)
    g = p.create_guest(1, 0)
    p.machine.populate(g, 1024, align_order=9)  # two 2 MiB-aligned blocks of guest memory
    p.iommu.assign_device(g, NIC)
    base = _BASES[0]
    frames = [gmfn(g, i) for i in range(1024)]
    model: dict[int, tuple[int, Perm]] = {}
    for kind, a, b, perms in ops:
        if kind == "map":
            p.iommu.map_page(g, Dfn(base + a), Mfn(frames[b]), perms)
            model[base + a] = (frames[b], perms)
        elif kind == "unmap":
            p.iommu.unmap_page(g, Dfn(base + a))
            model.pop(base + a, None)
        elif kind == "map_range":
            start = _BASES[a]
            p.iommu.map(g, Dfn(start), Mfn(frames[512 * b]), 512, perms)  # one aligned block: a 2 MiB leaf
            model.update({start + i: (frames[512 * b + i], perms) for i in range(512)})
        else:
            p.iommu.unmap(g, Dfn(base + a), b)
            for i in range(b):
                model.pop(base + a + i, None)
        probes = {base + a, base + a + b, base + (a ^ 0x155) % 1024, base + 1023}
        for dfn in sorted(probes):
            nic = p.device(NIC)
            nic.bus_master, nic.fault_count = True, 0  # probing faults on purpose: keep the device enabled
            want = model.get(dfn)
            got = lands_at(p, NIC, dfn << 12)
            if want is None:
                assert got == -1, hex(dfn)
            elif want[1] == Perm.RW:
                assert got == want[0] << 12, hex(dfn)
            else:
                assert got == -1  # read-only: the write probe is refused, the read reaches the frame
                sid = p.device(NIC).sbdf.bdf
                assert unit(p).translate(sid, dfn << 12, Perm.R).maddr == want[0] << 12
    assert {m.dfn + i for m in p.iommu.dump_page_tables(g) for i in range(m.pages) if m.dfn >= base} == set(model)
