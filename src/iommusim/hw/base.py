"""What every IOMMU hardware model offers the bus: translate one device access, or refuse it.

The hardware models (``iommusim.hw.*``) see only machine memory and their own registers.  The DMA engine
asks a model to translate (source id, device address, access); the model answers with a ``Translation`` or
raises ``DmaFault`` after recording the fault the way its specification says (fault-recording registers,
an event log in memory, fault status registers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from iommusim.perms import Perm

__all__ = ["DmaRemapper", "Translation"]


@dataclass(frozen=True, slots=True)
class Translation:
    """The outcome of translating one device address."""

    maddr: int  # machine address of the byte that was asked for
    page_shift: int  # size of the mapping it came from (12, 21, 30, ...)
    perms: Perm  # what the mapping allows
    cached: bool  # served from a translation cache rather than a walk

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift


@runtime_checkable
class DmaRemapper(Protocol):
    """The bus-facing side of one IOMMU unit."""

    name: str

    def translate(self, source_id: int, daddr: int, access: Perm) -> Translation:
        """Translate or raise ``iommusim.errors.DmaFault`` (after recording the fault)."""
        ...

    def counters(self) -> Mapping[str, int]:
        """What the unit did so far (hits, misses, walks, invalidations by kind, faults...)."""
        ...
