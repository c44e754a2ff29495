"""The ARM platform end to end, in the order ``iommusim demo`` drives every vendor."""

from __future__ import annotations

import pytest
from smmu_helpers import DEV_A, DEV_B, driver_of, make_platform, mfn_of, page_addr, unit_of

from iommusim.drivers.smmu import COHERENT_WALK
from iommusim.drivers.smmu.platform import SmmuPlatform
from iommusim.errors import DmaFault, InvalidArgument, NoDevice, OutOfMemory
from iommusim.frames import Daddr, Dfn, Gfn
from iommusim.iommu import IommuConfig
from iommusim.machine import DomainKind, PciDevice, Sbdf
from iommusim.platform import HardwareSpec, available_vendors, build_platform


def test_demo_flow() -> None:
    assert "smmu" in available_vendors()
    devices = [PciDevice(Sbdf.parse(DEV_A)), PciDevice(Sbdf.parse(DEV_B))]
    p = build_platform(HardwareSpec("smmu", ram_bytes=1 << 30), devices=devices)
    assert p.hwdom_kind == DomainKind.HVM
    assert p.hwdom_direct_mapped
    progress: list[tuple[int, int]] = []
    hwdom = p.create_hardware_domain(256 << 20, progress=lambda done, total: progress.append((done, total)))
    # ARM maps nothing for the hardware domain's DMA: its p2m already is the SMMU's table
    assert progress == []
    assert hwdom.direct_mapped
    assert hwdom.p2m is not None
    assert hwdom.p2m.lookup(Gfn(hwdom.extents[0].mfn.value)).mfn == hwdom.extents[0].mfn  # type: ignore[union-attr]
    guest = p.create_guest(1, 64 << 20)
    dev = p.device(DEV_A)
    p.iommu.assign_device(guest, dev)
    m = p.machine
    gfn = 0x42
    m.dma.write(dev, Daddr(gfn << 12), b"hello from the device")
    assert m.memory.read_bytes(mfn_of(guest, gfn) << 12, 21) == b"hello from the device"
    assert m.dma.read(dev, Daddr(gfn << 12), 5) == b"hello"
    # unmap without the flush: the translation stays usable until the flush
    p.guest_unmap(guest, Gfn(gfn), flush=False)
    assert m.dma.read(dev, Daddr(gfn << 12), 5) == b"hello"
    p.iommu.iotlb_flush(guest, Dfn(gfn), 1)
    with pytest.raises(DmaFault):
        m.dma.read(dev, Daddr(gfn << 12), 5)
    # unmap with the flush: gone at once
    m.dma.read(dev, Daddr((gfn + 1) << 12), 1)
    p.guest_unmap(guest, Gfn(gfn + 1))
    with pytest.raises(DmaFault):
        m.dma.read(dev, Daddr((gfn + 1) << 12), 1)
    assert m.console.grep("context fault not handled")
    counters = p.counters()
    assert set(counters) == {"smmu0"}
    c = counters["smmu0"]
    assert c["fault_translation"] == 2
    assert c["iotlb_hits"] >= 1
    assert c["tlbi_vmid_accepted"] >= 2
    assert c["walks"] >= 3
    in_use_before = m.allocator.owned("d1:")
    assert in_use_before > 0
    p.destroy(guest)
    assert m.allocator.owned("d1:") == 0
    assert 1 not in m.domains


def test_extra_options_are_checked_and_documented() -> None:
    with pytest.raises(InvalidArgument, match="sagaw"):
        make_platform(sagaw=3)
    p = make_platform(context_banks=2, stream_match_registers=4, ipa_bits=36)
    smmu = driver_of(p).smmus[0]
    assert (smmu.num_context_banks, smmu.num_mapping_groups, smmu.s2_input_size) == (2, 4, 36)
    assert isinstance(p, SmmuPlatform)
    assert p.layout is not None
    assert p.layout.root_pages == 1


def test_smmu_too_small_for_the_p2m_leaves_the_iommu_off() -> None:
    # an SMMU whose input size (40) is below the p2m's 44-bit IPA cannot serve Xen: probe fails, no IOMMU
    p = make_platform(ipa_bits=44, ias_bits=40)
    assert not p.iommu.enabled
    assert isinstance(p.iommu.setup_error, NoDevice)
    assert p.machine.console.grep("the p2m's IPA size is not supported")


