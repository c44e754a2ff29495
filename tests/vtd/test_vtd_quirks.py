"""Seed-era VT-d behaviours brought back by quirks, next to the corrected defaults."""

from __future__ import annotations

import pytest
from vtd_helpers import NIC, boot, gmfn, guest_with, lands_at, make

from iommusim.errors import AddressNotAvailable, NoSuchEntry, OutOfMemory
from iommusim.frames import Dfn, Mfn
from iommusim.iommu.config import IommuConfig
from iommusim.perms import Perm


def _plat(*quirks: str):  # type: ignore[no-untyped-def]
    p = make(config=IommuConfig(quirks=frozenset(quirks)))
    boot(p)
    return p, guest_with(p)


def test_dfn_beyond_width_refused_by_default() -> None:
    p, g = _plat()
    with pytest.raises(AddressNotAvailable):
        p.ops.map_page(g, Dfn((1 << 36) | 0x33), Mfn(gmfn(g, 1)), Perm.RW)
    assert lands_at(p, NIC, 0x33 << 12) == gmfn(g, 0x33) << 12


def test_quirk_dfn_truncated_aliases_a_low_dfn() -> None:
    p, g = _plat("vtd-dfn-truncated")
    p.ops.map_page(g, Dfn((1 << 36) | 0x33), Mfn(gmfn(g, 1)), Perm.RW)
    assert lands_at(p, NIC, 0x33 << 12) == gmfn(g, 1) << 12  # dfn 0x33 was overwritten


def test_lookup_without_leaf_table() -> None:
    p, g = _plat()
    with pytest.raises(NoSuchEntry):
        p.iommu.lookup_page(g, Dfn(0x7_0000_0000))
    p2, g2 = _plat("vtd-lookup-enomem")
    with pytest.raises(OutOfMemory):
        p2.iommu.lookup_page(g2, Dfn(0x7_0000_0000))
    p2.iommu.map_page(g2, Dfn(0x5000), Mfn(gmfn(g2, 1)), Perm.R)  # gives 0x5000-0x51ff a leaf table
    with pytest.raises(NoSuchEntry):  # a leaf table exists but the entry is empty: ENOENT either way
        p2.iommu.lookup_page(g2, Dfn(0x5001))
