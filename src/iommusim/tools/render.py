"""Rich renderings of the tools' results: table trees, mapping lists, caches, counters, check reports, steps."""

from __future__ import annotations

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from iommusim.pagetable.walk import Mapping
from iommusim.tools.check import CacheState, CheckReport
from iommusim.tools.decode import DecodeResult
from iommusim.tools.dump import DomainDump, MachineDump
from iommusim.tools.scenario.runner import StepRecord
from iommusim.tools.tables import TableNode, TableTree

__all__ = [
    "check_report",
    "decode_result",
    "machine_dump",
    "mapping_table",
    "step_line",
    "table_tree",
]

_STATE_STYLE = {
    "ok": "green",
    "stale": "yellow",
    "violation": "bold red",
    "hidden": "yellow",
    "unused": "dim",
}


def _size(shift: int) -> str:
    if shift >= 30:
        return f"{1 << (shift - 30)}G"
    if shift >= 20:
        return f"{1 << (shift - 20)}M"
    return f"{1 << (shift - 10)}K"


def mapping_table(runs: list[Mapping], *, title: str = "", max_rows: int = 64) -> Table:
    """Xen's dump key, as a table: one row per run of contiguous frames with the same rights and page size."""
    t = Table(title=title or None, title_justify="left", show_edge=False, pad_edge=False)
    t.add_column("dfn", justify="right", style="cyan")
    t.add_column("", justify="center")
    t.add_column("mfn", justify="right", style="magenta")
    t.add_column("pages", justify="right")
    t.add_column("perms")
    t.add_column("page size")
    for m in runs[:max_rows]:
        dfn = f"{m.dfn:#x}" if m.pages == 1 else f"{m.dfn:#x}-{m.dfn_end - 1:#x}"
        mfn = f"{m.mfn:#x}" if m.pages == 1 else f"{m.mfn:#x}-{m.mfn + m.pages - 1:#x}"
        t.add_row(dfn, "->", mfn, str(m.pages), m.perms.short(), _size(m.page_shift))
    if len(runs) > max_rows:
        t.add_row("...", "", f"{len(runs) - max_rows} more runs", "", "", "")
    return t


def _node(tree: Tree, node: TableNode) -> None:
    branch = tree.add(Text(node.describe(), style="bold" if node.children else ""))
    for p in node.problems:
        branch.add(Text(p, style="red"))
    for run in node.leaves:
        branch.add(Text(run.describe(), style="green" if "w" in run.perms.short() else "cyan"))
    for child in node.children:
        _node(branch, child)


def table_tree(tt: TableTree, label: str) -> Tree:
    """The tables as a tree: each table with its address and coverage, its leaves as runs, its sub-tables."""
    tree = Tree(Text(f"{label}: {tt.root.describe()}, {tt.tables} table page(s)", style="bold"))
    for top in tt.tops:
        _node(tree, top)
    if tt.hidden:
        tree.add(Text(f"... {tt.hidden} more table page(s) not shown (raise --max-tables)", style="dim"))
    return tree


def _cache_table(states: list[CacheState], max_rows: int) -> Table:
    t = Table(title="Cached translations", title_justify="left", show_edge=False, pad_edge=False)
    for col in ("unit", "cache", "tag", "daddr", "size", "maddr", "perms", "state"):
        t.add_column(col, justify="right" if col in ("tag", "daddr", "maddr") else "left")
    for s in states[:max_rows]:
        e = s.entry
        tag = f"sid {e.tag:#06x}" if e.by_source else f"{e.tag:#x}"
        state = Text(s.state + ("" if s.state == "ok" else f": {_short_state(s)}"), style=_STATE_STYLE[s.state])
        maddr = "not present" if e.negative else f"{e.maddr:#x}"
        t.add_row(e.unit, e.cache, tag, f"{e.daddr:#x}", _size(e.page_shift), maddr, e.perms.short(), state)
    if len(states) > max_rows:
        t.add_row("...", f"{len(states) - max_rows} more", "", "", "", "", "", "")
    return t


def _short_state(s: CacheState) -> str:
    if s.state == "stale":
        return "flush owed"
    if s.state == "violation":
        return "NO flush outstanding"
    return s.message


