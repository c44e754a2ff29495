"""A machine's IOMMU state as Xen's "dump IOMMU page tables" key would show it, and a little more.

For each domain: where its tables are (what the driver keeps, as Xen's key reads it), the contexts its
devices have in the hardware, the tree of table pages, the coalesced list of mappings (Dfn range -> Mfn
range, permissions, page size) read back from memory, and the windows it still owes a flush for.  For the
machine: every cached translation with its state against memory (ok, stale while a flush is owed, or stale
with no flush outstanding), the size of the other caches, and every unit's counters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from iommusim.errors import BadAddress, NoSuchDomain
from iommusim.pagetable.walk import Mapping
from iommusim.tools.check import CacheState, cache_states
from iommusim.tools.tables import TableRoot, TableTree, build_tree, mapping_json, table_mappings
from iommusim.tools.vendors import CacheSummary, ContextMode, DeviceContext, vendor_tools

if TYPE_CHECKING:
    from iommusim.platform import Platform

__all__ = ["DomainDump", "MachineDump", "dump_platform"]


@dataclass
class DomainDump:
    domid: int
    name: str
    kind: str
    state: str
    hardware: bool
    iommu: str  # the domain's IOMMU status
    tables: TableRoot | None = None
    devices: list[tuple[str, DeviceContext]] = field(default_factory=list)
    tree: TableTree | None = None
    mappings: list[Mapping] = field(default_factory=list)
    owed: list[tuple[int, int]] = field(default_factory=list)  # (first dfn, count) still to flush
    problems: list[str] = field(default_factory=list)

    @property
    def pages(self) -> int:
        return sum(m.pages for m in self.mappings)

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domid,
            "name": self.name,
            "kind": self.kind,
            "state": self.state,
            "hardware": self.hardware,
            "iommu": self.iommu,
            "tables": self.tables.to_json() if self.tables else None,
            "devices": [{"device": n, **c.to_json()} for n, c in self.devices],
            "tree": self.tree.to_json() if self.tree else None,
            "pages": self.pages,
            "mappings": [mapping_json(m) for m in self.mappings],
            "owed_flushes": [{"dfn": f"{a:#x}", "pages": n} for a, n in self.owed],
            "problems": self.problems,
        }


@dataclass
class MachineDump:
    vendor: str
    domains: list[DomainDump]
    caches: list[CacheState]
    cache_sizes: list[CacheSummary]
    counters: dict[str, dict[str, int]]

    def to_json(self) -> dict[str, Any]:
        return {
            "vendor": self.vendor,
            "domains": [d.to_json() for d in self.domains],
            "caches": [
                {
                    "unit": c.entry.unit,
                    "cache": c.entry.cache,
                    "tag": c.entry.tag,
                    "by_source": c.entry.by_source,
                    "daddr": f"{c.entry.daddr:#x}",
                    "page_size": 1 << c.entry.page_shift,
                    "maddr": f"{c.entry.maddr:#x}",
                    "perms": c.entry.perms.short(),
                    "negative": c.entry.negative,
                    "state": c.state,
                    "detail": c.message,
                }
                for c in self.caches
            ],
            "cache_sizes": [
                {"unit": s.unit, "cache": s.name, "entries": s.entries, "capacity": s.capacity}
                for s in self.cache_sizes
            ],
            "counters": self.counters,
        }


def dump_platform(
    platform: Platform,
    *,
    domains: Iterable[int] | None = None,
    tree: bool = True,
    caches: bool = True,
    max_nodes: int = 256,
) -> MachineDump:
    """Everything ``iommusim dump`` shows, for the chosen domains (default: every domain)."""
    tools = vendor_tools(platform.vendor)
    m = platform.machine
    if domains is None:
        chosen = sorted(m.domains.values(), key=lambda d: d.domid)
    else:
        chosen = []
        for domid in domains:
            if domid not in m.domains:
                known = ", ".join(f"d{x}" for x in sorted(m.domains)) or "none"
                raise NoSuchDomain(f"there is no domain d{domid} (domains: {known})")
            chosen.append(m.domains[domid])
    units = {u.name: u for u in platform.units}
    out: list[DomainDump] = []
    for d in chosen:
        st = d.iommu
        status = getattr(getattr(st, "status", None), "value", "none")
        dd = DomainDump(d.domid, d.name, d.kind.value, d.state.value, d.is_hardware, status)
        dd.tables = tools.domain_tables(platform, d)
        for dev in d.pci_devices:
            route = m.dma.route_of(dev)
            if route is None:
                ctx = DeviceContext("-", dev.sbdf.bdf, ContextMode.UNTRANSLATED, detail="no IOMMU in front of it")
            else:
                ctx = tools.context(platform, units[route.unit.name], route.source_id)
            dd.devices.append((str(dev.sbdf), ctx))
        if dd.tables is None:  # no driver-side tables: show the tree the first translating device uses
            dd.tables = next((c.tables for _, c in dd.devices if c.tables is not None), None)
        if dd.tables is not None:
            try:
                dd.mappings = table_mappings(m.memory, dd.tables, problems=dd.problems)
                if tree:
                    dd.tree = build_tree(m.memory, dd.tables, max_nodes=max_nodes)
            except BadAddress as exc:
                dd.problems.append(exc.message)
        dd.owed = platform.iommu.ledger.pending(d.domid)
        out.append(dd)
    states = cache_states(platform) if caches else []
    return MachineDump(platform.vendor, out, states, tools.cache_summaries(platform), platform.counters())
