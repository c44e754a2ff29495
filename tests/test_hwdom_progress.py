"""Regression: progress given to hwdom_init reaches the identity map a vendor's hwdom_init starts."""

from __future__ import annotations

from doubles import ToyDriver
from iommusim.iommu import Iommu
from iommusim.machine import DomainKind, Machine


def test_progress_reaches_the_vendor_started_identity_map() -> None:
    m = Machine(ram_bytes=64 << 20)
    iommu = Iommu(m, ToyDriver())
    iommu.setup()
    d = m.create_domain(0, DomainKind.PV, memory_bytes=8 << 20, hardware=True)
    iommu.domain_init(d)
    seen: list[tuple[int, int]] = []
    iommu.hwdom_init(d, lambda done, total: seen.append((done, total)))
    assert seen
    assert seen[-1][0] == seen[-1][1]
