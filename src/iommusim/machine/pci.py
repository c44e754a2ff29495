"""PCI devices: names (segment:bus:device.function), kinds, owners and the fault counter.

The IOMMU identifies a device by its requester id (bus << 8 | devfn); on ARM by the stream ids firmware
gives it.  Phantom functions are extra requester ids of one device at ``devfn + k * stride`` in the same
slot.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from iommusim.errors import AlreadyExists, InvalidArgument, NoDevice

if TYPE_CHECKING:
    from iommusim.machine.domain import Domain

__all__ = ["PciBus", "PciDevType", "PciDevice", "Sbdf"]

_SBDF_RE = re.compile(
    r"^(?:(?P<seg>[0-9a-fA-F]{1,4}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<dev>[0-9a-fA-F]{1,2})\.(?P<fn>[0-7])$"
)


@dataclass(frozen=True, slots=True, order=True)
class Sbdf:
    seg: int
    bus: int
    dev: int
    fn: int

    def __post_init__(self) -> None:
        if not (0 <= self.seg <= 0xFFFF and 0 <= self.bus <= 0xFF and 0 <= self.dev <= 0x1F and 0 <= self.fn <= 7):
            raise InvalidArgument(
                f"PCI address out of range: seg {self.seg:#x} bus {self.bus:#x} dev {self.dev:#x} fn {self.fn}"
            )

    @classmethod
    def parse(cls, text: str) -> Sbdf:
        """Parse ``0000:00:02.0`` (the segment may be left out)."""
        m = _SBDF_RE.match(text.strip())
        if not m:
            raise InvalidArgument(f"not a PCI address: {text!r} (expected SSSS:BB:DD.F, e.g. 0000:00:02.0)")
        return cls(int(m["seg"] or "0", 16), int(m["bus"], 16), int(m["dev"], 16), int(m["fn"]))

    @classmethod
    def from_bdf(cls, bdf: int, seg: int = 0) -> Sbdf:
        return cls(seg, bdf >> 8, (bdf >> 3) & 0x1F, bdf & 7)

    @property
    def devfn(self) -> int:
        return (self.dev << 3) | self.fn

    @property
    def bdf(self) -> int:
        """The 16-bit requester id: bus << 8 | devfn."""
        return (self.bus << 8) | self.devfn

    def with_devfn(self, devfn: int) -> Sbdf:
        return Sbdf(self.seg, self.bus, devfn >> 3, devfn & 7)

    def __str__(self) -> str:
        return f"{self.seg:04x}:{self.bus:02x}:{self.dev:02x}.{self.fn}"


class PciDevType(Enum):
    HOST_BRIDGE = "host-bridge"
    PCIE_ENDPOINT = "pcie-endpoint"
    PCI_ENDPOINT = "pci-endpoint"  # conventional PCI, behind a bridge
    PCIE_BRIDGE = "pcie-bridge"
    PCIE2PCI_BRIDGE = "pcie-to-pci-bridge"
    LEGACY_BRIDGE = "legacy-bridge"


@dataclass(eq=False)
class PciDevice:
    sbdf: Sbdf
    type: PciDevType = PciDevType.PCIE_ENDPOINT
    ats: bool = False  # capable of Address Translation Services (has a device IOTLB)
    ats_queue_depth: int = 32
    ats_enabled: bool = False
    phantom_stride: int = 0  # 0: no phantom functions
    stream_ids: tuple[int, ...] = ()  # ARM: the stream ids firmware assigns (default: the requester id)
    upstream_bridge: Sbdf | None = None
    secondary_bus: int | None = None  # bridges only
    owner: Domain | None = None
    bus_master: bool = True
    fault_count: int = 0
    last_fault_ns: int = 0
    quarantined: bool = False
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"PciDevice({self.sbdf})"

    @property
    def phantom_devfns(self) -> list[int]:
        """Extra requester ids of this device in the same slot (Xen's phantom functions)."""
        if not self.phantom_stride:
            return []
        out = []
        devfn = self.sbdf.devfn + self.phantom_stride
        while devfn >> 3 == self.sbdf.dev and devfn <= 0xFF:
            out.append(devfn)
            devfn += self.phantom_stride
        return out

    @property
    def sids(self) -> tuple[int, ...]:
        return self.stream_ids or (self.sbdf.bdf,)


class PciBus:
    """Every PCI device of the machine, by address."""

    def __init__(self) -> None:
        self._devices: dict[Sbdf, PciDevice] = {}

    def add(self, dev: PciDevice) -> PciDevice:
        if dev.sbdf in self._devices:
            raise AlreadyExists(f"PCI device {dev.sbdf} already exists")
        self._devices[dev.sbdf] = dev
        return dev

    def get(self, sbdf: Sbdf | str) -> PciDevice:
        key = Sbdf.parse(sbdf) if isinstance(sbdf, str) else sbdf
        try:
            return self._devices[key]
        except KeyError:
            raise NoDevice(f"no PCI device {key}") from None

    def find(self, sbdf: Sbdf) -> PciDevice | None:
        return self._devices.get(sbdf)

    def __iter__(self) -> Iterator[PciDevice]:
        return iter(sorted(self._devices.values(), key=lambda d: d.sbdf))

    def __len__(self) -> int:
        return len(self._devices)

    def owned_by(self, domain: Domain) -> list[PciDevice]:
        return [d for d in self if d.owner is domain]
