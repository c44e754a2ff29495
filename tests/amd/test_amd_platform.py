"""The flow ``iommusim demo`` drives, on an AMD machine: hardware domain, a guest with a device, DMA, a
stale translation after an unflushed unmap, a fault with its log line, counters, teardown."""

from __future__ import annotations

import pytest

from iommusim.errors import DmaFault
from iommusim.frames import Daddr, Dfn, Gfn, Mfn
from iommusim.hw.amd.unit import COUNTER_NAMES
from iommusim.machine import DomainKind, PciDevice, PciDevType, Sbdf
from iommusim.platform import HardwareSpec, available_vendors, build_platform


def test_amd_platform_demo_flow() -> None:
    assert "amd" in available_vendors()
    nic = PciDevice(Sbdf.parse("0000:03:00.0"), PciDevType.PCIE_ENDPOINT, ats=True)
    disk = PciDevice(Sbdf.parse("0000:04:00.0"))
    p = build_platform(HardwareSpec("amd", ram_bytes=2 << 30), devices=[nic, disk])
    assert p.iommu.enabled and p.vendor == "amd" and p.hwdom_kind == DomainKind.PV

    progress: list[tuple[int, int]] = []
    d0 = p.create_hardware_domain(256 << 20, progress=lambda done, total: progress.append((done, total)))
    assert progress and progress[-1][0] == progress[-1][1]
    assert nic.owner is d0 and disk.owner is d0

    guest = p.create_guest(1, 128 << 20)
    p.iommu.assign_device(guest, nic)
    assert nic.owner is guest

    gfn = 0x42
    assert guest.p2m is not None
    entry = guest.p2m.lookup(Gfn(gfn))
    assert entry is not None
    mfn = entry.mfn.value
    p.machine.dma.write(nic, Daddr(gfn << 12), b"dma into the guest")
    assert p.machine.memory.read_bytes(mfn << 12, 18) == b"dma into the guest"
    assert p.machine.dma.read(nic, Daddr(gfn << 12), 18) == b"dma into the guest"

    # unmap without its flush: the translation stays usable until exactly that page is flushed
    p.guest_unmap(guest, Gfn(gfn), flush=False)
    assert p.machine.dma.read(nic, Daddr(gfn << 12), 18) == b"dma into the guest"
    p.iommu.iotlb_flush(guest, Dfn(gfn + 1), 1)
    assert p.machine.dma.read(nic, Daddr(gfn << 12), 18) == b"dma into the guest"
    p.iommu.iotlb_flush(guest, Dfn(gfn), 1)
    with pytest.raises(DmaFault):
        p.machine.dma.read(nic, Daddr(gfn << 12), 18)
    lines = p.machine.console.grep("IO_PAGE_FAULT")
    assert lines and f"address {gfn << 12:#x}" in lines[-1].text and "domain 1" in lines[-1].text

    # a remap through the p2m is flushed and seen at once
    p.guest_map(guest, Gfn(gfn), Mfn(mfn + 1))
    p.machine.memory.write_bytes((mfn + 1) << 12, b"the new frame")
    assert p.machine.dma.read(nic, Daddr(gfn << 12), 13) == b"the new frame"

    counters = p.counters()
    amd0 = counters["amd0"]
    assert set(COUNTER_NAMES) <= set(amd0)
    assert amd0["translations"] > 0 and amd0["faults"] == 1 and amd0["events_logged"] == 1
    assert amd0["cmd_inv_pages_page"] > 0 and amd0["cmd_inv_iotlb_pages"] > 0  # the NIC has ATS

    p.destroy(guest)
    assert p.machine.allocator.owned("d1:") == 0
    assert nic.owner is d0
    first = d0.extents[0].mfn.value
    p.machine.memory.write_bytes(first << 12, b"dom0")
    assert p.machine.dma.read(nic, Daddr(first << 12), 4) == b"dom0"  # back in the 1:1 view


def test_demo_runs_with_the_amd_vendor(capsys: pytest.CaptureFixture[str]) -> None:
    from iommusim.cli.demo import run_demo

    assert run_demo(["amd"]) == 0
    assert "amd" in capsys.readouterr().out
