"""Scenario files: a machine, its domains and devices, and steps with expectations, in TOML.

``load_scenario`` reads and validates a file completely before anything runs: unknown keys (with a
suggestion), values of the wrong kind, references to undeclared domains or devices and duplicate step
names are all reported together, each with the file, line and key it is about, as one ``ScenarioError``
(EINVAL: a user's mistake, exit code 2 on the command line).  The format is described in the README
("Using iommusim") and by the example files in ``iommusim/scenarios``.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iommusim.errors import InvalidArgument
from iommusim.machine.domain import DomainKind
from iommusim.machine.pages import PageType
from iommusim.machine.pci import PciDevType
from iommusim.perms import Perm
from iommusim.quirks import QUIRKS
from iommusim.tools.scenario import values as v
from iommusim.tools.scenario.values import BadValue, FrameRef, PerVendor
from iommusim.tools.vendors import KNOWN_VENDORS

__all__ = [
    "STEP_KINDS",
    "DeviceSpec",
    "DomainSpec",
    "GrantSpec",
    "HwdomSpec",
    "MachineSpec",
    "PageTypeSpec",
    "Scenario",
    "ScenarioError",
    "Step",
    "load_scenario",
    "parse_scenario",
]


class ScenarioError(InvalidArgument):
    """The scenario file is malformed; ``problems`` lists every mistake found, each with its place."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        if len(problems) == 1:
            text = f"{head}{problems[0]}"
        else:
            text = f"{head}{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(text)


# -- the model ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PageTypeSpec:
    gfn: int
    count: int
    type: PageType
    type_count: int = 1


@dataclass
class MachineSpec:
    vendor: str | None = None
    memory: int = 512 << 20
    address_width: int = 46
    superpages: tuple[int, ...] = (21, 30)
    iotlb_entries: int = 64
    caching_mode: bool = False
    queued_invalidation: bool = True
    units: int = 1
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # vendor -> its HardwareSpec.extra


@dataclass
class HwdomSpec:
    memory: int = 64 << 20
    kind: DomainKind | None = None
    create: bool = True
    page_types: list[PageTypeSpec] = field(default_factory=list)


@dataclass
class DomainSpec:
    domid: int
    memory: int
    kind: DomainKind = DomainKind.HVM
    align: int = 12  # shift: the domain's memory starts at a multiple of this size
    create: bool = True
    page_types: list[PageTypeSpec] = field(default_factory=list)
    line: int | None = None


@dataclass
class DeviceSpec:
    sbdf: str
    type: PciDevType = PciDevType.PCIE_ENDPOINT
    ats: bool = False
    phantom_stride: int = 0
    stream_ids: tuple[int, ...] = ()
    upstream_bridge: str | None = None
    secondary_bus: int | None = None
    assign: int | None = None


@dataclass(frozen=True)
class GrantSpec:
    domid: int
    mfn: int | FrameRef
    count: int = 1
    perms: Perm = Perm.RW
    why: str = ""


@dataclass
class Step:
    index: int  # 1-based position in the file
    do: str
    args: dict[str, Any]
    name: str | None = None
    note: str | None = None
    vendors: tuple[str, ...] | None = None
    line: int | None = None

    def get(self, key: str, vendor: str, default: Any = None) -> Any:
        """The step's value for ``key`` on ``vendor`` (per-vendor tables resolved), or ``default``."""
        value = self.args.get(key, default)
        if isinstance(value, PerVendor):
            return value.pick(vendor, default)
        return value

    def has(self, key: str, vendor: str) -> bool:
        return self.get(key, vendor, _MISSING) is not _MISSING

    @property
    def label(self) -> str:
        return f"step {self.index}" + (f" ({self.name})" if self.name else "") + f" [{self.do}]"


_MISSING = object()