def test_coherent_walk_feature() -> None:
    p = make_platform()
    d0 = p.create_hardware_domain(32 << 20)
    assert COHERENT_WALK in d0.iommu.features
    assert d0.p2m.counters["dcache_clean"] == 0  # type: ignore[union-attr]
    q = make_platform(coherent_walk=False)
    e0 = q.create_hardware_domain(32 << 20)
    assert COHERENT_WALK not in e0.iommu.features
    assert e0.p2m.counters["dcache_clean"] > 0  # type: ignore[union-attr]


def test_hwdom_options_arm_does_not_support_are_warned_and_dropped() -> None:
    p = make_platform()
    p.iommu.config = IommuConfig(hwdom_inclusive=True, hwdom_reserved=True)
    p.create_hardware_domain(32 << 20)
    assert p.machine.console.grep("map-inclusive is not supported on ARM")
    assert p.machine.console.grep("map-reserved is not supported on ARM")
    assert p.iommu.config.hwdom_inclusive is False
    assert p.iommu.config.hwdom_reserved is False


def test_several_smmus_share_the_p2m() -> None:
    spec = HardwareSpec("smmu", ram_bytes=256 << 20, units=2)
    devices = [PciDevice(Sbdf.parse(DEV_A)), PciDevice(Sbdf.parse(DEV_B))]
    p = build_platform(spec, devices=devices)
    p.create_hardware_domain(32 << 20)
    g = p.create_guest(1, 8 << 20)
    p.iommu.assign_device(g, p.device(DEV_A))
    p.iommu.assign_device(g, p.device(DEV_B))
    # one context per SMMU, both walking the guest's single p2m
    ctxs = driver_of(p).contexts(g)  # type: ignore[arg-type]
    assert len(ctxs) == 2
    assert {c.smmu.name for c in ctxs if c.smmu} == {"/smmu@2b400000", "/smmu@2b410000"}
    p.machine.memory.write_bytes(mfn_of(g, 3) << 12, b"both")
    assert p.machine.dma.read(p.device(DEV_A), page_addr(3), 4) == b"both"
    assert p.machine.dma.read(p.device(DEV_B), page_addr(3), 4) == b"both"
    # the p2m's flush reaches both SMMUs
    p.guest_unmap(g, Gfn(3))
    for dev in (DEV_A, DEV_B):
        with pytest.raises(DmaFault):
            p.machine.dma.read(p.device(dev), page_addr(3), 1)
    assert unit_of(p, 1).counters()["tlbi_vmid_accepted"] >= 1  # type: ignore[arg-type]


def test_hwdom_setup_allocation_failure_at_each_point() -> None:
    p = make_platform(dom0_devices=[DEV_B])
    m = p.machine
    baseline = dict(m.allocator.in_use)
    failures = 0
    for nth in range(1, 40):
        m.allocator.fail_nth(nth)
        try:
            d0 = p.create_hardware_domain(64 << 20)
        except OutOfMemory:
            failures += 1
            assert dict(m.allocator.in_use) == baseline
            assert 0 not in m.domains
            assert all(dev.owner is None for dev in m.pci)
            assert driver_of(p).smmus[0].context_map == set()
            continue
        finally:
            m.allocator.clear_failures()
        break
    # the p2m root and tables, the per-domain SMMU structure, the context and the SMR array
    assert failures >= 5
    frame = d0.extents[0].mfn.value
    m.memory.write_bytes(frame << 12, b"up")
    assert m.dma.read(p.device(DEV_B), Daddr(frame << 12), 2) == b"up"


def test_guest_creation_allocation_failure_at_each_point() -> None:
    p = make_platform()
    p.create_hardware_domain(32 << 20)
    m = p.machine
    baseline = dict(m.allocator.in_use)
    vmids = p.vmids.in_use  # type: ignore[attr-defined]
    for nth in range(1, 30):
        m.allocator.fail_nth(nth)
        try:
            g = p.create_guest(1, 8 << 20)
        except OutOfMemory:
            assert dict(m.allocator.in_use) == baseline
            assert 1 not in m.domains
            assert p.vmids.in_use == vmids  # type: ignore[attr-defined]
            continue
        finally:
            m.allocator.clear_failures()
        break
    assert g.p2m is not None
    assert len(list(g.p2m.items())) == 2048
