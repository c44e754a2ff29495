"""Run a scenario on one vendor: build the machine, play the steps, hold every expectation to account.

``ScenarioRunner(scenario, vendor).run()`` builds the platform the file describes through the vendor-neutral
``build_platform`` (hardware domain first, then the guests, then the initial device assignments), plays the
steps in order and returns a ``RunResult`` whose ``steps`` say, for each step, what was done, whether its
expectations held, what it produced (data read, the fault, a check report, a dump) and the console lines
it made the hypervisor print.  The first expectation that does not hold ends the run (unless
``keep_going``); ``RunResult.ok`` and ``RunResult.failure`` say how it ended.  A mistake in the scenario
that only shows while running (a domain that no longer exists, a frame it does not have) fails the step.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from iommusim.errors import DmaFault, HypervisorBug, IommuError, NoDevice, errno_name
from iommusim.frames import Daddr, Dfn, Gfn, Mfn
from iommusim.iommu.config import IommuConfig
from iommusim.machine.domain import Domain
from iommusim.machine.p2m import P2mType
from iommusim.machine.pci import PciDevice, Sbdf
from iommusim.perms import Perm
from iommusim.platform import VENDORS, HardwareSpec, Platform, available_vendors, build_platform
from iommusim.tools.check import CheckReport, Grant, check
from iommusim.tools.dump import MachineDump, dump_platform
from iommusim.tools.scenario.model import DEFAULT_DEVICES, DomainSpec, PageTypeSpec, Scenario, ScenarioError, Step
from iommusim.tools.scenario.values import FrameRef, PerVendor
from iommusim.tools.tables import table_lookup
from iommusim.tools.vendors import KNOWN_VENDORS, VendorTools, vendor_tools

__all__ = ["IotlbEvent", "RunResult", "ScenarioRunner", "StepFailed", "StepRecord", "run_scenario", "vendors_for"]


class StepFailed(Exception):
    """An expectation of a step did not hold (the message says what was expected and what happened)."""


@dataclass(frozen=True)
class IotlbEvent:
    seq: int  # order of the event in the run
    step: int  # the step that caused it (0: machine set-up)
    unit: str
    kind: str  # hit, miss, fill, evict, inv-all, inv-domain, inv-page
    tag: int
    daddr: int


@dataclass
class StepRecord:
    index: int
    do: str
    name: str | None
    line: int | None
    summary: str
    outcome: str = "ok"  # ok, failed, skipped
    message: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    console: list[str] = field(default_factory=list)
    note: str | None = None
    dump: MachineDump | None = None
    report: CheckReport | None = None

    @property
    def label(self) -> str:
        return f"step {self.index}" + (f" ({self.name})" if self.name else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "do": self.do,
            "name": self.name,
            "line": self.line,
            "summary": self.summary,
            "outcome": self.outcome,
            "message": self.message,
            "note": self.note,
            "result": self.result,
            "console": self.console,
        }


@dataclass
class RunResult:
    scenario: Scenario
    vendor: str
    steps: list[StepRecord] = field(default_factory=list)
    boot_console: list[str] = field(default_factory=list)
    failure: str | None = None
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    iotlb_events: list[IotlbEvent] = field(default_factory=list)
    final_check: CheckReport | None = None
    platform: Platform | None = None
    grants: list[Grant] = field(default_factory=list)  # declared, and made by map steps with grant = true

    @property
    def ok(self) -> bool:
        return self.failure is None and (self.final_check is None or self.final_check.ok)

    def to_json(self) -> dict[str, Any]:
        return {
            "vendor": self.vendor,
            "ok": self.ok,
            "failure": self.failure,
            "boot_console": self.boot_console,
            "steps": [s.to_json() for s in self.steps],
            "counters": self.counters,
            "final_check": self.final_check.to_json() if self.final_check else None,
            "iotlb_events": len(self.iotlb_events),
        }


def vendors_for(scenario: Scenario, requested: str | None = None) -> list[str]:
    """The installed vendors to run a scenario on (``ScenarioError`` when there are none, or a wrong request)."""
    installed = available_vendors()
    have = ", ".join(installed) or "none"
    known = set(KNOWN_VENDORS) | set(VENDORS)
    wanted = requested or scenario.machine.vendor
    if wanted is not None:
        if wanted not in known:
            raise ScenarioError([f"unknown vendor {wanted!r} (vendors: {', '.join(sorted(known))})"], scenario.source)
        if wanted not in installed:
            raise ScenarioError([f"the {wanted} model is not installed (installed: {have})"], scenario.source)
        if scenario.vendors is not None and wanted not in scenario.vendors:
            applies = ", ".join(scenario.vendors)
            raise ScenarioError([f"this scenario is for {applies}, not {wanted}"], scenario.source)
        return [wanted]
    if scenario.vendors is not None:
        chosen = [x for x in scenario.vendors if x in installed]
        if not chosen:
            applies = ", ".join(scenario.vendors)
            raise ScenarioError(
                [f"this scenario is for {applies}; none of them is installed ({have})"], scenario.source
            )
        return chosen
    if not installed:
        raise ScenarioError(["no vendor model is installed"], scenario.source)
    return installed


def _bytes_text(data: bytes) -> str:
    text = data.rstrip(b"\0")
    if text and all(32 <= c < 127 for c in text):
        return repr(text.decode()) + (f" + {len(data) - len(text)} zero bytes" if len(text) < len(data) else "")
    return data.hex(" ")


def _norm(s: str) -> str:
    return s.strip().lower().replace("_", "-")


class ScenarioRunner:
    """One run of one scenario on one vendor."""

    def __init__(
        self,
        scenario: Scenario,
        vendor: str,
        *,
        record_iotlb: bool = False,
        on_step: Callable[[StepRecord], None] | None = None,
    ) -> None:
        self.sc = scenario
        self.vendor = vendor
        self.record_iotlb = record_iotlb
        self.on_step = on_step
        self.result = RunResult(scenario, vendor)
        self._platform: Platform | None = None
        self._tools: VendorTools | None = None
        self._log_cursor = 0
        self._step_mark = 0
        self._event_marks: dict[str, int] = {}
        self._seq = 0
        self.grants: list[tuple[int, int | FrameRef, int, Perm]] = [
            (g.domid, g.mfn, g.count, g.perms) for g in scenario.grants
        ]

    # -- set-up -----------------------------------------------------------------------------------------

    @property
    def platform(self) -> Platform:
        if self._platform is None:
            raise RuntimeError("the scenario has not been booted")
        return self._platform

    @property
    def tools(self) -> VendorTools:
        if self._tools is None:
            self._tools = vendor_tools(self.vendor)
        return self._tools

    def _config(self) -> IommuConfig:
        opts = {k: (x.pick(self.vendor) if isinstance(x, PerVendor) else x) for k, x in self.sc.iommu.items()}
        opts = {k: x for k, x in opts.items() if x is not None}
        names = {
            "strict": "hwdom_strict",
            "passthrough": "hwdom_passthrough",
            "inclusive": "hwdom_inclusive",
            "reserved": "hwdom_reserved",
        }
        fields: dict[str, Any] = {}
        for key, value in opts.items():
            if key == "cmdline":
                continue
            if key == "quirks":
                fields["quirks"] = frozenset(value)
            else:
                fields[names.get(key, key)] = value
        cfg = IommuConfig(**fields)
        if "cmdline" in opts:
            cfg = IommuConfig.from_cmdline(opts["cmdline"], cfg)
        return cfg

    def _devices(self) -> list[PciDevice]:
        specs = self.sc.devices
        if not specs:
            return [
                PciDevice(Sbdf.parse(DEFAULT_DEVICES[0])),
                PciDevice(Sbdf.parse(DEFAULT_DEVICES[1]), ats=True),
                PciDevice(Sbdf.parse(DEFAULT_DEVICES[2])),
            ]
        return [
            PciDevice(
                Sbdf.parse(s.sbdf),
                s.type,
                ats=s.ats,
                phantom_stride=s.phantom_stride,
                stream_ids=s.stream_ids,
                upstream_bridge=Sbdf.parse(s.upstream_bridge) if s.upstream_bridge else None,
                secondary_bus=s.secondary_bus,
            )
            for s in specs
        ]

    def boot(self) -> Platform:
        """Build the machine and its domains; ``ScenarioError`` if the description cannot be built."""
        m = self.sc.machine
        spec = HardwareSpec(
            vendor=self.vendor,
            ram_bytes=m.memory,
            address_width=m.address_width,
            superpages=m.superpages,
            iotlb_entries=m.iotlb_entries,
            caching_mode=m.caching_mode,
            queued_invalidation=m.queued_invalidation,
            units=m.units,
            extra=dict(m.extra.get(self.vendor, {})),
        )
        try:
            cfg = self._config()
            p = build_platform(spec, config=cfg, devices=self._devices())
        except (IommuError, TypeError) as exc:
            msg = exc.message if isinstance(exc, IommuError) else str(exc)
            raise ScenarioError([f"the machine cannot be built on {self.vendor}: {msg}"], self.sc.source) from None
        self._platform = p
        if self.record_iotlb:
            for it in self.tools.iotlbs(p).values():
                if it.events is None:
                    it.events = []
        hw = self.sc.hardware_domain
        if hw.create:
            types = hw.page_types

            def type_pages(d: Domain) -> None:
                if d.domid == 0:
                    self._apply_page_types(d, types)

            p.machine.domain_created_hooks.append(type_pages)
            try:
                p.create_hardware_domain(hw.memory, kind=hw.kind)
            finally:
                p.machine.domain_created_hooks.remove(type_pages)
        for ds in self.sc.domains:
            if ds.create:
                self._create(ds)
        for dev in self.sc.devices:
            if dev.assign is not None:
                p.iommu.assign_device(p.machine.domain(dev.assign), dev.sbdf)
        self.result.boot_console = [ln.text for ln in p.machine.console.lines]
        self._log_cursor = len(p.machine.console.lines)
        self._collect_events(0)
        return p

    def _create(self, ds: DomainSpec) -> Domain:
        p = self.platform
        pages = ds.memory >> 12
        if ds.align > 12:
            d = p.create_guest(ds.domid, 0, kind=ds.kind)
            p.machine.populate(d, pages, align_order=ds.align - 12)
        else:
            d = p.create_guest(ds.domid, ds.memory, kind=ds.kind)
        self._apply_page_types(d, ds.page_types)
        return d

    def _apply_page_types(self, d: Domain, types: list[PageTypeSpec]) -> None:
        for t in types:
            for i in range(t.count):
                mfn = self._frame_of(d, t.gfn + i)
                self.platform.machine.pages.set_type(mfn.value, t.type, type_count=t.type_count)

    # -- values ----------------------------------------------------------------------------------------

    def _domain(self, domid: int) -> Domain:
        d = self.platform.machine.domains.get(domid)
        if d is None:
            raise StepFailed(f"domain d{domid} does not exist (now)")
        return d

    @staticmethod
    def _frame_of(d: Domain, gfn: int) -> Mfn:
        for ext in d.extents:
            if ext.gfn.value <= gfn < ext.gfn.value + ext.count:
                return ext.mfn + (gfn - ext.gfn.value)
        raise StepFailed(f"{d} has no guest frame {gfn:#x}")

    def _mfn(self, ref: int | FrameRef) -> Mfn:
        if isinstance(ref, FrameRef):
            return self._frame_of(self._domain(ref.domid), ref.gfn)
        return Mfn(ref)

    def _dfn(self, step: Step) -> int:
        value = step.args["dfn"] if "dfn" in step.args else step.args["gfn"]
        return self._mfn(value).value if isinstance(value, FrameRef) else int(value)

    def _count(self, step: Step) -> int:
        if "order" in step.args:
            return 1 << int(step.args["order"])
        return int(step.args.get("count", 1))

    def _device(self, sbdf: str) -> PciDevice:
        try:
            return self.platform.device(sbdf)
        except NoDevice as exc:
            raise StepFailed(exc.message) from None

    def _via(self, step: Step, d: Domain) -> str:
        via = str(step.args.get("via", "auto"))
        if via == "auto":
            return "p2m" if d.p2m is not None else "iommu"
        if via == "p2m" and d.p2m is None:
            raise StepFailed(f"{d} is not translated: it has no p2m to map through")
        return via

    @staticmethod
    def _chunks(first: int, mfn: int, count: int) -> list[tuple[int, int, int]]:
        """Split a run into naturally aligned power-of-two pieces (gfn, mfn, order), as a guest would."""
        out = []
        done = 0
        while done < count:
            g, m = first + done, mfn + done
            order = 0
            while order < 18 and not ((g | m) & ((2 << order) - 1)) and done + (2 << order) <= count:
                order += 1
            out.append((g, m, order))
            done += 1 << order
        return out

    def resolved_grants(self) -> list[Grant]:
        out = []
        for domid, ref, count, perms in self.grants:
            try:
                out.append(Grant(domid, self._mfn(ref).value, count, perms))
            except StepFailed:
                continue
        return out

    # -- the steps --------------------------------------------------------------------------------------

    def _do_map(self, step: Step, rec: StepRecord) -> None:
        d = self._domain(step.args["domain"])
        dfn, count = self._dfn(step), self._count(step)
        mfn = self._mfn(step.args["mfn"])
        perms = step.args.get("perms", Perm.RW)
        flush = bool(step.args.get("flush", True))
        via = self._via(step, d)
        p = self.platform
        rec.summary = (
            f"map {d} dfn {dfn:#x} -> mfn {mfn.value:#x}"
            + (f" x{count}" if count > 1 else "")
            + f" {perms.short()} via {via}"
            + ("" if flush else ", flush skipped")
        )
        if via == "p2m":
            ptype = step.args.get("type") or (P2mType.RAM_RW if perms & Perm.W else P2mType.RAM_RO)
            pieces = [(dfn, mfn.value, int(step.args["order"]))] if "order" in step.args else None
            for g, m, order in pieces or self._chunks(dfn, mfn.value, count):
                p.guest_map(d, Gfn(g), Mfn(m), order=order, type=ptype, flush=flush)
        elif count == 1:
            if flush:
                p.iommu.map_page(d, Dfn(dfn), mfn, perms)
            else:
                with p.iommu.dont_flush():
                    p.iommu.map_page(d, Dfn(dfn), mfn, perms)
        else:
            p.iommu.map(d, Dfn(dfn), mfn, count, perms, flush=flush)
        if step.args.get("grant"):
            self.grants.append((d.domid, mfn.value, count, perms))

    def _do_unmap(self, step: Step, rec: StepRecord) -> None:
        d = self._domain(step.args["domain"])
        dfn, count = self._dfn(step), self._count(step)
        flush = bool(step.args.get("flush", True))
        via = self._via(step, d)
        p = self.platform
        rec.summary = (
            f"unmap {d} dfn {dfn:#x}"
            + (f" x{count}" if count > 1 else "")
            + f" via {via}"
            + ("" if flush else ", flush skipped")
        )
        if via == "p2m":
            pieces = [(dfn, 0, int(step.args["order"]))] if "order" in step.args else self._chunks(dfn, dfn, count)
            for g, _m, order in pieces:
                p.guest_unmap(d, Gfn(g), order=order, flush=flush)
        elif count == 1:
            if flush:
                p.iommu.unmap_page(d, Dfn(dfn))
            else:
                with p.iommu.dont_flush():
                    p.iommu.unmap_page(d, Dfn(dfn))
        else:
            p.iommu.unmap(d, Dfn(dfn), count, flush=flush)

    def _do_flush(self, step: Step, rec: StepRecord) -> None:
        d = self._domain(step.args["domain"])
        dfn, count = self._dfn(step), int(step.args.get("count", 1))
        rec.summary = f"flush {d} dfn {dfn:#x}" + (f" x{count}" if count > 1 else "")
        self.platform.iommu.iotlb_flush(d, Dfn(dfn), count)

    def _do_flush_all(self, step: Step, rec: StepRecord) -> None:
        d = self._domain(step.args["domain"])
        rec.summary = f"flush all of {d}"
        self.platform.iommu.iotlb_flush_all(d)

    def _address(self, step: Step) -> int:
        if "daddr" in step.args:
            return int(step.args["daddr"])
        return (self._dfn(step) << 12) + int(step.args.get("offset", 0))

    def _expect_fault(self, step: Step, rec: StepRecord, exc: DmaFault) -> None:
        expect = step.get("expect", self.vendor, "ok")
        rec.result["fault"] = str(exc)
        if expect != "fault":
            raise StepFailed(f"expected the access to succeed, but it faulted: {exc}")
        reason = step.get("reason", self.vendor)
        names = self.tools.fault_reasons(exc.record) if exc.record is not None else ["bus-master-disabled"]
        rec.result["fault_reasons"] = names
        if reason is not None and _norm(reason) not in {_norm(n) for n in names}:
            raise StepFailed(f"expected a fault for {reason!r}, got one for {', '.join(names) or 'no reason'}: {exc}")
        rec.message = f"faulted, as expected: {exc}"

    def _do_dma_read(self, step: Step, rec: StepRecord) -> None:
        dev = self._device(step.args["device"])
        addr = self._address(step)
        want = step.get("expect_data", self.vendor)
        if want is None:
            want = step.get("expect_hex", self.vendor)
        length = int(step.args.get("length", len(want) if want is not None else 16))
        rec.summary = f"{dev.sbdf} reads {length} bytes at {addr:#x}"
        try:
            data = self.platform.machine.dma.read(dev, Daddr(addr), length, devfn=step.args.get("devfn"))
        except DmaFault as exc:
            self._expect_fault(step, rec, exc)
            return
        rec.result["data"] = data.hex()
        if step.get("expect", self.vendor, "ok") == "fault":
            raise StepFailed(f"expected a fault, but the read succeeded and returned {_bytes_text(data)}")
        if want is not None and data != want:
            raise StepFailed(f"expected to read {_bytes_text(want)}, read {_bytes_text(data)}")
        rec.message = f"read {_bytes_text(data)}"

    def _do_dma_write(self, step: Step, rec: StepRecord) -> None:
        dev = self._device(step.args["device"])
        addr = self._address(step)
        data: bytes = step.args["data"] if "data" in step.args else step.args["hex"]
        rec.summary = f"{dev.sbdf} writes {_bytes_text(data)} at {addr:#x}"
        try:
            self.platform.machine.dma.write(dev, Daddr(addr), data, devfn=step.args.get("devfn"))
        except DmaFault as exc:
            self._expect_fault(step, rec, exc)
            return
        if step.get("expect", self.vendor, "ok") == "fault":
            raise StepFailed("expected a fault, but the write succeeded")
        rec.message = "written"
        where = step.get("expect_in", self.vendor)
        if where is not None:
            mfn = self._mfn(where)
            got = self.platform.machine.memory.read_bytes((mfn.value << 12) | (addr & 0xFFF), len(data))
            if got != data:
                raise StepFailed(f"the bytes did not land in mfn {mfn.value:#x} ({where}): it holds {_bytes_text(got)}")
            rec.message = f"written; landed in mfn {mfn.value:#x} ({where})"

    def _do_assign(self, step: Step, rec: StepRecord) -> None:
        d = self._domain(step.args["domain"])
        rec.summary = f"assign {step.args['device']} to {d}"
        self.platform.iommu.assign_device(d, step.args["device"])

    def _do_deassign(self, step: Step, rec: StepRecord) -> None:
        dev = self._device(step.args["device"])
        d = self._domain(step.args["domain"]) if "domain" in step.args else dev.owner
        if d is None:
            raise StepFailed(f"{dev.sbdf} has no owner to take it from")
        rec.summary = f"deassign {dev.sbdf} from {d}"
        self.platform.iommu.deassign_device(d, dev)

    def _do_crash(self, step: Step, rec: StepRecord) -> None:
        d = self._domain(step.args["domain"])
        rec.summary = f"crash {d}"
        d.crash(f"scenario {rec.label}")

    def _do_destroy(self, step: Step, rec: StepRecord) -> None:
        d = self._domain(step.args["domain"])
        rec.summary = f"destroy {d}"
        self.platform.destroy(d)

    def _do_create(self, step: Step, rec: StepRecord) -> None:
        ds = next(x for x in self.sc.domains if x.domid == step.args["domain"])
        rec.summary = f"create d{ds.domid} ({ds.kind.value}, {ds.memory >> 20} MiB)"
        self._create(ds)

    def _do_dump(self, step: Step, rec: StepRecord) -> None:
        dom = step.args.get("domain")
        rec.summary = "dump" + (f" d{dom}" if dom is not None else "")
        dump = dump_platform(
            self.platform,
            domains=None if dom is None else [int(dom)],
            tree=bool(step.args.get("tree", True)),
            caches=bool(step.args.get("caches", True)),
        )
        rec.dump = dump
        rec.result["dump"] = dump.to_json()
        rec.message = ", ".join(f"d{x.domid}: {x.pages} pages mapped" for x in dump.domains)

    def _do_check(self, step: Step, rec: StepRecord) -> None:
        rec.summary = "isolation check"
        report = check(self.platform, grants=self.resolved_grants())
        rec.report = report
        rec.result["check"] = report.to_json()
        expect = step.get("expect", self.vendor, "pass")
        found = f"{len(report.violations)} violation(s), {len(report.stale)} stale window(s)"
        rec.message = found
        if expect == "pass" and report.violations:
            raise StepFailed(f"expected the check to pass, but it found {found}: {report.violations[0].message}")
        if expect == "stale" and (report.violations or not report.stale):
            first = report.violations[0].message if report.violations else "no flush is owed"
            raise StepFailed(f"expected only stale windows, found {found}: {first}")
        if expect == "violations" and not report.violations:
            raise StepFailed(f"expected violations, but the check passed ({found})")
        for text in step.get("violations", self.vendor) or []:
            if not any(text in v.message for v in report.violations):
                raise StepFailed(f"expected a violation mentioning {text!r}; found {found}")
        for kind in step.get("kinds", self.vendor) or []:
            if kind not in report.kinds():
                raise StepFailed(f"expected a violation of kind {kind!r}; found {sorted(report.kinds()) or 'none'}")
        stale = step.get("stale", self.vendor)
        if stale is not None and len(report.stale) != stale:
            raise StepFailed(f"expected {stale} stale window(s), found {len(report.stale)}")

    def _do_expect_log(self, step: Step, rec: StepRecord) -> None:
        pattern: re.Pattern[str] = step.get("match", self.vendor)
        lines = self.platform.machine.console.lines
        since = str(step.args.get("since", "last"))
        start = {"last": self._log_cursor, "step": self._step_mark, "start": 0}[since]
        hits = [ln.text for ln in lines[start:] if pattern.search(ln.text)]
        self._log_cursor = len(lines)
        rec.summary = f"expect a console line matching /{pattern.pattern}/" + (
            " to be absent" if step.args.get("absent") else ""
        )
        rec.result["matches"] = hits
        count = step.args.get("count")
        if step.args.get("absent"):
            if hits:
                raise StepFailed(f"expected no line matching /{pattern.pattern}/, found: {hits[0]}")
        elif count is not None:
            if len(hits) != count:
                raise StepFailed(f"expected {count} line(s) matching /{pattern.pattern}/, found {len(hits)}")
        elif not hits:
            recent = [ln.text for ln in lines[start:]][-3:]
            seen = "; ".join(recent) if recent else "no new lines at all"
            raise StepFailed(f"expected a line matching /{pattern.pattern}/; the console said: {seen}")
        rec.message = hits[0] if hits else "none, as expected"

    def _do_advance_time(self, step: Step, rec: StepRecord) -> None:
        ns = int(step.args["ns"]) if "ns" in step.args else int(step.args["ms"]) * 1_000_000
        rec.summary = f"advance the clock by {ns / 1e6:g} ms"
        self.platform.machine.clock.advance(ns)

    def _do_fail_alloc(self, step: Step, rec: StepRecord) -> None:
        alloc = self.platform.machine.allocator
        owner = step.args.get("owner")
        if step.args.get("clear"):
            rec.summary = "stop failing allocations"
            alloc.clear_failures()
        elif step.args.get("every"):
            rec.summary = "fail every hypervisor allocation" + (f" for {owner}*" if owner else "")
            alloc.fail_all(owner_prefix=owner)
        else:
            nth = int(step.args.get("nth", 1))
            rec.summary = f"fail hypervisor allocation #{nth} from now" + (f" for {owner}*" if owner else "")
            alloc.fail_nth(nth, owner_prefix=owner)

    def _do_expect_counter(self, step: Step, rec: StepRecord) -> None:
        name = str(step.get("counter", self.vendor))
        unit = step.args.get("unit")
        counters = self.platform.counters()
        if unit is not None and unit not in counters:
            raise StepFailed(f"there is no unit {unit!r} (units: {', '.join(counters)})")
        value = sum(c.get(name, 0) for u, c in counters.items() if unit is None or u == unit)
        rec.summary = f"counter {name}" + (f" of {unit}" if unit else "")
        rec.result["value"] = value
        rec.message = f"{name} = {value}"
        lo, hi, eq = (step.get(k, self.vendor) for k in ("min", "max", "equals"))
        if (lo is not None and value < lo) or (hi is not None and value > hi) or (eq is not None and value != eq):
            bounds = ", ".join(f"{k} {x}" for k, x in (("min", lo), ("max", hi), ("equals", eq)) if x is not None)
            raise StepFailed(f"expected {name} with {bounds}, it is {value}")

    def _do_expect_mapping(self, step: Step, rec: StepRecord) -> None:
        d = self._domain(step.args["domain"])
        dfn = self._dfn(step)
        rec.summary = f"{d}'s tables for dfn {dfn:#x}"
        tables = self.tools.domain_tables(self.platform, d)
        want_ref = step.get("expect_mfn", self.vendor)
        want = None if want_ref is None else self._mfn(want_ref).value
        got = None if tables is None else table_lookup(self.platform.machine.memory, tables, dfn)
        rec.result["mapping"] = (
            None if got is None else {"mfn": f"{got[0]:#x}", "perms": got[1].short(), "shift": got[2]}
        )
        if got is None:
            if want is not None:
                raise StepFailed(f"expected dfn {dfn:#x} to map mfn {want:#x}, but {d}'s tables do not map it")
            rec.message = "not mapped, as expected"
            return
        mfn, perms, shift = got
        said = f"mfn {mfn:#x} {perms.short()} in a {1 << (shift - 10)}K page"
        if want is None:
            raise StepFailed(f"expected dfn {dfn:#x} not to be mapped, but {d}'s tables map it to {said}")
        if mfn != want:
            raise StepFailed(f"expected dfn {dfn:#x} to map mfn {want:#x}, but it maps {said}")
        wp, ws = step.get("expect_perms", self.vendor), step.get("expect_page_size", self.vendor)
        if wp is not None and perms != wp:
            raise StepFailed(f"expected permissions {wp.short()}, the tables give {said}")
        if ws is not None and shift != ws:
            raise StepFailed(f"expected a {1 << (ws - 10)}K page, the tables have {said}")
        rec.message = said

    def _do_say(self, step: Step, rec: StepRecord) -> None:
        rec.summary = str(step.args["text"])

    # -- running --------------------------------------------------------------------------------------

    def _collect_events(self, step: int) -> None:
        if not self.record_iotlb or self._platform is None:
            return
        for unit, it in self.tools.iotlbs(self._platform).items():
            events = it.events or []
            start = self._event_marks.get(unit, 0)
            for kind, tag, addr in events[start:]:
                self.result.iotlb_events.append(IotlbEvent(self._seq, step, unit, kind, tag, addr))
                self._seq += 1
            self._event_marks[unit] = len(events)

    def _expect_after(self, step: Step, rec: StepRecord, error: BaseException | None) -> None:
        want = step.get("expect_error", self.vendor)
        if error is not None:
            if isinstance(error, IommuError):
                got = errno_name(error.errno)
                text = str(error)
            else:
                got, text = "BUG", f"hypervisor BUG: {error}"
            rec.result["error"] = text
            if want is None:
                raise StepFailed(f"failed: {text}")
            if want.upper() not in ("ANY", got):
                raise StepFailed(f"expected {want}, got {got}: {text}")
            rec.message = f"{got}, as expected: {text}"
        elif want is not None:
            raise StepFailed(f"expected {want}, but the step succeeded")
        crashed = step.get("expect_crashed", self.vendor)
        if crashed is not None and "domain" in step.args:
            d = self.platform.machine.domains.get(int(step.args["domain"]))
            is_crashed = d is not None and d.crashed
            if is_crashed != crashed:
                state = "crashed" if is_crashed else "not crashed"
                raise StepFailed(
                    f"expected d{step.args['domain']} {'' if crashed else 'not '}to be crashed; it is {state}"
                )

    def run_step(self, step: Step) -> StepRecord:
        rec = StepRecord(step.index, step.do, step.name, step.line, step.do, note=step.note)
        if step.vendors is not None and self.vendor not in step.vendors:
            rec.outcome = "skipped"
            rec.message = f"only for {', '.join(step.vendors)}"
            return rec
        console = self.platform.machine.console
        self._step_mark = len(console.lines)
        handler = getattr(self, "_do_" + step.do.replace("-", "_"))
        error: BaseException | None = None
        try:
            try:
                handler(step, rec)
            except (IommuError, HypervisorBug) as exc:
                error = exc
            self._expect_after(step, rec, error)
        except StepFailed as exc:
            rec.outcome = "failed"
            rec.message = str(exc)
        rec.console = [ln.text for ln in console.lines[self._step_mark :]]
        self._collect_events(step.index)
        return rec

    def run(self, *, until: str | int | None = None, keep_going: bool = False, final_check: bool = False) -> RunResult:
        """Boot (unless done) and play the steps (up to and including ``until``); never raises for a failed step."""
        res = self.result
        if self._platform is None:
            self.boot()
        res.platform = self.platform
        last = self.sc.step_index(until) if until is not None else len(self.sc.steps)
        for step in self.sc.steps[:last]:
            rec = self.run_step(step)
            res.steps.append(rec)
            if self.on_step is not None:
                self.on_step(rec)
            if rec.outcome == "failed":
                where = f" (line {rec.line})" if rec.line else ""
                msg = f"{rec.label} [{rec.do}]{where}: {rec.message}"
                res.failure = res.failure or msg
                if not keep_going:
                    break
        res.grants = self.resolved_grants()
        if final_check and res.failure is None:
            res.final_check = check(self.platform, grants=res.grants)
        res.counters = self.platform.counters()
        return res


def run_scenario(
    scenario: Scenario,
    vendor: str,
    *,
    until: str | int | None = None,
    keep_going: bool = False,
    final_check: bool = False,
    record_iotlb: bool = False,
    on_step: Callable[[StepRecord], None] | None = None,
) -> RunResult:
    """Boot and run a scenario on one vendor (``ScenarioError`` if the machine cannot be built)."""
    runner = ScenarioRunner(scenario, vendor, record_iotlb=record_iotlb, on_step=on_step)
    return runner.run(until=until, keep_going=keep_going, final_check=final_check)
