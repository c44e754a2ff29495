"""Device ops: assignment, reassignment, add/remove/enable, RMRRs, phantom functions, bridges; seen by DMA."""

from __future__ import annotations

import pytest
from vtd_helpers import GPU, NIC, NVME, boot, fault_of, gmfn, guest_with, lands_at, make, reaches, unit

from iommusim.errors import NotPermitted
from iommusim.frames import Daddr, Dfn
from iommusim.iommu.config import IommuConfig
from iommusim.machine.pci import PciDevice, PciDevType, Sbdf
from iommusim.perms import Perm


def test_assign_then_deassign() -> None:
    p = make()
    hw = boot(p)
    base = p.machine.allocator.owned("d1:")
    g = guest_with(p)
    assert p.device(NIC).owner is g
    assert lands_at(p, NIC, 0x42 << 12) == gmfn(g, 0x42) << 12
    p.iommu.deassign_device(g, NIC)
    assert p.device(NIC).owner is hw
    assert lands_at(p, NIC, 0x42 << 12) == 0x42 << 12  # back in the hardware domain's 1:1 view
    assert p.machine.allocator.owned("d1:") == base  # the guest's tables went with its last device


def test_two_guests_are_isolated() -> None:
    p = make()
    boot(p)
    g1 = guest_with(p, NIC, 1)
    g2 = guest_with(p, NVME, 2)
    assert lands_at(p, NIC, 0x10 << 12) == gmfn(g1, 0x10) << 12
    assert lands_at(p, NVME, 0x10 << 12) == gmfn(g2, 0x10) << 12
    dids = {unit(p).context_cache.get(p.device(n).sbdf.bdf).did for n in (NIC, NVME)}  # type: ignore[union-attr]
    assert len(dids) == 2


def test_remove_and_add_device() -> None:
    p = make()
    boot(p)
    assert reaches(p, NIC, 0x1000)
    p.iommu.remove_device(NIC)
    assert fault_of(p, NIC, 0x1000).reason == 0x2  # the context entry is gone (and was flushed)
    p.iommu.add_device(NIC)
    assert reaches(p, NIC, 0x1000)


def test_host_bridge_cannot_be_assigned() -> None:
    p = make()
    hw = boot(p)
    g = p.create_guest(1, 4 << 20)
    with pytest.raises(NotPermitted):
        p.iommu.assign_device(g, "0000:00:00.0")
    assert p.device("0000:00:00.0").owner is hw


def test_ats_device_gets_a_device_tlb_context() -> None:
    p = make(ats=True)
    boot(p)
    nic = p.device(NIC)
    assert nic.ats_enabled
    g = guest_with(p)
    u = unit(p)
    tr = u.ats_translate(nic.sbdf.bdf, 0x7000, Perm.R)  # T=1 now: translation requests are served
    assert tr.maddr == gmfn(g, 7) << 12
    assert u.device_tlb.lookup(nic.sbdf.bdf, 0x7000) is not None
    before = u.counters().get("inv_device_iotlb", 0)
    p.iommu.unmap_page(g, Dfn(7))
    assert u.counters()["inv_device_iotlb"] > before  # the flush reached the device's TLB
    assert u.device_tlb.lookup(nic.sbdf.bdf, 0x7000) is None


def test_enable_device_enables_ats() -> None:
    p = make(ats=True)
    boot(p)
    nic = p.device(NIC)
    nic.ats_enabled = False
    p.ops.enable_device(nic)
    assert nic.ats_enabled


RMRR = {"base": 0x3F000, "end": 0x3F00F, "devices": [GPU]}


def test_rmrr_identity_map_for_hwdom_and_guest() -> None:
    p = make(config=IommuConfig(hwdom_strict=True), rmrr=[RMRR])
    boot(p)
    assert lands_at(p, GPU, 0x3F005 << 12) == 0x3F005 << 12  # strict hwdom: only the RMRR is 1:1
    got: list[tuple[int, int, int]] = []
    p.iommu.get_reserved_device_memory(lambda pfn, n, sbdf, _c: got.append((pfn, n, sbdf)) or 0)
    assert got == [(0x3F000, 16, Sbdf.parse(GPU).bdf)]
    g = guest_with(p, GPU)
    assert lands_at(p, GPU, 0x3F00F << 12) == 0x3F00F << 12  # the guest keeps the identity map
    assert lands_at(p, GPU, 0x1 << 12) == gmfn(g, 1) << 12
    p.iommu.deassign_device(g, GPU)
    assert lands_at(p, GPU, 0x3F000 << 12) == 0x3F000 << 12