@dataclass
class Scenario:
    name: str
    description: str = ""
    source: str = ""  # file name (or "<text>")
    vendors: tuple[str, ...] | None = None  # None: every installed vendor
    expected_failure: str | None = None
    machine: MachineSpec = field(default_factory=MachineSpec)
    iommu: dict[str, Any] = field(default_factory=dict)  # IommuConfig fields (+ "cmdline"), per-vendor values allowed
    hardware_domain: HwdomSpec = field(default_factory=HwdomSpec)
    domains: list[DomainSpec] = field(default_factory=list)
    devices: list[DeviceSpec] = field(default_factory=list)
    grants: list[GrantSpec] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)

    def step_index(self, until: str | int) -> int:
        """The 1-based index of a step given by number or by name; EINVAL when there is none."""
        if isinstance(until, int) or (isinstance(until, str) and until.isdigit()):
            n = int(until)
            if 1 <= n <= len(self.steps):
                return n
            raise ScenarioError([f"there is no step {n} (the scenario has {len(self.steps)})"], self.source)
        for s in self.steps:
            if s.name == until:
                return s.index
        names = [s.name for s in self.steps if s.name]
        hint = f"; named steps: {', '.join(names)}" if names else "; no step has a name"
        raise ScenarioError([f"no step is named {until!r}{hint}"], self.source)


# -- step kinds and their keys --------------------------------------------------------------------------------

_ADDR_KEYS = ("dfn", "gfn", "daddr")


@dataclass(frozen=True)
class StepKind:
    keys: dict[str, Callable[[Any], Any]]
    required: tuple[str, ...] = ()
    one_of: tuple[tuple[str, ...], ...] = ()  # exactly one key of each group
    help: str = ""


_PV = v.per_vendor
_DOMAIN = v.integer(0, 0x7FEF)
_COUNT = v.integer(1, 1 << 30)
_ADDR = v.integer(0)
_DFN = v.frame  # a number, or "d1:0x10": the Dfn equal to that machine frame (identity maps)
_EXPECT_ERROR = _PV(v.text)
_COMMON: dict[str, Callable[[Any], Any]] = {
    "do": v.text,
    "name": v.text,
    "note": v.text,
    "vendors": v.list_of(v.choice(*KNOWN_VENDORS)),
    "expect_error": _EXPECT_ERROR,
    "expect_crashed": _PV(v.boolean),
}
_FRAME_RANGE = {"dfn": _ADDR, "gfn": _ADDR, "count": _COUNT, "order": v.integer(0, 18)}

