"""The DMA engine: devices reading and writing memory through whatever IOMMU unit sits in front of them.

Firmware tables (DMAR device scopes, IVRS, device tree) say which unit translates which device and under
which source id; the platform builder records that here.  A device with no unit in front of it reaches
machine memory directly, as on a machine without an IOMMU.  An access is split at every 4 KiB boundary
and each piece is translated on its own, so a transfer can fault half way, as real DMA does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from iommusim.errors import DmaFault, InvalidArgument
from iommusim.frames import PAGE_SIZE, Daddr, expect_kind
from iommusim.hw.base import DmaRemapper
from iommusim.machine.memory import MachineMemory
from iommusim.machine.pci import PciDevice, Sbdf
from iommusim.perms import Perm

__all__ = ["DmaEngine", "DmaRoute"]


@dataclass(frozen=True, slots=True)
class DmaRoute:
    unit: DmaRemapper
    source_id: int


class DmaEngine:
    def __init__(self, memory: MachineMemory) -> None:
        self.memory = memory
        self._routes: dict[tuple[Sbdf, int], DmaRoute] = {}
        self.stats: Counter[str] = Counter()

    def route(self, dev: PciDevice, unit: DmaRemapper, source_id: int, *, devfn: int | None = None) -> None:
        """Declare that requests from ``dev`` (or one of its phantom functions) go through ``unit``."""
        self._routes[(dev.sbdf, dev.sbdf.devfn if devfn is None else devfn)] = DmaRoute(unit, source_id)

    def route_of(self, dev: PciDevice, devfn: int | None = None) -> DmaRoute | None:
        return self._routes.get((dev.sbdf, dev.sbdf.devfn if devfn is None else devfn))

    def translate(self, dev: PciDevice, daddr: int, access: Perm, *, devfn: int | None = None) -> int:
        """The machine address one access of ``dev`` reaches; raises DmaFault when refused."""
        if not dev.bus_master:
            self.stats["blocked"] += 1
            raise DmaFault(f"{dev.sbdf}: bus mastering is disabled")
        route = self.route_of(dev, devfn)
        if route is None:
            return daddr
        return route.unit.translate(route.source_id, daddr, access).maddr

    def _pieces(self, daddr: int, length: int) -> list[tuple[int, int]]:
        if length <= 0:
            raise InvalidArgument("a DMA transfer needs a positive length")
        out = []
        while length:
            n = min(length, PAGE_SIZE - (daddr & (PAGE_SIZE - 1)))
            out.append((daddr, n))
            daddr += n
            length -= n
        return out

    def read(self, dev: PciDevice, daddr: Daddr, length: int, *, devfn: int | None = None) -> bytes:
        base = expect_kind(Daddr, daddr, "daddr").value
        out = bytearray()
        for a, n in self._pieces(base, length):
            try:
                maddr = self.translate(dev, a, Perm.R, devfn=devfn)
            except DmaFault:
                self.stats["read_faults"] += 1
                raise
            out += self.memory.read_bytes(maddr, n)
        self.stats["reads"] += 1
        self.stats["bytes_read"] += length
        return bytes(out)

    def write(self, dev: PciDevice, daddr: Daddr, data: bytes, *, devfn: int | None = None) -> None:
        base = expect_kind(Daddr, daddr, "daddr").value
        pos = 0
        for a, n in self._pieces(base, len(data)):
            try:
                maddr = self.translate(dev, a, Perm.W, devfn=devfn)
            except DmaFault:
                self.stats["write_faults"] += 1
                raise
            self.memory.write_bytes(maddr, data[pos : pos + n])
            pos += n
        self.stats["writes"] += 1
        self.stats["bytes_written"] += len(data)