def test_shared_rmrr_needs_the_relaxed_flag() -> None:
    shared = {"base": 0x3F000, "end": 0x3F000, "devices": [GPU, NVME]}
    p = make(rmrr=[shared])
    hw = boot(p)
    g = p.create_guest(1, 4 << 20)
    with pytest.raises(NotPermitted):
        p.iommu.assign_device(g, GPU)
    assert p.device(GPU).owner is hw
    p.iommu.assign_device(g, GPU, 1)  # XEN_DOMCTL_DEV_RDM_RELAXED
    assert p.device(GPU).owner is g
    assert p.machine.console.grep("shares an RMRR")


def test_reserved_memory_callback_can_stop() -> None:
    p = make(rmrr=[{"base": 0x100, "end": 0x101, "devices": [GPU, NVME]}, RMRR])
    calls: list[int] = []

    def skip_rest(pfn: int, n: int, sbdf: int, ctxt: object) -> int:
        calls.append(pfn)
        return 1  # positive: skip this RMRR's other devices

    assert p.iommu.get_reserved_device_memory(skip_rest) == 0
    assert calls == [0x100, 0x3F000]
    assert p.iommu.get_reserved_device_memory(lambda *_a: -22) == -22


def _extra_devices() -> list[PciDevice]:
    bridge = PciDevice(Sbdf.parse("0000:06:00.0"), PciDevType.PCIE2PCI_BRIDGE, secondary_bus=7)
    return [
        PciDevice(Sbdf.parse("0000:00:00.0"), PciDevType.HOST_BRIDGE),
        PciDevice(Sbdf.parse(NIC), PciDevType.PCIE_ENDPOINT),
        PciDevice(Sbdf.parse("0000:05:00.0"), PciDevType.PCIE_ENDPOINT, phantom_stride=2),
        bridge,
        PciDevice(Sbdf.parse("0000:07:01.0"), PciDevType.PCI_ENDPOINT, upstream_bridge=bridge.sbdf),
    ]


def test_phantom_functions_follow_the_device() -> None:
    p = make(devices=_extra_devices())
    boot(p)
    dev = p.device("0000:05:00.0")
    assert dev.phantom_devfns == [2, 4, 6]
    g = p.create_guest(1, 8 << 20)
    p.iommu.assign_device(g, dev)
    p.machine.dma.write(dev, Daddr(0x3 << 12), b"ph", devfn=4)
    assert p.machine.memory.read_bytes(gmfn(g, 3) << 12, 2) == b"ph"
    p.iommu.deassign_device(g, dev)
    p.machine.dma.write(dev, Daddr(0x3 << 12), b"h0", devfn=6)
    assert p.machine.memory.read_bytes(0x3 << 12, 2) == b"h0"


def test_conventional_pci_device_behind_a_pcie_to_pci_bridge() -> None:
    p = make(devices=_extra_devices())
    boot(p)
    legacy = "0000:07:01.0"
    assert p.machine.dma.route_of(p.device(legacy)).source_id == 0x0700  # type: ignore[union-attr]
    g = p.create_guest(1, 8 << 20)
    p.iommu.assign_device(g, legacy)
    assert lands_at(p, legacy, 0x9 << 12) == gmfn(g, 9) << 12  # the bridge's id now maps to the guest
    assert p.ops.get_device_group_id(0, 7, 0x08) == Sbdf.parse("0000:06:00.0").bdf
    assert p.ops.get_device_group_id(0, 3, 0) == Sbdf.parse(NIC).bdf
    assert p.ops.get_device_group_id(0, 9, 0) == -1
    p.iommu.deassign_device(g, legacy)
    assert lands_at(p, legacy, 0x9 << 12) == 0x9 << 12