STEP_KINDS: dict[str, StepKind] = {
    "map": StepKind(
        {
            **_FRAME_RANGE,
            "domain": _DOMAIN,
            "mfn": v.frame,
            "perms": v.perms,
            "flush": v.boolean,
            "via": v.choice("auto", "p2m", "iommu"),
            "grant": v.boolean,
            "type": v.p2m_type,
        },
        ("domain", "mfn"),
        (("dfn", "gfn"),),
        "map frames into a domain's DMA view (through its p2m when it is translated, else the IOMMU layer)",
    ),
    "unmap": StepKind(
        {**_FRAME_RANGE, "domain": _DOMAIN, "flush": v.boolean, "via": v.choice("auto", "p2m", "iommu")},
        ("domain",),
        (("dfn", "gfn"),),
        "remove frames from a domain's DMA view; flush = false leaves the flush owed (a stale window)",
    ),
    "flush": StepKind(
        {"domain": _DOMAIN, "dfn": _ADDR, "gfn": _ADDR, "count": _COUNT},
        ("domain",),
        (("dfn", "gfn"),),
        "iommu_iotlb_flush of count pages",
    ),
    "flush-all": StepKind({"domain": _DOMAIN}, ("domain",), (), "iommu_iotlb_flush_all"),
    "dma-read": StepKind(
        {
            "device": v.sbdf,
            "dfn": _DFN,
            "gfn": _ADDR,
            "daddr": _ADDR,
            "offset": v.integer(0, 4095),
            "length": v.integer(1, 1 << 20),
            "devfn": v.integer(0, 255),
            "expect": _PV(v.choice("ok", "fault")),
            "expect_data": _PV(v.data_bytes),
            "expect_hex": _PV(v.hex_bytes),
            "reason": _PV(v.text),
        },
        ("device",),
        (_ADDR_KEYS,),
        "a device reads memory; expect = 'ok' (optionally the data) or 'fault' (optionally its reason)",
    ),
    "dma-write": StepKind(
        {
            "device": v.sbdf,
            "dfn": _DFN,
            "gfn": _ADDR,
            "daddr": _ADDR,
            "offset": v.integer(0, 4095),
            "devfn": v.integer(0, 255),
            "data": v.data_bytes,
            "hex": v.hex_bytes,
            "expect": _PV(v.choice("ok", "fault")),
            "reason": _PV(v.text),
            "expect_in": _PV(v.frame),
        },
        ("device",),
        (_ADDR_KEYS, ("data", "hex")),
        "a device writes memory; expect_in names the machine frame the bytes must land in",
    ),
    "assign": StepKind({"device": v.sbdf, "domain": _DOMAIN}, ("device", "domain"), (), "assign_device"),
    "deassign": StepKind({"device": v.sbdf, "domain": _DOMAIN}, ("device",), (), "deassign_device (to dom0)"),
    "crash": StepKind({"domain": _DOMAIN}, ("domain",), (), "domain_crash"),
    "destroy": StepKind({"domain": _DOMAIN}, ("domain",), (), "destroy a domain (devices go back to dom0)"),
    "create": StepKind({"domain": _DOMAIN}, ("domain",), (), "create a domain declared with create = false"),
    "dump": StepKind(
        {"domain": _DOMAIN, "tree": v.boolean, "caches": v.boolean},
        (),
        (),
        "record the IOMMU tables, caches and counters (shown by run, kept in --json)",
    ),
    "check": StepKind(
        {
            "expect": _PV(v.choice("pass", "violations", "stale")),
            "violations": _PV(v.list_of(v.text)),
            "kinds": _PV(v.list_of(v.text)),
            "stale": _PV(v.integer(0)),
        },
        (),
        (),
        "the isolation check; expect = 'pass' (default), 'stale' (owed flushes only) or 'violations'",
    ),
    "expect-log": StepKind(
        {
            "match": _PV(v.regex),
            "absent": v.boolean,
            "since": v.choice("last", "step", "start"),
            "count": v.integer(0),
        },
        ("match",),
        (),
        "a hypervisor console line matching a regular expression (since the last expect-log by default)",
    ),
    "advance-time": StepKind(
        {"ms": v.integer(0), "ns": v.integer(0)}, (), (("ms", "ns"),), "advance the simulated clock"
    ),
    "fail-alloc": StepKind(
        {"nth": v.integer(1), "owner": v.text, "every": v.boolean, "clear": v.boolean},
        (),
        (),
        "make the nth hypervisor allocation from now fail with ENOMEM (owner: only allocations whose owner "
        "starts with it); clear = true stops failing",
    ),
    "expect-counter": StepKind(
        {
            "counter": _PV(v.text),
            "unit": v.text,
            "min": _PV(v.integer(0)),
            "max": _PV(v.integer(0)),
            "equals": _PV(v.integer(0)),
        },
        ("counter",),
        (),
        "a hardware counter (summed over units unless unit is given) within bounds",
    ),
    "expect-mapping": StepKind(
        {
            "domain": _DOMAIN,
            "dfn": _DFN,
            "gfn": _ADDR,
            "expect_mfn": _PV(lambda x: None if x == "none" else v.frame(x)),
            "expect_perms": _PV(v.perms),
            "expect_page_size": _PV(v.page_size),
        },
        ("domain", "expect_mfn"),
        (("dfn", "gfn"),),
        "what the domain's tables in memory say for one frame ('none': not mapped)",
    ),
    "say": StepKind({"text": v.text}, ("text",), (), "print a line of narration"),
}

# -- the loader ---------------------------------------------------------------------------------------------


class _Lines:
    """Where tables and keys are in the file, for messages (best effort: TOML keeps no positions)."""

    _HEADER = re.compile(r"^\s*\[(\[)?\s*([A-Za-z0-9_.\-]+)\s*\]")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers: list[tuple[int, str, bool]] = []  # (line number, name, array item)
        for n, line in enumerate(self.lines, 1):
            m = self._HEADER.match(line)
            if m:
                self.headers.append((n, m[2], bool(m[1])))

    def table(self, name: str, index: int | None = None) -> int | None:
        k = 0
        for n, h, array in self.headers:
            if h == name:
                if index is None or not array:
                    return n
                if k == index:
                    return n
                k += 1
        return None

    def key(self, table_line: int | None, key: str) -> int | None:
        """The line of ``key`` in the table starting at ``table_line`` (the top of the file when None)."""
        rx = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for n in range((table_line or 0) + 1, len(self.lines) + 1):
            line = self.lines[n - 1]
            if self._HEADER.match(line):
                break
            if rx.match(line):
                return n
        return table_line


