"""A skipped flush leaves a stale translation: it survives unrelated invalidations and goes with the right one.

One test per IOTLB granularity the driver issues (page-selective, domain-selective, global); the
context-cache granularities are shown on the bare unit in test_vtd_unit_invalidation.py.
"""

from __future__ import annotations

from vtd_helpers import NIC, NVME, boot, gmfn, guest_with, lands_at, make, unit

from iommusim.frames import Dfn, Gfn
from iommusim.machine.domain import Domain
from iommusim.platform import Platform


def _setup() -> tuple[Platform, Domain, Domain]:
    p = make()
    boot(p)
    g = guest_with(p, NIC, 1)
    other = guest_with(p, NVME, 2)
    return p, g, other


def _stale_window(p: Platform, g: Domain) -> int:
    """Unmap gfn 0x20 without its flush, after the device used it; returns the frame it still reaches."""
    target = gmfn(g, 0x20)
    assert lands_at(p, NIC, 0x20 << 12) == target << 12
    assert lands_at(p, NIC, 0x21 << 12) == gmfn(g, 0x21) << 12
    p.guest_unmap(g, Gfn(0x20), flush=False)
    assert lands_at(p, NIC, 0x20 << 12) == target << 12
    return target


def _unrelated(p: Platform, g: Domain, other: Domain) -> None:
    """Invalidations that do not cover gfn 0x20 of ``g``."""
    p.iommu.iotlb_flush(g, Dfn(0x21), 1)  # another page of the same domain
    p.iommu.iotlb_flush(other, Dfn(0x20), 1)  # the same page of another domain
    p.iommu.iotlb_flush_all(other)  # another domain entirely
    u = p.ops.units[0]  # type: ignore[attr-defined]
    u.flush_context(0, 0, 0, 1, False)  # every context-cache entry


def test_page_selective() -> None:
    p, g, other = _setup()
    target = _stale_window(p, g)
    _unrelated(p, g, other)
    assert lands_at(p, NIC, 0x20 << 12) == target << 12
    before = unit(p).counters()["iotlb_inv_page"]
    p.iommu.iotlb_flush(g, Dfn(0x20), 1)
    assert unit(p).counters()["iotlb_inv_page"] == before + 1
    assert lands_at(p, NIC, 0x20 << 12) == -1
    assert lands_at(p, NIC, 0x21 << 12) == gmfn(g, 0x21) << 12


def test_domain_selective() -> None:
    p, g, other = _setup()
    target = _stale_window(p, g)
    _unrelated(p, g, other)
    assert lands_at(p, NIC, 0x20 << 12) == target << 12
    before = unit(p).counters()["iotlb_inv_domain"]
    p.iommu.iotlb_flush(g, Dfn(0x1F), 2)  # more than one page: domain-selective
    assert unit(p).counters()["iotlb_inv_domain"] == before + 1
    assert lands_at(p, NIC, 0x20 << 12) == -1


def test_domain_selective_flush_all() -> None:
    p, g, other = _setup()
    _stale_window(p, g)
    _unrelated(p, g, other)
    p.iommu.iotlb_flush_all(g)
    assert lands_at(p, NIC, 0x20 << 12) == -1


def test_global() -> None:
    p, g, other = _setup()
    target = _stale_window(p, g)
    _unrelated(p, g, other)
    assert lands_at(p, NIC, 0x20 << 12) == target << 12
    before = unit(p).counters()["iotlb_inv_global"]
    p.ops.units[0].flush_all()  # type: ignore[attr-defined]
    assert unit(p).counters()["iotlb_inv_global"] == before + 1
    assert lands_at(p, NIC, 0x20 << 12) == -1
