"""Isolation invariants of a running machine, read the way the hardware reads it.

``check(platform)`` looks at what devices can actually do, never at what the driver believes:

1. **Containment.**  For every device (and phantom function) the DMA engine routes through a unit, the
   vendor's tools adapter reads the unit's context for its source id from registers and memory (or the
   unit's context cache, which wins); the tables it names are walked from memory and every translation
   must land where the device's owner may reach (the policy below).  A device that is not translated at
   all reaches everything, which only the hardware domain may do (pass-through mode, IOMMU off).
2. **Caches agree with memory.**  Every cached translation (IOTLB, device TLB) is compared with a fresh
   walk of the tables its tag or source id leads to.  A disagreement inside a window the flush ledger
   (``iommu.ledger``) says a caller left unflushed on purpose is a *stale window* (reported, not a
   violation: the caller still owes that flush); anywhere else it is a missing flush, a violation.
3. **Table pages.**  Every table page reachable from a domain's trees must be hypervisor memory and
   reachable from that domain only (no table shared by two domains); every page allocated to a domain's
   tables (its allocator owner, e.g. ``d1:iommu-pt``) must be reachable or queued for the deferred free
   or for a flush the driver is owed (else it is an orphan), and no table page may outlive its domain (a
   leak).

The access policy (what a domain "owns or was granted"):

* a RAM page the domain owns (``machine.pages``), writable by devices only if its type allows device
  writes (no type reference, or a writable type: a PV page-table page is read-only to devices);
* for the hardware domain, every frame that is not RAM (E820 reserved, ACPI and NVS ranges, holes, and
  MMIO beyond RAM: its identity map of reserved regions), and in relaxed mode (not ``dom0-iommu=strict``)
  every RAM frame: relaxed mode trusts the hardware domain with all memory, as Xen's does;
* a range firmware reserved for one of the domain's devices (VT-d RMRR), for that domain;
* a frame the domain's p2m maps at that Dfn as a grant or foreign mapping (grant_map_rw/ro,
  map_foreign; read-only grants read-only);
* a grant the caller declares (``Grant``; scenario files declare them with ``[[grants]]`` or
  ``grant = true`` on a map step).

Everything is vectorised over the coalesced runs of each tree (each tree is read once per check), so a
check of a small machine takes milliseconds: issue 7's state machines call it after every step.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from iommusim.errors import BadAddress
from iommusim.frames import Gfn, Mfn
from iommusim.machine.p2m import P2mType
from iommusim.machine.pages import DOMID_INVALID, DOMID_XEN, E820Type, PageType
from iommusim.pagetable.walk import FrameReader, mappings, walk_tables
from iommusim.perms import Perm
from iommusim.tools.decode import DecodeResult
from iommusim.tools.tables import DEFAULT_MAX_TABLES, MappingIndex, TableRoot, table_frames
from iommusim.tools.vendors import CachedTranslation, ContextMode, DeviceContext, VendorTools, vendor_tools

if TYPE_CHECKING:
    from iommusim.machine.domain import Domain
    from iommusim.machine.pci import PciDevice
    from iommusim.platform import Platform

__all__ = [
    "CacheState",
    "CheckReport",
    "Grant",
    "StaleWindow",
    "Violation",
    "cache_states",
    "check",
    "check_image",
]

TreeKey = tuple[int, int, int, int, int]  # TableRoot.key
_GRANT_TYPES = {P2mType.GRANT_MAP_RW: Perm.RW, P2mType.GRANT_MAP_RO: Perm.R, P2mType.MAP_FOREIGN: Perm.RW}
_OWNER_RE = re.compile(r"^d(\d+):")
_MAX_GRANT_LOOKUPS = 4096  # p2m lookups per offending range before it is reported as it stands


@dataclass(frozen=True)
class Grant:
    """Frames ``[first_mfn, first_mfn + count)`` that domain ``domid``'s devices may reach with ``perms``."""

    domid: int
    first_mfn: int
    count: int
    perms: Perm = Perm.RW
    why: str = ""


