"""The platforms and domains the figures are measured on (the *subjects*), built through a factory.

A vendor's figures are measured on platforms the factory builds (by default ``build_platform`` for an
installed vendor; tests pass a double).  The domain the mappings go to is chosen the way Xen allows it on
the architecture:

* x86 (the hardware domain is not direct-mapped): a PV guest that owns the frames and has the bench device
  assigned, mapping device frame == machine frame;
* ARM (the hardware domain is direct-mapped): the hardware domain itself, which keeps the device (attached
  to its context as Xen's dom0 builder does), mapping device frame == machine frame, the only map Xen's
  SMMU driver accepts.

The mapped frames start 1 GiB-aligned (as Xen's buddy allocator gives large aligned chunks), so that the
figures with superpages allowed can use them; ``HardwareSpec(superpages=())`` forbids them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from iommusim.errors import AlreadyExists
from iommusim.frames import Dfn, Mfn
from iommusim.iommu.config import IommuConfig
from iommusim.machine.domain import Domain, DomainKind
from iommusim.machine.pages import DOMID_XEN
from iommusim.machine.pci import PciDevice, PciDevType, Sbdf
from iommusim.perms import Perm
from iommusim.platform import HardwareSpec, Platform, build_platform

__all__ = [
    "BENCH_CONFIG",
    "NO_SUPERPAGES",
    "SUPERPAGES_2M",
    "SUPERPAGES_ALL",
    "PlatformFactory",
    "Subject",
    "bench_spec",
    "default_factory",
    "hwdom_platform",
    "make_subject",
]

PlatformFactory = Callable[[HardwareSpec, IommuConfig, Sequence[PciDevice]], Platform]

BENCH_DEVICE = "0000:03:00.0"
GUEST_DOMID = 1
#: Memory of the hardware domain that owns the bench device before it is assigned (kept small: its set-up
#: is not what these figures measure).
SUBJECT_HWDOM_BYTES = 4 << 20
#: The hardware domain gets only its own pages mapped: strict (no 1:1 map of all RAM), and neither the
#: PV "inclusive" map of every non-RAM frame below 4 GiB nor the reserved regions, which would add up to a
#: million pages that have nothing to do with the size being measured.
BENCH_CONFIG = IommuConfig(hwdom_strict=True, hwdom_inclusive=False, hwdom_reserved=False)
_GIB_FRAMES = 1 << 18


def default_factory(spec: HardwareSpec, config: IommuConfig, devices: Sequence[PciDevice]) -> Platform:
    return build_platform(spec, config=config, devices=devices)


def ram_for(pages: int) -> int:
    """Machine RAM for a bench of ``pages`` pages: 1 GiB of low memory, the pages, room for tables."""
    need = (1 << 30) + (pages << 12) + (512 << 20)
    return (need + (1 << 30) - 1) & ~((1 << 30) - 1)


#: Leaf sizes beyond 4 KiB the hardware spec allows (page shifts): none, 2 MiB only, 2 MiB and 1 GiB.
NO_SUPERPAGES: tuple[int, ...] = ()
SUPERPAGES_2M: tuple[int, ...] = (21,)
SUPERPAGES_ALL: tuple[int, ...] = (21, 30)


def bench_spec(vendor: str, pages: int, *, superpages: tuple[int, ...]) -> HardwareSpec:
    return HardwareSpec(vendor=vendor, ram_bytes=ram_for(pages), superpages=superpages, iotlb_entries=1024)


def bench_device() -> PciDevice:
    return PciDevice(Sbdf.parse(BENCH_DEVICE), PciDevType.PCIE_ENDPOINT)


@dataclass
class Subject:
    """A platform with a domain ready to receive ``pages`` mappings from ``dfn`` to ``mfn`` onwards."""

    platform: Platform
    domain: Domain
    device: PciDevice
    dfn: Dfn
    mfn: Mfn
    pages: int

    def map_all(self) -> None:
        self.platform.iommu.map(self.domain, self.dfn, self.mfn, self.pages, Perm.RW)

    def expected_maddrs(self, daddrs: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        """What the mapping of this subject (a constant frame offset) translates ``daddrs`` to."""
        delta = (self.mfn.value - self.dfn.value) << 12
        out: npt.NDArray[np.uint64] = (daddrs.astype(np.int64) + np.int64(delta)).astype(np.uint64)
        return out


def make_subject(factory: PlatformFactory, vendor: str, pages: int, *, superpages: tuple[int, ...]) -> Subject:
    p = factory(bench_spec(vendor, pages, superpages=superpages), BENCH_CONFIG, [bench_device()])
    hwdom = p.create_hardware_domain(SUBJECT_HWDOM_BYTES)
    dev = p.device(BENCH_DEVICE)
    alloc = p.machine.allocator
    if p.hwdom_direct_mapped:
        d = hwdom
        _attach_to_hardware_domain(p, hwdom, dev)
        mfn = alloc.alloc_domain(d.domid, pages, align_order=18)
    else:
        d = p.create_guest(GUEST_DOMID, 0, kind=DomainKind.PV)
        mfn = alloc.alloc_domain(GUEST_DOMID, pages, align_order=18)
        p.iommu.assign_device(d, dev)
    return Subject(p, d, dev, Dfn(mfn.value), mfn, pages)


def _attach_to_hardware_domain(p: Platform, hwdom: Domain, dev: PciDevice) -> None:
    """Attach the device to the hardware domain's context, as Xen's ARM dom0 builder does for every device
    the device tree gives dom0 (there is no add_device op on ARM); a driver that already did it says EEXIST."""
    with contextlib.suppress(AlreadyExists):
        p.iommu.assign_device(hwdom, dev)


def hwdom_platform(factory: PlatformFactory, vendor: str, pages: int, *, superpages: tuple[int, ...]) -> Platform:
    """A platform whose next domain memory starts 1 GiB-aligned (low frames given to Xen as padding)."""
    p = factory(bench_spec(vendor, pages, superpages=superpages), BENCH_CONFIG, [bench_device()])
    alloc = p.machine.allocator
    probe = alloc.alloc_domain(DOMID_XEN, 1)
    pad = (-(probe.value + 1)) % _GIB_FRAMES
    if pad:
        alloc.alloc_domain(DOMID_XEN, pad)
    return p
