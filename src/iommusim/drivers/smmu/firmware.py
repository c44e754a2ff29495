"""What the device tree tells Xen about the SMMUs: where each one's registers are and which masters it serves.

Xen finds SMMUs through device-tree nodes compatible with "arm,smmu-v2" (or v1, MMU-400/401/500); each node
gives the register window and the interrupts, and its "mmu-masters" property lists, for every device behind
it, the stream ids that device emits.  Here a node carries the hardware unit's MMIO window and interrupt
controller (the unit object offers nothing else to the driver) and the masters by PCI address.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from iommusim.machine.pci import Sbdf

__all__ = ["InterruptController", "MmioWindow", "SmmuNode"]


class MmioWindow(Protocol):
    """A register window: 32- and 64-bit reads and writes at byte offsets."""

    size: int

    def read(self, offset: int, size: int = 4) -> int: ...

    def write(self, offset: int, value: int, size: int = 4) -> None: ...


class InterruptController(Protocol):
    """The interrupt lines of one SMMU: the driver connects its handlers here (Xen's request_irq)."""

    def connect_irq(self, line: int, handler: Callable[[], None] | None) -> None: ...


@dataclass
class SmmuNode:
    """One "arm,smmu-v2" device-tree node."""

    path: str  # e.g. "/smmu@2b400000"
    mmio: MmioWindow
    irqs: InterruptController
    global_irq: int
    context_irq_base: int  # the line of context interrupt 0; interrupt i is base + i
    masters: dict[Sbdf, tuple[int, ...]] = field(default_factory=dict)  # the "mmu-masters" property