@dataclass(frozen=True)
class Violation:
    kind: str  # escape, untranslated, stale-tlb, stale-context, context, shared-table, foreign-table, orphan, leak
    message: str
    domid: int | None = None
    unit: str | None = None
    devices: tuple[str, ...] = ()
    dfn: int | None = None
    mfn: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "domain": self.domid,
            "unit": self.unit,
            "devices": list(self.devices),
            "dfn": None if self.dfn is None else f"{self.dfn:#x}",
            "mfn": None if self.mfn is None else f"{self.mfn:#x}",
        }


@dataclass(frozen=True)
class StaleWindow:
    """A cached translation that memory no longer backs, inside a window a caller owes a flush for."""

    unit: str
    cache: str
    domid: int
    tag: int
    dfn: int
    pages: int
    cached_mfn: int
    perms: Perm
    message: str

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "cache": self.cache,
            "domain": self.domid,
            "tag": self.tag,
            "dfn": f"{self.dfn:#x}",
            "pages": self.pages,
            "cached_mfn": f"{self.cached_mfn:#x}",
            "perms": self.perms.short(),
            "message": self.message,
        }


@dataclass(frozen=True)
class CacheState:
    """How one cached translation compares with memory."""

    entry: CachedTranslation
    state: str  # ok, stale (a flush is owed), violation (a missing flush), hidden (a stale not-present), unused
    message: str
    domid: int | None = None
    dfn: int | None = None
    mfn: int | None = None
    window: StaleWindow | None = None


_RANK = {"ok": 0, "unused": 1, "hidden": 2, "stale": 3, "violation": 4}


@dataclass
class CheckReport:
    violations: list[Violation] = field(default_factory=list)
    stale: list[StaleWindow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def kinds(self) -> set[str]:
        return {v.kind for v in self.violations}

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "violations": [v.to_json() for v in self.violations],
            "stale_windows": [s.to_json() for s in self.stale],
            "notes": self.notes,
            "stats": self.stats,
        }


