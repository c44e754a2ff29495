"""The vendor interface (Xen's ``struct iommu_ops``) and the per-domain IOMMU state.

Every translation-related method of the seed-era ops table is here, with Xen's int return codes turned into
exceptions: a method that returns normally succeeded, one that fails raises an ``IommuError`` carrying the
errno Xen would have returned.  ``map_page``/``unmap_page`` report what they changed as ``FlushFlags`` (the
later IOMMU_FLUSHF_* accumulator) so that a batch can be flushed once; outside a batch a driver still
flushes implicitly, as the seed-era drivers do.

Xen leaves some methods NULL for some vendors (AMD has no lookup_page, ARM no add_device, ...).  A driver
lists the optional methods it really provides in ``provided``; the generic layer treats the others as NULL
exactly where Xen would, so a driver never needs a stub.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from iommusim.frames import Dfn, Mfn
from iommusim.perms import FlushFlags, Perm

if TYPE_CHECKING:
    from iommusim.iommu.layer import Iommu
    from iommusim.machine.domain import Domain
    from iommusim.machine.pci import PciDevice
    from iommusim.pagetable.walk import Mapping

__all__ = ["OPTIONAL_OPS", "DomainIommu", "IommuOps", "IommuStatus", "ReservedMemoryCallback"]

#: Methods a vendor may leave out (NULL in Xen's table).
OPTIONAL_OPS: frozenset[str] = frozenset(
    {
        "add_device",
        "enable_device",
        "remove_device",
        "get_device_group_id",
        "lookup_page",
        "free_page_table",
        "suspend",
        "resume",
        "crash_shutdown",
        "share_p2m",
        "iotlb_flush",
        "iotlb_flush_all",
        "get_reserved_device_memory",
        "dump_page_tables",
        "map_range",
        "unmap_range",
    }
)

#: (first pfn, number of pages, device SBDF as an int, context) -> 0 to go on, >0 to skip, <0 to abort.
ReservedMemoryCallback = Callable[[int, int, int, object], int]


@runtime_checkable
class IommuOps(Protocol):
    """What a vendor driver provides to the generic layer."""

    #: Vendor name ("vtd", "amd", "smmu", or a test double's).
    name: str
    #: Optional methods (from OPTIONAL_OPS) that this driver implements.
    provided: frozenset[str]
    #: Page sizes the driver can map, as a bit mask of sizes (1 << 12 | 1 << 21 | ...).
    page_sizes: int

    def hardware_setup(self, iommu: Iommu) -> None:
        """Probe and initialise the hardware (Xen's iommu_hardware_setup); raise NoDevice if there is none."""
        ...

    def uses_shared_tables(self, d: Domain) -> bool:
        """Whether the IOMMU walks the CPU's own p2m for ``d`` (Xen's iommu_use_hap_pt)."""
        ...

    def init(self, d: Domain) -> None: ...

    def hwdom_init(self, d: Domain) -> None: ...

    def add_device(self, devfn: int, dev: PciDevice) -> None: ...

    def enable_device(self, dev: PciDevice) -> None: ...

    def remove_device(self, devfn: int, dev: PciDevice) -> None: ...

    def assign_device(self, d: Domain, devfn: int, dev: PciDevice, flag: int) -> None: ...

    def reassign_device(self, source: Domain, target: Domain | None, devfn: int, dev: PciDevice) -> None: ...

    def get_device_group_id(self, seg: int, bus: int, devfn: int) -> int: ...

    def teardown(self, d: Domain) -> None: ...

    def map_page(self, d: Domain, dfn: Dfn, mfn: Mfn, perms: Perm) -> FlushFlags: ...

    def unmap_page(self, d: Domain, dfn: Dfn) -> FlushFlags: ...

    def lookup_page(self, d: Domain, dfn: Dfn) -> tuple[Mfn, Perm]: ...

    def map_range(self, d: Domain, dfn: Dfn, mfn: Mfn, count: int, perms: Perm) -> FlushFlags:
        """Bulk map of ``count`` pages, all or nothing, with no implicit flush."""
        ...

    def unmap_range(self, d: Domain, dfn: Dfn, count: int) -> FlushFlags:
        """Bulk unmap of ``count`` pages, all or nothing, with no implicit flush."""
        ...

    def free_page_table(self, mfn: Mfn, level: int) -> None: ...

    def suspend(self) -> None: ...

    def resume(self) -> None: ...

    def crash_shutdown(self) -> None: ...

    def share_p2m(self, d: Domain) -> None: ...

    def iotlb_flush(self, d: Domain, dfn: Dfn, count: int, flags: FlushFlags) -> None: ...

    def iotlb_flush_all(self, d: Domain) -> None: ...

    def get_reserved_device_memory(self, fn: ReservedMemoryCallback, ctxt: object) -> int: ...

    def dump_page_tables(self, d: Domain) -> list[Mapping]:
        """Every translation of the domain's IOMMU tables, read back from memory."""
        ...


class IommuStatus(Enum):
    """Whether a domain has IOMMU tables (Xen's domain_iommu.status, series end)."""

    DISABLED = "disabled"
    INITIALIZING = "initializing"
    INITIALIZED = "initialized"


@dataclass(eq=False)
class DomainIommu:
    """Per-domain IOMMU state (Xen's struct domain_iommu)."""

    platform_ops: IommuOps | None = None
    status: IommuStatus = IommuStatus.DISABLED
    need_sync: bool = False
    #: Vendor state (root table, paging mode, context banks, ...).
    arch: Any = None
    mapping_lock: AbstractContextManager[Any] = field(default_factory=threading.Lock)
    features: set[str] = field(default_factory=set)

    @property
    def has_pt(self) -> bool:
        """Xen's has_iommu_pt(d)."""
        return self.status != IommuStatus.DISABLED

    @property
    def need_iommu(self) -> int:
        """The seed-era tri-state: -1 while tables are being built, 1 once built, 0 without."""
        return {IommuStatus.DISABLED: 0, IommuStatus.INITIALIZING: -1, IommuStatus.INITIALIZED: 1}[self.status]

    @staticmethod
    def unlocked() -> AbstractContextManager[Any]:
        """A lock that does nothing (only for showing that the real one is needed)."""
        return nullcontext()
