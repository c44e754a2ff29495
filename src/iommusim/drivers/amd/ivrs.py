"""What firmware tells the AMD driver about the IOMMUs (ACPI IVRS): units, the devices behind each,
requestor-id aliases, and unity-mapped memory ranges (IVMD).

The driver never looks at the hardware model's Python objects: an IVHD gives it the unit's MMIO window
(the register file it maps), its PCI capability header, the requestor ids it translates and the means
to connect the unit's interrupt to a handler, which is all Xen learns from the IVRS and PCI config space.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from iommusim.hw.mmio import RegisterBlock
from iommusim.perms import Perm

__all__ = ["Ivhd", "Ivmd", "Ivrs"]


@dataclass(frozen=True, eq=False)
class Ivhd:
    """One IOMMU (an IVHD block)."""

    index: int
    mmio: RegisterBlock
    cap_header: int
    device_ids: frozenset[int]
    connect_irq: Callable[[Callable[[], None]], None]
    mmio_base: int = 0xFEB8_0000  # where firmware placed the 16 KiB window (for the hwdom's iomem denial)

    @property
    def name(self) -> str:
        return f"amd{self.index}"


@dataclass(frozen=True)
class Ivmd:
    """A range firmware needs mapped 1:1 for some devices while they do DMA (an IVMD unity range)."""

    first_pfn: int
    pages: int
    perms: Perm
    device_ids: frozenset[int]

    def covers(self, requestor_id: int) -> bool:
        return requestor_id in self.device_ids


@dataclass(frozen=True)
class Ivrs:
    ivhds: tuple[Ivhd, ...]
    ivmds: tuple[Ivmd, ...] = ()
    #: device id (bus << 8 | devfn) -> the requestor id its DMA carries (e.g. a bridge's)
    aliases: Mapping[int, int] = field(default_factory=dict)

    @property
    def bdf_entries(self) -> int:
        """Xen's ivrs_bdf_entries: one past the highest device id firmware names."""
        ids = [i for h in self.ivhds for i in h.device_ids] + list(self.aliases) + list(self.aliases.values())
        return max(ids, default=0) + 1

    def requestor_id(self, bdf: int) -> int:
        return self.aliases.get(bdf, bdf)

    def ivhd_for(self, bdf: int) -> Ivhd | None:
        """The IOMMU that translates a device (looked up by its own id, as Xen's ivrs_mappings are)."""
        for ivhd in self.ivhds:
            if bdf in ivhd.device_ids or self.requestor_id(bdf) in ivhd.device_ids:
                return ivhd
        return None

    def unity_ranges(self, requestor_id: int) -> list[Ivmd]:
        return [r for r in self.ivmds if r.covers(requestor_id)]
