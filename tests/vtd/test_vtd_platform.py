"""The flow ``iommusim demo`` drives, on a VT-d machine: hwdom set-up, a guest with a device, a stale unmap
and its flush, a fault with its log line, the counters, and teardown."""

from __future__ import annotations

import pytest

from iommusim.errors import DmaFault
from iommusim.frames import Daddr, Dfn, Gfn
from iommusim.platform import HardwareSpec, available_vendors, build_platform


def test_vtd_is_registered() -> None:
    assert "vtd" in available_vendors()


def test_demo_flow() -> None:
    p = build_platform(HardwareSpec("vtd", ram_bytes=2 << 30))
    m = p.machine
    assert p.hwdom_kind.value == "pv"
    assert not p.hwdom_direct_mapped
    progress: list[tuple[int, int]] = []
    hw = p.create_hardware_domain(256 << 20, progress=lambda done, total: progress.append((done, total)))
    assert progress
    assert progress[-1][0] == progress[-1][1]
    nic = p.device("0000:03:00.0")
    assert nic.owner is hw
    baseline = dict(m.allocator.in_use)

    guest = p.create_guest(1, 64 << 20)
    p.iommu.assign_device(guest, nic)
    gfn = 0x100
    m.dma.write(nic, Daddr(gfn << 12), b"payload")
    assert guest.p2m is not None
    entry = guest.p2m.lookup(Gfn(gfn))
    assert entry is not None
    assert m.memory.read_bytes(entry.mfn.value << 12, 7) == b"payload"
    assert m.dma.read(nic, Daddr(gfn << 12), 7) == b"payload"

    p.guest_unmap(guest, Gfn(gfn), flush=False)
    assert m.dma.read(nic, Daddr(gfn << 12), 7) == b"payload"  # stale, until the flush
    p.iommu.iotlb_flush(guest, Dfn(gfn), 1)
    with pytest.raises(DmaFault):
        m.dma.read(nic, Daddr(gfn << 12), 7)
    line = m.console.grep("[VT-D]")[-1].text
    assert "[0000:03:00.0]" in line
    assert "reason 06" in line

    with pytest.raises(DmaFault):
        m.dma.write(nic, Daddr(0x4000_0000), b"x")  # far outside the guest
    counters = p.counters()["vtd0"]
    for key in ("iotlb_hits", "iotlb_misses", "walks", "iotlb_inv_page", "iotlb_inv_domain", "faults"):
        assert counters[key] > 0, key
    assert counters["fault_0x5"] == 1
    assert counters["fault_0x6"] == 1

    p.destroy(guest)
    assert nic.owner is hw
    assert dict(m.allocator.in_use) == baseline