def _domain(d: DomainDump, max_rows: int) -> RenderableType:
    parts: list[RenderableType] = []
    head = f"[bold]{d.name}[/] ({d.kind}{', hardware domain' if d.hardware else ''}, {d.state}), IOMMU {d.iommu}"
    parts.append(Text.from_markup(head))
    if d.tables is None:
        parts.append(Text("  no IOMMU tables", style="dim"))
    for name, ctx in d.devices:
        where = f"{ctx.unit} sid {ctx.source_id:#06x}: {ctx.mode.value}"
        parts.append(Text(f"  device {name}: {where}" + (f" ({ctx.detail})" if ctx.detail else "")))
    if d.owed:
        owed = ", ".join(f"dfn {a:#x}" + (f" x{n}" if n > 1 else "") for a, n in d.owed)
        parts.append(Text(f"  flush owed for: {owed}", style="yellow"))
    for p in d.problems:
        parts.append(Text(f"  {p}", style="red"))
    if d.tree is not None:
        parts.append(table_tree(d.tree, f"{d.name} tables"))
    if d.tables is not None:
        parts.append(
            mapping_table(
                d.mappings, title=f"{d.name}: {d.pages} page(s) mapped in {len(d.mappings)} run(s)", max_rows=max_rows
            )
        )
    return Group(*parts)


def machine_dump(dump: MachineDump, *, max_rows: int = 64) -> RenderableType:
    parts: list[RenderableType] = [_domain(d, max_rows) for d in dump.domains]
    if dump.caches:
        parts.append(_cache_table(dump.caches, max_rows))
    sizes = Table(title="Cache occupancy", title_justify="left", show_edge=False, pad_edge=False)
    for col in ("unit", "cache", "entries"):
        sizes.add_column(col)
    for s in dump.cache_sizes:
        sizes.add_row(s.unit, s.name, f"{s.entries}" + (f" of {s.capacity}" if s.capacity else ""))
    parts.append(sizes)
    counters = Table(title="Counters", title_justify="left", show_edge=False, pad_edge=False)
    counters.add_column("unit")
    counters.add_column("counter")
    counters.add_column("value", justify="right")
    for unit, values in dump.counters.items():
        for name, value in sorted(values.items()):
            if value:
                counters.add_row(unit, name, str(value))
    parts.append(counters)
    return Group(*parts)


def check_report(report: CheckReport) -> RenderableType:
    parts: list[RenderableType] = []
    if report.ok:
        parts.append(Text("isolation holds: no violation", style="bold green"))
    else:
        parts.append(Text(f"{len(report.violations)} isolation violation(s)", style="bold red"))
        for v in report.violations:
            parts.append(Text(f"  [{v.kind}] {v.message}", style="red"))
    for s in report.stale:
        parts.append(Text(f"  [stale window] {s.message}", style="yellow"))
    for n in report.notes:
        parts.append(Text(f"  note: {n}", style="dim"))
    stats = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(report.stats.items()))
    if stats:
        parts.append(Text(f"  checked: {stats}", style="dim"))
    return Group(*parts)


def decode_result(result: DecodeResult, trees: dict[str, TableTree], *, max_rows: int = 64) -> RenderableType:
    parts: list[RenderableType] = [
        Text(f"{result.format} at {result.root:#x}: {len(result.spaces)} address space(s)", style="bold")
    ]
    for p in result.problems:
        parts.append(Text(f"  {p}", style="red"))
    for s in result.spaces:
        attrs = ", ".join(f"{k} {v}" for k, v in s.attrs.items())
        users = f" used by {', '.join(s.sources)}" if s.sources else ""
        parts.append(Text(f"{s.label} ({s.mode.value}{', ' + attrs if attrs else ''}){users}", style="bold cyan"))
        for p in s.problems:
            parts.append(Text(f"  {p}", style="red"))
        if s.label in trees:
            parts.append(table_tree(trees[s.label], s.label))
        if s.tables is not None:
            parts.append(
                mapping_table(s.mappings, title=f"{s.pages} page(s) in {len(s.mappings)} run(s)", max_rows=max_rows)
            )
    return Group(*parts)


def step_line(rec: StepRecord) -> Text:
    mark = {"ok": ("✓", "green"), "failed": ("✗", "bold red"), "skipped": ("-", "dim")}[rec.outcome]
    out = Text()
    out.append(f"{mark[0]} ", style=mark[1])
    out.append(f"{rec.index:>3} ", style="dim")
    out.append(f"{rec.do:<14} ", style="bold")
    out.append(rec.summary if rec.summary != rec.do else "")
    if rec.message:
        out.append("  → " if rec.summary != rec.do else "→ ", style="dim")
        out.append(rec.message, style="red" if rec.outcome == "failed" else "")
    return out


def print_step(out: Console, rec: StepRecord, *, show_console: bool = True, max_rows: int = 64) -> None:
    if rec.note:
        out.print(Text(f"      # {rec.note}", style="italic dim"))
    out.print(step_line(rec))
    if show_console:
        for line in rec.console:
            out.print(Text(f"        xen: {line}", style="dim"))
    if rec.dump is not None:
        out.print(machine_dump(rec.dump, max_rows=max_rows))
    if rec.report is not None and (rec.report.violations or rec.report.stale):
        out.print(check_report(rec.report))
