"""The differential state machine: every vendor against the reference model, and bugs it found."""

from __future__ import annotations

import pytest

from iommusim.errors import DmaFault
from iommusim.frames import PAGE_SHIFT, Daddr
from iommusim.machine import PciDevice, Sbdf
from iommusim.platform import HardwareSpec, available_vendors, build_platform

VENDORS = available_vendors()


# -- regressions of bugs the machine found ----------------------------------------------------------------


@pytest.mark.skipif("smmu" not in VENDORS, reason="the SMMU model is not installed")
def test_smmu_destroy_releases_devices_the_device_tree_way() -> None:
    """Destroying an ARM guest detaches its devices (Xen's iommu_release_dt_devices, reassign to NULL).

    It used to go through the PCI deassign path: the device was attached to dom0's context, could DMA
    into dom0's memory, and could never be assigned again (EEXIST).
    """
    nic = "0000:03:00.0"
    p = build_platform(HardwareSpec("smmu", ram_bytes=64 << 20), devices=[PciDevice(Sbdf.parse(nic))])
    d0 = p.create_hardware_domain(16 << 20)
    for _ in range(2):
        g = p.create_guest(1, 4 << 20)
        p.iommu.assign_device(g, nic)
        p.destroy(g)
        dev = p.device(nic)
        assert dev.owner is d0
        with pytest.raises(DmaFault):
            p.machine.dma.read(dev, Daddr(d0.extents[0].mfn.value << PAGE_SHIFT), 4)
    assert p.machine.allocator.owned("d1:") == 0
