"""The physical-to-machine map (Gfn -> Mfn with a type) of a translated domain.

x86 keeps its p2m out of the model's machine memory (the IOMMU does not walk it unless tables are shared,
which the VT-d/AMD drivers treat as a no-op); it is a dictionary here.  ARM's p2m is a real stage-2 table in
machine memory and lives with the SMMU code; both satisfy the ``P2m`` protocol.  Whoever needs to keep the
IOMMU in step with the p2m (Xen's iommu sync on p2m changes) registers a listener.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from iommusim.frames import Gfn, Mfn, expect_kind
from iommusim.perms import Perm

__all__ = [
    "MAX_P2M_ORDER",
    "DictP2m",
    "P2m",
    "P2mChange",
    "P2mEntry",
    "P2mType",
    "check_order",
    "iommu_perms_for_type",
]

#: The largest change a p2m takes at once: 2**18 frames, one 1 GiB page (x86's PAGE_ORDER_1G).
MAX_P2M_ORDER = 18


def check_order(order: int) -> int:
    """EINVAL for an order a p2m cannot take (a negative one, or one beyond 1 GiB), before anything changes."""
    from iommusim.errors import InvalidArgument

    if not isinstance(order, int) or not 0 <= order <= MAX_P2M_ORDER:
        raise InvalidArgument(f"p2m order {order!r} is outside 0..{MAX_P2M_ORDER}")
    return order


class P2mType(Enum):
    """Kinds of p2m entry (the union of the x86 and ARM p2m_type_t values the IOMMU cares about)."""

    INVALID = "invalid"
    RAM_RW = "ram_rw"
    RAM_RO = "ram_ro"
    RAM_LOGDIRTY = "ram_logdirty"
    MMIO_DIRECT = "mmio_direct"  # x86 direct MMIO
    MMIO_DIRECT_DEV = "mmio_direct_dev"  # ARM device MMIO
    MMIO_DIRECT_NC = "mmio_direct_nc"
    MMIO_DIRECT_C = "mmio_direct_c"
    MAP_FOREIGN = "map_foreign"
    GRANT_MAP_RW = "grant_map_rw"
    GRANT_MAP_RO = "grant_map_ro"
    IOMMU_MAP_RW = "iommu_map_rw"  # ARM: mapped for a device by the IOMMU code
    IOMMU_MAP_RO = "iommu_map_ro"


def iommu_perms_for_type(t: P2mType, *, mmio_read_only: bool = False) -> Perm:
    """x86's p2m-type-to-IOMMU-flags rule: what a device may do through an entry of this type."""
    if t in (P2mType.RAM_RW, P2mType.GRANT_MAP_RW, P2mType.RAM_LOGDIRTY, P2mType.MAP_FOREIGN):
        return Perm.RW
    if t in (P2mType.RAM_RO, P2mType.GRANT_MAP_RO):
        return Perm.R
    if t == P2mType.MMIO_DIRECT:
        return Perm.R if mmio_read_only else Perm.RW
    if t == P2mType.IOMMU_MAP_RW:
        return Perm.RW
    if t == P2mType.IOMMU_MAP_RO:
        return Perm.R
    return Perm.NONE


@dataclass(frozen=True, slots=True)
class P2mEntry:
    mfn: Mfn
    type: P2mType


@dataclass(frozen=True, slots=True)
class P2mChange:
    """One p2m update of 2**order frames, with what was there before (for IOMMU sync)."""

    gfn: Gfn
    order: int
    new: P2mEntry | None
    old: list[P2mEntry | None]


class P2m(Protocol):
    def set_entry(self, gfn: Gfn, mfn: Mfn, order: int, type: P2mType) -> None: ...
    def remove(self, gfn: Gfn, order: int) -> None: ...
    def lookup(self, gfn: Gfn) -> P2mEntry | None: ...
    def items(self) -> Iterator[tuple[Gfn, P2mEntry]]: ...
    def teardown(self) -> None:
        """Release whatever the p2m holds (ARM: its stage-2 tables and VMID); called when the domain dies."""
        ...


Listener = Callable[[P2mChange], None]


class DictP2m:
    """A p2m as a dictionary of 4 KiB entries (x86)."""

    def __init__(self) -> None:
        self._map: dict[int, P2mEntry] = {}
        self.listeners: list[Listener] = []

    def _notify(self, change: P2mChange) -> None:
        for listener in self.listeners:
            listener(change)

    def set_entry(self, gfn: Gfn, mfn: Mfn, order: int, type: P2mType) -> None:
        g = expect_kind(Gfn, gfn, "gfn").value
        m = expect_kind(Mfn, mfn, "mfn").value
        n = 1 << check_order(order)
        old = [self._map.get(g + i) for i in range(n)]
        for i in range(n):
            self._map[g + i] = P2mEntry(Mfn(m + i), type)
        self._notify(P2mChange(gfn, order, P2mEntry(mfn, type), old))

    def remove(self, gfn: Gfn, order: int) -> None:
        g = expect_kind(Gfn, gfn, "gfn").value
        old = [self._map.pop(g + i, None) for i in range(1 << check_order(order))]
        self._notify(P2mChange(gfn, order, None, old))

    def lookup(self, gfn: Gfn) -> P2mEntry | None:
        return self._map.get(expect_kind(Gfn, gfn, "gfn").value)

    def items(self) -> Iterator[tuple[Gfn, P2mEntry]]:
        for g in sorted(self._map):
            yield Gfn(g), self._map[g]

    def __len__(self) -> int:
        return len(self._map)

    def teardown(self) -> None:
        self._map.clear()