def _ranges(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """(start, count) of every run of True."""
    if not mask.any():
        return []
    padded = np.concatenate(([False], mask, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


@dataclass
class _DeviceUse:
    """Which devices reach one tree (or reach memory untranslated) on behalf of one domain."""

    devices: list[str] = field(default_factory=list)
    units: set[str] = field(default_factory=set)


class _Checker:
    def __init__(self, platform: Platform, grants: Sequence[Grant], max_reports: int) -> None:
        self.p = platform
        self.m = platform.machine
        self.tools: VendorTools = vendor_tools(platform.vendor)
        self.grants = list(grants)
        self.max_reports = max_reports
        self.report = CheckReport()
        self._indexes: dict[TreeKey, MappingIndex] = {}
        self._frames: dict[TreeKey, list[int]] = {}
        self._walk_errors: dict[TreeKey, str] = {}
        self.ram = self.m.pages.frames
        self.stats: defaultdict[str, int] = defaultdict(int)
        self.dropped: defaultdict[str, int] = defaultdict(int)
        # filled by device_contexts(): every translating tree, and the trees behind each cache tag and source id
        self.tree_of: dict[TreeKey, TableRoot] = {}
        self.by_tag: defaultdict[tuple[str, int], set[tuple[int | None, TreeKey]]] = defaultdict(set)
        self.by_source: dict[tuple[str, int], tuple[int | None, DeviceContext]] = {}
        # filled by allowed_masks(): frames beyond RAM a domain may reach (reserved regions, grants), as
        # (first, end, writable); the RAM masks cannot hold them
        self.beyond_ok: dict[int, list[tuple[int, int, bool]]] = {}

    # -- helpers -----------------------------------------------------------------------------------------

    def violation(self, v: Violation) -> None:
        same = sum(1 for x in self.report.violations if x.kind == v.kind)
        if same < self.max_reports:
            self.report.violations.append(v)
            return
        self.dropped[v.kind] += 1
        if self.dropped[v.kind] == 1:
            self.report.notes.append(
                f"more {v.kind} violations were found; only the first {self.max_reports} are listed"
            )

    def index(self, tables: TableRoot) -> MappingIndex | None:
        key = tables.key
        if key in self._indexes:
            return self._indexes[key]
        self.frames(tables)  # the tree's shape first: no loop, no shared subtree, nothing outside memory
        if key in self._walk_errors:
            return None
        problems: list[str] = []
        try:
            runs = mappings(
                self.m.memory,
                tables.fmt,
                tables.root_mfn,
                tables.levels,
                root_pages=tables.root_pages,
                problems=problems,
                root_perms=tables.perms,
            )
        except BadAddress as exc:
            self._walk_errors[key] = exc.message
            return None
        for p in problems:
            self.violation(Violation("corrupt-table", f"{tables.describe()}: {p}"))
        idx = MappingIndex(runs)
        self._indexes[key] = idx
        self.stats["trees"] += 1
        self.stats["mapped_pages"] += idx.pages
        return idx

    def frames(self, tables: TableRoot) -> list[int]:
        key = tables.key
        if key not in self._frames:
            try:
                self._frames[key] = table_frames(self.m.memory, tables)
            except BadAddress as exc:
                self._walk_errors[key] = exc.message
                self._frames[key] = []
        return self._frames[key]

    def who(self, mfn: int) -> str:
        """Who owns a machine frame now, in words."""
        if mfn >= self.ram:
            return "no RAM (MMIO or a hole)"
        owner = int(self.m.pages.owner[mfn])
        if owner == DOMID_XEN:
            what = self.m.allocator.owner_of(Mfn(mfn))
            return f"the hypervisor ({what})" if what else "the hypervisor"
        if owner == DOMID_INVALID:
            return "nobody (a free page)"
        return f"d{owner}"

    def domain_name(self, domid: int | None) -> str:
        return "no domain" if domid is None else f"d{domid}"

    # -- 1. containment -------------------------------------------------------------------------------

    def device_contexts(self) -> dict[tuple[int | None, TreeKey | None], _DeviceUse]:
        """Walk every routed device to its context; report the untranslated ones; group the rest by tree."""
        uses: dict[tuple[int | None, TreeKey | None], _DeviceUse] = {}
        units = {u.name: u for u in self.p.units}
        cfg = self.p.iommu.config
        for dev in self.m.pci:
            for devfn in [dev.sbdf.devfn, *dev.phantom_devfns]:
                name = str(dev.sbdf.with_devfn(devfn))
                owner = dev.owner.domid if dev.owner is not None else None
                route = self.m.dma.route_of(dev, None if devfn == dev.sbdf.devfn else devfn)
                self.stats["device_functions"] += 1
                if route is None:
                    ctx = DeviceContext("-", dev.sbdf.bdf, ContextMode.UNTRANSLATED, detail="no IOMMU in front of it")
                else:
                    ctx = self.tools.context(self.p, units[route.unit.name], route.source_id)
                    self.by_source[(route.unit.name, route.source_id)] = (owner, ctx)
                for problem in ctx.problems:
                    kind = "stale-context" if "context cache" in problem else "context"
                    self.violation(Violation(kind, f"{name}: {problem}", owner, ctx.unit, (name,)))
                if not dev.bus_master:
                    self.stats["bus_master_off"] += 1
                    continue
                if ctx.mode in (ContextMode.UNTRANSLATED, ContextMode.PASSTHROUGH):
                    self.untranslated(dev, name, owner, ctx, cfg.hwdom_passthrough or not self.p.iommu.enabled)
                    continue
                if ctx.mode != ContextMode.TRANSLATED or ctx.tables is None:
                    continue
                key = ctx.tables.key
                self.tree_of[key] = ctx.tables
                if ctx.tag is not None:
                    self.by_tag[(ctx.unit, ctx.tag)].add((owner, key))
                use = uses.setdefault((owner, key), _DeviceUse())
                use.devices.append(name)
                use.units.add(ctx.unit)
        return uses

    def untranslated(self, dev: PciDevice, name: str, owner: int | None, ctx: DeviceContext, by_design: bool) -> None:
        d = dev.owner
        why = ctx.detail or ctx.mode.value
        if d is not None and d.is_hardware and by_design:
            self.report.notes.append(f"{name} ({d}) is not translated ({why}): the hardware domain reaches all memory")
            return
        self.violation(
            Violation(
                "untranslated",
                f"{name} ({self.domain_name(owner)}) is not translated ({why}): it reaches all of memory",
                owner,
                ctx.unit,
                (name,),
            )
        )

    def allowed_masks(self, d: Domain | None) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_], bool]:
        """(may read or write, may write) over RAM frames, and whether frames beyond RAM are allowed."""
        pages = self.m.pages
        if d is None:
            none = np.zeros(self.ram, dtype=bool)
            return none, none, False
        own = pages.owner == d.domid
        own_w = own & ((pages.type_count == 0) | (pages.ptype == int(PageType.WRITABLE)))
        any_ok, w_ok = own.copy(), own_w.copy()
        beyond = False
        cfg = self.p.iommu.config
        if d.is_hardware:
            beyond = True
            etype = self.m.e820.types_of(np.arange(self.ram, dtype=np.int64))
            not_ram = etype != int(E820Type.RAM)
            any_ok |= not_ram
            w_ok |= not_ram
            if not cfg.hwdom_strict or cfg.hwdom_passthrough:
                any_ok[:] = True
                w_ok[:] = True
        owned_devices = {str(dev.sbdf) for dev in d.pci_devices}
        extra = self.beyond_ok.setdefault(d.domid, [])
        for r in self.tools.reserved_regions(self.p):
            if not r.devices or owned_devices & set(r.devices):
                lo, hi = min(r.first_mfn, self.ram), min(r.first_mfn + r.count, self.ram)
                any_ok[lo:hi] = True
                w_ok[lo:hi] = True
                if r.first_mfn + r.count > self.ram:
                    extra.append((max(r.first_mfn, self.ram), r.first_mfn + r.count, True))
        for g in self.grants:
            if g.domid == d.domid:
                lo, hi = min(g.first_mfn, self.ram), min(g.first_mfn + g.count, self.ram)
                any_ok[lo:hi] = True
                if g.perms & Perm.W:
                    w_ok[lo:hi] = True
                if g.first_mfn + g.count > self.ram:
                    extra.append((max(g.first_mfn, self.ram), g.first_mfn + g.count, bool(g.perms & Perm.W)))
        return any_ok, w_ok, beyond

    def p2m_granted(self, d: Domain | None, dfn: int, mfn: int, write: bool) -> bool:
        if d is None or d.p2m is None:
            return False
        e = d.p2m.lookup(Gfn(dfn))
        if e is None or e.mfn.value != mfn:
            return False
        perms = _GRANT_TYPES.get(e.type)
        return perms is not None and (not write or bool(perms & Perm.W))

    def containment(self, uses: dict[tuple[int | None, TreeKey | None], _DeviceUse]) -> None:
        masks: dict[int | None, tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_], bool]] = {}
        for (owner, key), use in uses.items():
            if key is None:
                continue
            tables = self.tree_of[key]
            idx = self.index(tables)
            if idx is None:
                self.violation(
                    Violation(
                        "corrupt-table",
                        f"{', '.join(use.devices)}: {tables.describe()}: {self._walk_errors[tables.key]}",
                        owner,
                        devices=tuple(use.devices),
                    )
                )
                continue
            d = self.m.domains.get(owner) if owner is not None else None
            if owner not in masks:
                masks[owner] = self.allowed_masks(d)
            any_ok, w_ok, beyond = masks[owner]
            for run in idx.runs:
                self.check_run(d, owner, use, run.dfn, run.mfn, run.pages, run.perms, any_ok, w_ok, beyond)

    def check_run(
        self,
        d: Domain | None,
        owner: int | None,
        use: _DeviceUse,
        dfn: int,
        mfn: int,
        pages: int,
        perms: Perm,
        any_ok: npt.NDArray[np.bool_],
        w_ok: npt.NDArray[np.bool_],
        beyond: bool,
    ) -> None:
        lo, hi = mfn, min(mfn + pages, self.ram)
        bad = np.zeros(max(0, hi - lo), dtype=bool)
        if hi > lo:
            bad |= ~any_ok[lo:hi]
            if perms & Perm.W:
                bad |= ~w_ok[lo:hi]
        for start, count in _ranges(bad):
            self.escape(d, owner, use, dfn + start, mfn + start, count, perms)
        if mfn + pages > self.ram and not beyond:
            first = max(mfn, self.ram)
            for lo, hi in self.beyond_not_allowed(owner, first, mfn + pages, bool(perms & Perm.W)):
                self.escape(d, owner, use, dfn + (lo - mfn), lo, hi - lo, perms)

    def beyond_not_allowed(self, owner: int | None, first: int, end: int, write: bool) -> list[tuple[int, int]]:
        """The parts of ``[first, end)`` (beyond RAM) no reserved region or grant of the owner covers."""
        left = [(first, end)]
        for lo, hi, writable in self.beyond_ok.get(owner, []) if owner is not None else []:
            if write and not writable:
                continue
            left = [piece for a, b in left for piece in ((a, min(b, lo)), (max(a, hi), b)) if piece[0] < piece[1]]
        return left

    def escape(
        self, d: Domain | None, owner: int | None, use: _DeviceUse, dfn: int, mfn: int, n: int, perms: Perm
    ) -> None:
        """Report the frames of an offending range that no grant mapping in the domain's p2m explains."""
        write = bool(perms & Perm.W)
        if d is not None and d.p2m is not None and n <= _MAX_GRANT_LOOKUPS:
            keep = np.array([not self.p2m_granted(d, dfn + i, mfn + i, write) for i in range(n)], dtype=bool)
            for start, count in _ranges(keep):
                self.report_escape(owner, use, dfn + start, mfn + start, count, perms)
            return
        self.report_escape(owner, use, dfn, mfn, n, perms)

    def report_escape(self, owner: int | None, use: _DeviceUse, dfn: int, mfn: int, n: int, perms: Perm) -> None:
        verb = "write" if perms & Perm.W else "read"
        devs = ", ".join(use.devices)
        span = f"mfn {mfn:#x}" if n == 1 else f"mfn {mfn:#x}-{mfn + n - 1:#x}"
        at = f"dfn {dfn:#x}" if n == 1 else f"dfn {dfn:#x}-{dfn + n - 1:#x}"
        owners = sorted({self.who(f) for f in (mfn, mfn + n - 1)})
        msg = f"{devs} ({self.domain_name(owner)}) can {verb} {span} at {at}, which belongs to {' and '.join(owners)}"
        self.violation(Violation("escape", msg, owner, ",".join(sorted(use.units)), tuple(use.devices), dfn, mfn))

    # -- 2. caches --------------------------------------------------------------------------------------

    def targets(self, e: CachedTranslation) -> set[tuple[int | None, TreeKey]]:
        """The (owner, tree) pairs a cached translation belongs to, through its tag or source id."""
        if e.by_source:
            found = self.by_source.get((e.unit, e.tag))
            if found is None or found[1].tables is None:
                return set()
            self.tree_of.setdefault(found[1].tables.key, found[1].tables)
            return {(found[0], found[1].tables.key)}
        return self.by_tag.get((e.unit, e.tag), set())

    def classify(self, e: CachedTranslation) -> CacheState:
        """Compare one cached translation with memory: ok, stale (a flush is owed), violation, or unused."""
        targets = self.targets(e)
        if not targets:
            what = "source id" if e.by_source else "tag"
            return CacheState(e, "unused", f"no device's context uses {what} {e.tag:#x}")
        worst = CacheState(e, "ok", "agrees with memory")
        for owner, key in sorted(targets, key=lambda t: (-1 if t[0] is None else t[0], t[1])):
            state = self.compare(e, owner, key)
            if _RANK[state.state] > _RANK[worst.state]:
                worst = state
        return worst

    def caches(self) -> None:
        unused: defaultdict[tuple[str, str, int], int] = defaultdict(int)
        for e in self.tools.cached_translations(self.p):
            self.stats["cached_translations"] += 1
            state = self.classify(e)
            if state.state == "unused":
                unused[(e.unit, e.cache, e.tag)] += 1
            elif state.state == "stale" and state.window is not None:
                self.report.stale.append(state.window)
            elif state.state == "violation":
                self.violation(Violation("stale-tlb", state.message, state.domid, e.unit, dfn=state.dfn, mfn=state.mfn))
            elif state.state == "hidden":
                self.report.notes.append(state.message)
        for (unit, cache, tag), n in sorted(unused.items()):
            what = "source id" if cache == "device-tlb" else "tag"
            entries = f"{n} entr{'y' if n == 1 else 'ies'}"
            self.report.notes.append(f"{unit} {cache}: {entries} under {what} {tag:#x}, which no device's context uses")

    def compare(self, e: CachedTranslation, owner: int | None, key: TreeKey) -> CacheState:
        idx = self.index(self.tree_of[key])
        if idx is None:
            return CacheState(e, "ok", "its tables cannot be read (reported as corrupt)")
        if e.negative:
            if idx.overlapping(e.dfn, e.dfn + e.pages):
                msg = f"{e.unit} {e.cache}: a cached not-present entry for dfn {e.dfn:#x} hides a mapping (DMA faults)"
                return CacheState(e, "hidden", msg, owner)
            return CacheState(e, "ok", "not present, as in memory")
        bad = idx.disagreement(e.dfn, e.pages, e.maddr >> 12, e.perms)
        if not bad:
            return CacheState(e, "ok", "agrees with memory")
        pending = self.p.iommu.ledger.pending(owner) if owner is not None else []
        covered = all(any(lo <= a and a + n <= lo + cnt for lo, cnt in pending) for a, n in bad)
        a0, n0 = bad[0]
        now = idx.lookup(a0)
        cached_mfn = (e.maddr >> 12) + (a0 - e.dfn)
        memory = "no mapping" if now is None else f"mfn {now[0]:#x} {now[1].short()}"
        size = f"{1 << (e.page_shift - 10)}K" if e.page_shift < 20 else f"{1 << (e.page_shift - 20)}M"
        where = f"{e.unit} {e.cache} entry (tag {e.tag:#x}, {self.domain_name(owner)}, {size})"
        said = f"dfn {a0:#x} -> mfn {cached_mfn:#x} {e.perms.short()}"
        landed = f"mfn {cached_mfn:#x} now belongs to {self.who(cached_mfn)}"
        if covered and owner is not None:
            msg = f"{where} still says {said}; memory says {memory}; the flush is owed ({landed})"
            window = StaleWindow(e.unit, e.cache, owner, e.tag, a0, n0, cached_mfn, e.perms, msg)
            return CacheState(e, "stale", msg, owner, a0, cached_mfn, window)
        msg = f"{where} still says {said} but memory says {memory}, and no flush is outstanding ({landed})"
        return CacheState(e, "violation", msg, owner, a0, cached_mfn)

    # -- 3. table pages ---------------------------------------------------------------------------------

    def tables(self) -> None:
        reach: defaultdict[int, set[int]] = defaultdict(set)  # frame -> domains reaching it
        domain_frames: defaultdict[int, set[int]] = defaultdict(set)
        fmt_for: dict[int, TableRoot] = {}
        roots: list[tuple[int, TableRoot]] = []
        for d in self.m.domains.values():
            t = self.tools.domain_tables(self.p, d)
            if t is not None:
                roots.append((d.domid, t))
        for owner, key in {(o, k) for (u, _), s in self.by_tag.items() for (o, k) in s}:
            if owner is not None:
                roots.append((owner, self.tree_of[key]))
        for domid, t in roots:
            fmt_for.setdefault(domid, t)
            for f in self.frames(t):
                reach[f].add(domid)
                domain_frames[domid].add(f)
        pages = self.m.pages
        for f, doms in sorted(reach.items()):
            self.stats["table_pages"] += 1
            if len(doms) > 1:
                names = " and ".join(f"d{x}" for x in sorted(doms))
                self.violation(
                    Violation("shared-table", f"table page {f << 12:#x} is reachable from both {names}", mfn=f)
                )
            if f < self.ram and int(pages.owner[f]) != DOMID_XEN:
                self.violation(
                    Violation(
                        "foreign-table",
                        f"table page {f << 12:#x} of {' and '.join(f'd{x}' for x in sorted(doms))} is not hypervisor "
                        f"memory: it belongs to {self.who(f)}",
                        mfn=f,
                    )
                )
        pending: set[int] = set()
        any_root = next((t for _, t in roots), None)
        queued = [(mfn.value, level) for mfn, level in self.p.iommu.deferred_frees()]
        for frame0, level in queued + self.tools.pending_frees(self.p):
            pending.add(frame0)
            if any_root is not None and level > 1:
                try:
                    for frame, *_ in walk_tables(self.m.memory, any_root.fmt, frame0, level, max_tables=1 << 16):
                        pending.add(frame)
                except BadAddress:
                    pass
        if pending:
            self.report.notes.append(f"{len(pending)} table page(s) wait for the deferred free")
        alloc = self.m.allocator
        for owner_name in sorted(alloc.in_use):
            match = _OWNER_RE.match(owner_name)
            if not match:
                continue
            domid = int(match[1])
            if owner_name != self.tools.table_owner(domid):
                continue
            frames = [f.value for f in alloc.frames_of(owner_name)]
            if domid not in self.m.domains:
                self.violation(
                    Violation(
                        "leak",
                        f"{len(frames)} table page(s) of d{domid}, which no longer exists, are still allocated "
                        f"({owner_name}, first at {frames[0] << 12:#x})",
                        domid,
                        mfn=frames[0],
                    )
                )
                continue
            orphans = [f for f in frames if f not in domain_frames[domid] and f not in pending]
            if orphans:
                self.violation(
                    Violation(
                        "orphan",
                        f"{len(orphans)} table page(s) of d{domid} ({owner_name}) are reachable from none of its trees "
                        f"and not queued for freeing, first at {orphans[0] << 12:#x}",
                        domid,
                        mfn=orphans[0],
                    )
                )