class _Loader:
    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.lines = _Lines(text)
        self.problems: list[str] = []

    def say(self, line: int | None, where: str, msg: str) -> None:
        at = f"line {line}: " if line else ""
        self.problems.append(f"{at}{where}: {msg}")

    def unknown(self, table: dict[str, Any], known: set[str] | dict[str, Any], where: str, line: int | None) -> None:
        for key in table:
            if key not in known:
                near = difflib.get_close_matches(key, list(known), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(sorted(known))}"
                self.say(self.lines.key(line, key), where, f"unknown key {key!r}{hint}")

    def value(
        self,
        table: dict[str, Any],
        key: str,
        parser: Callable[[Any], Any],
        where: str,
        line: int | None,
        default: Any = None,
    ) -> Any:
        if key not in table:
            return default
        try:
            return parser(table[key])
        except BadValue as exc:
            self.say(self.lines.key(line, key), f"{where}.{key}", str(exc))
            return default

    def section(self, doc: dict[str, Any], name: str) -> tuple[dict[str, Any], int | None]:
        raw = doc.get(name, {})
        line = self.lines.table(name)
        if not isinstance(raw, dict):
            self.say(line, name, "expected a table ([" + name + "])")
            return {}, line
        return raw, line

    def items(self, doc: dict[str, Any], name: str) -> list[tuple[dict[str, Any], int | None]]:
        raw = doc.get(name, [])
        if not isinstance(raw, list) or not all(isinstance(x, dict) for x in raw):
            self.say(self.lines.table(name), name, f"expected an array of tables ([[{name}]])")
            return []
        return [(x, self.lines.table(name, i)) for i, x in enumerate(raw)]

    # -- sections ------------------------------------------------------------------------------------

    def page_types(self, raw: Any, where: str, line: int | None) -> list[PageTypeSpec]:
        out: list[PageTypeSpec] = []
        if raw is None:
            return out
        if not isinstance(raw, list):
            self.say(line, where, "expected a list of { gfn = ..., count = ..., type = ... }")
            return out
        for i, item in enumerate(raw):
            w = f"{where}[{i}]"
            if not isinstance(item, dict):
                self.say(line, w, "expected { gfn = ..., count = ..., type = ... }")
                continue
            self.unknown(item, {"gfn", "count", "type", "type_count"}, w, line)
            gfn = self.value(item, "gfn", v.integer(0), w, line, 0)
            count = self.value(item, "count", v.integer(1), w, line, 1)
            if "type" not in item:
                self.say(line, w, "needs a type (l1, l2, l3, l4, seg-desc, shared, writable, none)")
                continue
            ptype = self.value(item, "type", v.page_type, w, line, PageType.NONE)
            tc = self.value(item, "type_count", v.integer(0), w, line, 1)
            out.append(PageTypeSpec(gfn, count, ptype, tc))
        return out

    def machine(self, doc: dict[str, Any]) -> MachineSpec:
        raw, line = self.section(doc, "machine")
        spec = MachineSpec()
        keys = {
            "vendor": v.choice(*KNOWN_VENDORS),
            "memory": v.size,
            "address_width": v.integer(32, 64),
            "superpages": v.list_of(v.page_size),
            "iotlb_entries": v.integer(1, 1 << 20),
            "caching_mode": v.boolean,
            "queued_invalidation": v.boolean,
            "units": v.integer(1, 64),
            "extra": lambda x: x,
        }
        self.unknown(raw, keys, "machine", line)
        spec.vendor = self.value(raw, "vendor", keys["vendor"], "machine", line)
        spec.memory = self.value(raw, "memory", v.size, "machine", line, spec.memory)
        if spec.memory % 4096:
            self.say(self.lines.key(line, "memory"), "machine.memory", "must be a multiple of 4 KiB")
        spec.address_width = self.value(raw, "address_width", keys["address_width"], "machine", line, 46)
        sp = self.value(raw, "superpages", keys["superpages"], "machine", line)
        if sp is not None:
            bad = [s for s in sp if s not in (21, 30)]
            if bad:
                self.say(self.lines.key(line, "superpages"), "machine.superpages", "superpages are 2M and 1G")
            spec.superpages = tuple(sorted(set(sp) - set(bad)))
        spec.iotlb_entries = self.value(raw, "iotlb_entries", keys["iotlb_entries"], "machine", line, 64)
        spec.caching_mode = self.value(raw, "caching_mode", v.boolean, "machine", line, False)
        spec.queued_invalidation = self.value(raw, "queued_invalidation", v.boolean, "machine", line, True)
        spec.units = self.value(raw, "units", keys["units"], "machine", line, 1)
        extra = raw.get("extra", {})
        if not isinstance(extra, dict) or not all(isinstance(x, dict) for x in extra.values()):
            self.say(
                self.lines.table("machine.extra") or line,
                "machine.extra",
                "expected one table per vendor, e.g. [machine.extra.vtd]",
            )
        else:
            for vendor in extra:
                if vendor not in KNOWN_VENDORS:
                    self.say(
                        self.lines.table(f"machine.extra.{vendor}") or line,
                        "machine.extra",
                        f"unknown vendor {vendor!r} (vendors: {', '.join(KNOWN_VENDORS)})",
                    )
            spec.extra = {k: dict(x) for k, x in extra.items() if k in KNOWN_VENDORS}
        return spec

    def iommu(self, doc: dict[str, Any]) -> dict[str, Any]:
        raw, line = self.section(doc, "iommu")
        keys: dict[str, Callable[[Any], Any]] = {
            "enable": v.boolean,
            "force": v.boolean,
            "strict": v.boolean,
            "passthrough": v.boolean,
            "inclusive": v.boolean,
            "reserved": v.boolean,
            "superpages": v.boolean,
            "snoop": v.boolean,
            "qinval": v.boolean,
            "intremap": v.boolean,
            "mapping_lock": v.boolean,
            "dev_iotlb_timeout_ms": v.integer(0),
            "quirks": v.list_of(v.choice(*sorted(QUIRKS))),
            "cmdline": v.text,
        }
        self.unknown(raw, keys, "iommu", line)
        out = {}
        for key, parser in keys.items():
            if key in raw:
                out[key] = self.value(raw, key, v.per_vendor(parser), "iommu", line)
        return out

    def hardware_domain(self, doc: dict[str, Any]) -> HwdomSpec:
        raw, line = self.section(doc, "hardware_domain")
        keys = {"memory", "kind", "create", "page_types"}
        self.unknown(raw, keys, "hardware_domain", line)
        spec = HwdomSpec()
        spec.memory = self.value(raw, "memory", v.size, "hardware_domain", line, spec.memory)
        kind = self.value(raw, "kind", v.choice("pv", "hvm"), "hardware_domain", line)
        spec.kind = DomainKind(kind) if kind else None
        spec.create = self.value(raw, "create", v.boolean, "hardware_domain", line, True)
        spec.page_types = self.page_types(raw.get("page_types"), "hardware_domain.page_types", line)
        return spec

    def domains(self, doc: dict[str, Any]) -> list[DomainSpec]:
        out: list[DomainSpec] = []
        for i, (raw, line) in enumerate(self.items(doc, "domains")):
            w = f"domains[{i}]"
            self.unknown(raw, {"id", "memory", "kind", "align", "create", "page_types"}, w, line)
            if "id" not in raw or "memory" not in raw:
                self.say(line, w, "needs an id and a memory size")
                continue
            domid = self.value(raw, "id", v.integer(1, 0x7FEF), w, line, 1)
            memory = self.value(raw, "memory", v.size, w, line, 16 << 20)
            kind = DomainKind(self.value(raw, "kind", v.choice("pv", "hvm"), w, line, "hvm"))
            align = self.value(raw, "align", v.page_size, w, line, 12)
            create = self.value(raw, "create", v.boolean, w, line, True)
            types = self.page_types(raw.get("page_types"), f"{w}.page_types", line)
            if any(d.domid == domid for d in out):
                self.say(line, w, f"domain {domid} is declared twice")
            out.append(DomainSpec(domid, memory, kind, align, create, types, line))
        return out

    def devices(self, doc: dict[str, Any]) -> list[DeviceSpec]:
        out: list[DeviceSpec] = []
        keys = {"sbdf", "type", "ats", "phantom_stride", "stream_ids", "upstream_bridge", "secondary_bus", "assign"}
        for i, (raw, line) in enumerate(self.items(doc, "devices")):
            w = f"devices[{i}]"
            self.unknown(raw, keys, w, line)
            if "sbdf" not in raw:
                self.say(line, w, "needs an sbdf such as '0000:03:00.0'")
                continue
            spec = DeviceSpec(self.value(raw, "sbdf", v.sbdf, w, line, "0000:00:00.0"))
            spec.type = self.value(raw, "type", v.device_type, w, line, PciDevType.PCIE_ENDPOINT)
            spec.ats = self.value(raw, "ats", v.boolean, w, line, False)
            spec.phantom_stride = self.value(raw, "phantom_stride", v.choice_int(0, 1, 2, 4), w, line, 0)
            spec.stream_ids = tuple(self.value(raw, "stream_ids", v.list_of(v.integer(0, 0xFFFF)), w, line, []))
            spec.upstream_bridge = self.value(raw, "upstream_bridge", v.sbdf, w, line)
            spec.secondary_bus = self.value(raw, "secondary_bus", v.integer(0, 255), w, line)
            spec.assign = self.value(raw, "assign", v.integer(1, 0x7FEF), w, line)
            if any(d.sbdf == spec.sbdf for d in out):
                self.say(line, w, f"device {spec.sbdf} is declared twice")
            out.append(spec)
        return out

    def grants(self, doc: dict[str, Any]) -> list[GrantSpec]:
        out: list[GrantSpec] = []
        for i, (raw, line) in enumerate(self.items(doc, "grants")):
            w = f"grants[{i}]"
            self.unknown(raw, {"domain", "mfn", "count", "perms", "why"}, w, line)
            if "domain" not in raw or "mfn" not in raw:
                self.say(line, w, "needs a domain and an mfn")
                continue
            out.append(
                GrantSpec(
                    self.value(raw, "domain", _DOMAIN, w, line, 0),
                    self.value(raw, "mfn", v.frame, w, line, 0),
                    self.value(raw, "count", _COUNT, w, line, 1),
                    self.value(raw, "perms", v.perms, w, line, Perm.RW),
                    self.value(raw, "why", v.text, w, line, ""),
                )
            )
        return out

    def steps(self, doc: dict[str, Any]) -> list[Step]:
        out: list[Step] = []
        for i, (raw, line) in enumerate(self.items(doc, "steps")):
            n = i + 1
            do = raw.get("do")
            w = f"steps[{n}]"
            if not isinstance(do, str) or do not in STEP_KINDS:
                near = difflib.get_close_matches(str(do), list(STEP_KINDS), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; steps are: {', '.join(STEP_KINDS)}"
                what = "has no 'do'" if do is None else f"does not know how to do {do!r}"
                self.say(self.lines.key(line, "do"), w, f"{what}{hint}")
                continue
            w = f"steps[{n}] ({do})"
            kind = STEP_KINDS[do]
            known = {**_COMMON, **kind.keys}
            self.unknown(raw, known, w, line)
            args: dict[str, Any] = {}
            for key, parser in known.items():
                if key in raw and key not in ("do", "name", "note", "vendors"):
                    args[key] = self.value(raw, key, parser, w, line)
            for key in kind.required:
                if key not in raw:
                    self.say(line, w, f"needs {key!r}")
            for group in kind.one_of:
                given = [k for k in group if k in raw]
                if len(given) != 1:
                    names = " or ".join(repr(k) for k in group)
                    self.say(line, w, f"needs exactly one of {names}" + (f" (got {', '.join(given)})" if given else ""))
            if "count" in raw and "order" in raw:
                self.say(line, w, "give count or order, not both")
            vendors = self.value(raw, "vendors", _COMMON["vendors"], w, line)
            out.append(
                Step(
                    n,
                    do,
                    args,
                    self.value(raw, "name", v.text, w, line),
                    self.value(raw, "note", v.text, w, line),
                    tuple(vendors) if vendors else None,
                    line,
                )
            )
        return out

    # -- cross references ----------------------------------------------------------------------------

    def cross_check(self, sc: Scenario) -> None:
        domids = {0} if sc.hardware_domain.create else set()
        domids |= {d.domid for d in sc.domains}
        later = {d.domid for d in sc.domains if not d.create}
        devices = {d.sbdf for d in sc.devices} or set(DEFAULT_DEVICES)
        for d in sc.devices:
            if d.assign is not None and d.assign not in domids:
                self.say(None, f"device {d.sbdf}", f"assign = {d.assign}, but domain {d.assign} is not declared")
        seen: dict[str, int] = {}
        for s in sc.steps:
            w = f"steps[{s.index}] ({s.do})"
            for key in ("domain",):
                dom = s.args.get(key)
                if isinstance(dom, int) and dom not in domids:
                    self.say(s.line, w, f"domain {dom} is not declared ([hardware_domain] or [[domains]])")
            dev = s.args.get("device")
            if isinstance(dev, str) and dev not in devices:
                self.say(s.line, w, f"device {dev} is not declared in [[devices]]")
            if "expect_crashed" in s.args and "domain" not in s.args:
                self.say(s.line, w, "expect_crashed needs the step's domain")
            if s.do == "create" and s.args.get("domain") not in later:
                self.say(s.line, w, "only a domain declared with create = false can be created by a step")
            for key in ("mfn", "expect_in", "expect_mfn", "dfn"):
                ref = s.args.get(key)
                refs = ref.values.values() if isinstance(ref, PerVendor) else [ref]
                for r in refs:
                    if isinstance(r, FrameRef) and r.domid not in domids:
                        self.say(s.line, w, f"{key} names a frame of domain {r.domid}, which is not declared")
            if s.name:
                if s.name in seen:
                    self.say(s.line, w, f"step name {s.name!r} is already used by step {seen[s.name]}")
                seen[s.name] = s.index
                if s.name.isdigit():
                    self.say(s.line, w, "a step name cannot be a number (numbers name steps by position)")
        for g in sc.grants:
            if g.domid not in domids:
                self.say(None, "grants", f"domain {g.domid} is not declared")


#: Devices a scenario without [[devices]] gets: a graphics device, a network card (ATS) and an NVMe drive.
DEFAULT_DEVICES = ("0000:00:02.0", "0000:03:00.0", "0000:04:00.0")


def parse_scenario(text: str, source: str = "<text>") -> Scenario:
    """Validate scenario text; raises ``ScenarioError`` listing every problem found."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError([f"not valid TOML: {exc}"], source) from None
    ld = _Loader(text, source)
    top = {"scenario", "machine", "iommu", "hardware_domain", "domains", "devices", "grants", "steps"}
    ld.unknown(doc, top, "the file", None)
    head, hline = ld.section(doc, "scenario")
    ld.unknown(head, {"name", "description", "vendors", "expected_failure"}, "scenario", hline)
    sc = Scenario(
        name=ld.value(head, "name", v.text, "scenario", hline, Path(source).stem),
        description=ld.value(head, "description", v.text, "scenario", hline, ""),
        source=source,
        expected_failure=ld.value(head, "expected_failure", v.text, "scenario", hline),
    )
    vendors = ld.value(head, "vendors", v.list_of(v.choice(*KNOWN_VENDORS)), "scenario", hline)
    if vendors is not None:
        if not vendors:
            ld.say(ld.lines.key(hline, "vendors"), "scenario.vendors", "list at least one vendor, or leave it out")
        sc.vendors = tuple(dict.fromkeys(vendors))
    sc.machine = ld.machine(doc)
    if sc.machine.vendor and sc.vendors and sc.machine.vendor not in sc.vendors:
        ld.say(ld.lines.table("machine"), "machine.vendor", f"{sc.machine.vendor!r} is not in scenario.vendors")
    sc.iommu = ld.iommu(doc)
    sc.hardware_domain = ld.hardware_domain(doc)
    sc.domains = ld.domains(doc)
    sc.devices = ld.devices(doc)
    sc.grants = ld.grants(doc)
    sc.steps = ld.steps(doc)
    if not ld.problems:
        ld.cross_check(sc)
    if ld.problems:
        raise ScenarioError(ld.problems, source)
    return sc


def load_scenario(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError([f"cannot read the scenario: {exc.strerror or exc}"], str(p)) from None
    except UnicodeDecodeError:
        raise ScenarioError(["the file is not UTF-8 text"], str(p)) from None
    return parse_scenario(text, str(p))
