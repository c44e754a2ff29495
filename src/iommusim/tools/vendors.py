"""What the tools need from each vendor, and the registry vendors plug their piece into.

The tools (dump, check, plot, the scenario runner) are vendor-neutral: they reach a vendor's hardware only
through a ``VendorTools`` object, registered here by module path exactly as ``platform.VENDORS`` registers
platform builders, so that a vendor whose module is not installed is simply not available.  A vendor
provides:

* ``context(platform, unit, source_id)``: what the unit does with a source id's requests, read the way the
  hardware reads it (registers, then root/context/device/stream tables in memory, never a driver object):
  translated through which tables and under which cache tag, passed through, blocked, or untranslated;
* ``contexts(platform)``: every such context the hardware holds, for dumps;
* ``domain_tables(platform, d)``: where the driver keeps a domain's tables (what Xen's "dump IOMMU page
  tables" key reads), for dumps of domains without a device;
* ``table_owner(domid)``: the allocator owner of a domain's table pages (orphan and leak checks);
* ``pending_frees(platform)``: table pages the driver unhooked and frees once a flush it is owed is done
  (not orphans), as (frame, level);
* ``iotlbs``/``cached_translations``/``cache_summaries``: the translation caches to compare with memory;
* ``fault_reasons(record)``: the names a scenario may use to expect a fault (vendor reason codes);
* ``reserved_regions(platform)``: ranges firmware asks to identity-map for devices (RMRR, IVMD);
* ``decode_targets(platform)``: how to decode this machine's tables from a memory image (``iommusim decode``
  arguments), which also lets the tests run every image format against a live machine.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from iommusim.errors import NoDevice
from iommusim.hw.base import DmaRemapper
from iommusim.hw.iotlb import Iotlb
from iommusim.perms import Perm
from iommusim.tools.tables import TableRoot

if TYPE_CHECKING:
    from iommusim.machine.domain import Domain
    from iommusim.platform import Platform

__all__ = [
    "KNOWN_VENDORS",
    "TOOL_ADAPTERS",
    "VENDOR_TITLES",
    "CacheSummary",
    "CachedTranslation",
    "ContextMode",
    "DecodeTarget",
    "DeviceContext",
    "ReservedRegion",
    "VendorTools",
    "iotlb_translations",
    "vendor_tools",
]

#: Every vendor a scenario may name, installed or not (a scenario may list vendors not merged yet).
KNOWN_VENDORS: tuple[str, ...] = ("vtd", "amd", "smmu")
VENDOR_TITLES: dict[str, str] = {"vtd": "Intel VT-d", "amd": "AMD-Vi", "smmu": "ARM SMMU"}

#: vendor name -> "module:attribute" of its ``VendorTools``.
TOOL_ADAPTERS: dict[str, str] = {}
TOOL_ADAPTERS["vtd"] = "iommusim.tools.adapters.vtd:ADAPTER"
TOOL_ADAPTERS["smmu"] = "iommusim.tools.adapters.smmu:ADAPTER"
TOOL_ADAPTERS["amd"] = "iommusim.tools.adapters.amd:ADAPTER"


class ContextMode(Enum):
    """What a unit does with one source id's untranslated requests."""

    TRANSLATED = "translated"  # walks tables
    PASSTHROUGH = "passthrough"  # the unit lets the address through as it is (a context saying so)
    BLOCKED = "blocked"  # every request faults
    UNTRANSLATED = "untranslated"  # nothing translates it: the unit is off or bypassed, or no unit at all


@dataclass(frozen=True)
class DeviceContext:
    """One source id on one unit, as the hardware sees it."""

    unit: str
    source_id: int
    mode: ContextMode
    tag: int | None = None  # what the unit tags cached translations with (domain id, VMID)
    tables: TableRoot | None = None
    detail: str = ""  # vendor words: "did 1, T=0, AW=2", "SMR 0 -> CB 0, VMID 1"
    problems: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "source_id": f"{self.source_id:#06x}",
            "mode": self.mode.value,
            "tag": self.tag,
            "tables": self.tables.to_json() if self.tables else None,
            "detail": self.detail,
            "problems": list(self.problems),
        }


@dataclass(frozen=True)
class CachedTranslation:
    """One cached translation: a page of input addresses and where the cache says it goes."""

    unit: str
    cache: str  # "iotlb", "device-tlb"
    tag: int
    daddr: int  # input address of the page
    page_shift: int
    maddr: int  # output address of the page
    perms: Perm
    by_source: bool = False  # ``tag`` is a source id (a device's own TLB) rather than a domain tag
    negative: bool = False  # a cached "not present"

    @property
    def dfn(self) -> int:
        return self.daddr >> 12

    @property
    def pages(self) -> int:
        return 1 << (self.page_shift - 12)


@dataclass(frozen=True)
class CacheSummary:
    unit: str
    name: str
    entries: int
    capacity: int | None = None


@dataclass(frozen=True)
class ReservedRegion:
    """Frames firmware asks to identity-map for some devices (VT-d RMRR, AMD IVMD)."""

    first_mfn: int
    count: int
    devices: tuple[str, ...] = ()  # PCI addresses; empty: every device


@dataclass(frozen=True)
class DecodeTarget:
    """Arguments of ``iommusim decode`` that read one of this machine's trees back from an image."""

    format: str
    root: int  # machine address given to --root
    options: dict[str, int] = field(default_factory=dict)
    label: str = ""
    domid: int | None = None  # the domain whose tables this is, when it is one domain's tree


class VendorTools(Protocol):
    vendor: str

    def context(self, platform: Platform, unit: DmaRemapper, source_id: int) -> DeviceContext: ...

    def contexts(self, platform: Platform) -> list[DeviceContext]: ...

    def domain_tables(self, platform: Platform, d: Domain) -> TableRoot | None: ...

    def table_owner(self, domid: int) -> str: ...

    def pending_frees(self, platform: Platform) -> list[tuple[int, int]]: ...

    def iotlbs(self, platform: Platform) -> dict[str, Iotlb]: ...

    def cached_translations(self, platform: Platform) -> list[CachedTranslation]: ...

    def cache_summaries(self, platform: Platform) -> list[CacheSummary]: ...

    def fault_reasons(self, record: object) -> list[str]: ...

    def reserved_regions(self, platform: Platform) -> list[ReservedRegion]: ...

    def decode_targets(self, platform: Platform) -> list[DecodeTarget]: ...


def iotlb_translations(unit: str, iotlb: Iotlb, cache: str = "iotlb") -> list[CachedTranslation]:
    """The entries of a shared-design IOTLB (``hw.iotlb.Iotlb``), least recently used first."""
    return [
        CachedTranslation(unit, cache, e.tag, e.daddr, e.page_shift, e.out, e.perms, negative=e.negative)
        for e in iotlb.entries()
    ]


def vendor_tools(vendor: str) -> VendorTools:
    """The tools adapter of an installed vendor; ENODEV if the vendor has none (yet)."""
    target = TOOL_ADAPTERS.get(vendor)
    if target is None:
        raise NoDevice(f"no tool support is registered for vendor {vendor!r} (tools know: {', '.join(TOOL_ADAPTERS)})")
    module, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise NoDevice(f"the {vendor} tool support cannot be loaded: {exc}") from None
    adapter: VendorTools = getattr(mod, attr)
    return adapter