def cache_states(platform: Platform) -> list[CacheState]:
    """Every cached translation of the machine with how it compares with memory (for dumps)."""
    c = _Checker(platform, [], 20)
    c.device_contexts()
    return [c.classify(e) for e in c.tools.cached_translations(platform)]


def check(
    platform: Platform,
    *,
    grants: Iterable[Grant] = (),
    containment: bool = True,
    caches: bool = True,
    tables: bool = True,
    max_reports: int = 20,
) -> CheckReport:
    """Check the isolation invariants of ``platform`` now (see the module docstring for the policy)."""
    c = _Checker(platform, list(grants), max_reports)
    uses = c.device_contexts()
    if containment:
        c.containment(uses)
    if caches:
        c.caches()
    if tables:
        c.tables()
    c.report.stats = dict(c.stats)
    return c.report


def check_image(result: DecodeResult, reader: FrameReader, *, max_tables: int = DEFAULT_MAX_TABLES) -> CheckReport:
    """What can be checked in a memory image without knowing who owns its pages.

    Every problem the decoder met is a ``corrupt-table`` violation; table pages reachable from two of the
    address spaces the decoder found (two domain ids, or two roots) are ``shared-table``; a translation
    that reaches any table page of the image is an ``escape`` (a device that can write tables can map
    itself anything).
    """
    report = CheckReport()
    for p in result.all_problems:
        report.violations.append(Violation("corrupt-table", p))
    owners: defaultdict[int, set[str]] = defaultdict(set)
    for space in result.spaces:
        if space.tables is None:
            continue
        try:
            for f in table_frames(reader, space.tables, max_tables=max_tables):
                owners[f].add(space.label)
        except BadAddress as exc:
            report.violations.append(Violation("corrupt-table", f"{space.label}: {exc.message}"))
    shared: defaultdict[frozenset[str], list[int]] = defaultdict(list)
    for f, labels in sorted(owners.items()):
        if len(labels) > 1:  # two address spaces (two domain ids, two roots) reach one table page
            shared[frozenset(labels)].append(f)
    for spaces, frames_of in shared.items():
        report.violations.append(
            Violation(
                "shared-table",
                f"{len(frames_of)} table page(s), first at {frames_of[0] << 12:#x}, are reachable from "
                f"{' and '.join(sorted(spaces))}",
                mfn=frames_of[0],
            )
        )
    frames = np.array(sorted(owners), dtype=np.int64)
    for space in result.spaces:
        for m in space.mappings:
            lo = int(np.searchsorted(frames, m.mfn))
            hi = int(np.searchsorted(frames, m.mfn + m.pages))
            for f in frames[lo:hi].tolist():
                verb = "write" if m.perms & Perm.W else "read"
                dfn = m.dfn + (f - m.mfn)
                users = f" ({', '.join(space.sources)})" if space.sources else ""
                report.violations.append(
                    Violation(
                        "escape",
                        f"{space.label}{users} can {verb} the table page {f << 12:#x} at dfn {dfn:#x}",
                        devices=tuple(space.sources),
                        dfn=dfn,
                        mfn=f,
                    )
                )
    report.stats = {
        "address_spaces": len(result.spaces),
        "table_pages": len(owners),
        "mapped_pages": sum(s.pages for s in result.spaces),
    }
    return report
