"""Printing a benchmark run: each figure beside the baselines measured in the same run, as ratios.

For every vendor: one line per figure at the largest size ("bulk map, no superpages: 182 ns/page = 1.31x
C per-page map"), how each figure's cost per item grows across the sizes, the memory per mapped page, and
the issue's targets with whether each is met.  The baselines come first, with their own growth and the
cross-checks that show the C and Python baselines built the same thing.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from iommusim.bench.results import BASELINES, FIGURES, BenchResult, Figure, VendorResult

__all__ = ["format_ns", "format_size", "render"]


def format_ns(ns: float) -> str:
    """A duration with a unit that keeps three significant digits or so."""
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def format_size(n: int) -> str:
    """2^k for powers of two, else the number."""
    return f"2^{n.bit_length() - 1}" if n > 0 and not n & (n - 1) else str(n)


def _per_item(fig: Figure, n: int) -> str:
    m = fig.by_size.get(n)
    return f"{format_ns(m.per_item_ns)}" if m is not None else "-"


def _growth_table(title: str, figures: list[Figure], sizes: tuple[int, ...]) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("per item")
    for n in sizes:
        t.add_column(format_size(n), justify="right")
    growing = len(sizes) > 1
    if growing:
        t.add_column(f"{format_size(sizes[-1])} / {format_size(sizes[0])}", justify="right")
    for fig in figures:
        cells = [_per_item(fig, n) for n in sizes]
        if growing:
            first, last = fig.by_size.get(sizes[0]), fig.by_size.get(sizes[-1])
            cells.append(f"{last.per_item_ns / first.per_item_ns:.2f}x" if first and last else "-")
        t.add_row(f"{fig.title} (per {fig.unit})", *cells)
    return t


def _baselines(result: BenchResult, out: Console) -> None:
    out.rule("[bold]Baselines (measured in this run)")
    figs = [f for f in result.baselines.values() if f.by_size]
    if figs:
        out.print(_growth_table("Baselines: median time per item", figs, result.sizes))
    checks = Table(title="Cross-checks: the baselines built the same tables", title_justify="left")
    for col in ("pages", "tables (C / Python)", "C walk checksum = Python", "numpy fill = Python leaves"):
        checks.add_column(col)
    for n, c in sorted(result.checks.items()):
        c_tables = c.get("c_tables", "-")
        matches = c.get("c_matches_py")
        checks.add_row(
            format_size(n),
            f"{c_tables} / {c.get('py_tables', '-')}",
            "-" if matches is None else ("yes" if matches else "[red]NO[/]"),
            "yes" if c.get("np_fill_matches_py") else "[red]NO[/]",
        )
    if result.checks:
        out.print(checks)
    for note in result.baseline_notes:
        out.print(f"[yellow]note:[/] {note}")


def _figure_lines(result: BenchResult, v: VendorResult, out: Console) -> None:
    for key, spec in FIGURES.items():
        fig = v.figures.get(key)
        if fig is None or not fig.by_size:
            if key in v.skipped:
                out.print(f"{spec.title}: [yellow]not measured[/] ({v.skipped[key]})")
            continue
        n = max(fig.by_size)
        m = fig.by_size[n]
        ratios = []
        for base in spec.baselines:
            r = result.ratio(v, key, base, n)
            if r is not None:
                ratios.append(f"{r:.3g}x {BASELINES[base].title}")
        extra = ""
        if "hit_rate" in m.extra:
            extra = f", IOTLB hit rate {m.extra['hit_rate']:.1%}"
        if m.extra.get("faults") or m.extra.get("wrong"):
            extra += f", [red]{m.extra.get('faults', 0):.0f} faults, {m.extra.get('wrong', 0):.0f} wrong[/]"
        if m.extra.get("iotlb_bypassed") == 0.0 and key == "translate-bypass":
            extra += ", [yellow]IOTLB not bypassed (reference path)[/]"
        against = " = " + ", ".join(ratios) if ratios else " (no baseline at this size)"
        out.print(
            f"{spec.title} at {format_size(n)}: {format_ns(m.per_item_ns)}/{spec.unit}{against} "
            f"[dim](IQR ±{m.spread / 2:.0%}, {len(m.samples_ns)} runs){extra}[/]"
        )


def _memory(v: VendorResult, out: Console) -> None:
    if not v.memory:
        return
    t = Table(title="Memory per mapped page (bulk map, no superpages)", title_justify="left")
    for col in (
        "pages",
        "table frames",
        "tables B/page",
        "C-shaped tree B/page",
        "+ bookkeeping B/page",
        "RSS growth B/page",
        "(tables+bookkeeping)/tables",
    ):
        t.add_column(col, justify="right")
    for n, r in sorted(v.memory.items()):
        t.add_row(
            format_size(n),
            str(r.table_frames),
            f"{r.table_bytes_per_page:.2f}",
            f"{r.ideal_bytes_per_page:.2f}",
            f"{r.bookkeeping_bytes_per_page:.2f}",
            f"{r.rss_bytes_per_page:.2f}",
            f"{r.ratio:.3f}x",
        )
    out.print(t)


def _targets(result: BenchResult, v: VendorResult, out: Console) -> None:
    t = Table(title="Targets of issue 8", title_justify="left")
    for col in ("target", "at", "measured", "limit", "met"):
        t.add_column(col)
    for s in result.target_status(v):
        met = {None: "[yellow]n/a[/]", True: "[green]yes[/]", False: "[red]no[/]"}[s.met]
        t.add_row(
            s.target.text,
            format_size(s.pages) if s.pages else "-",
            f"{s.ratio:.3g}x" if s.ratio is not None else s.note,
            f"{s.target.max_ratio:g}x",
            met + (f" [dim]({s.note})[/]" if s.note and s.ratio is not None else ""),
        )
    out.print(t)


def render(result: BenchResult, out: Console | None = None) -> None:
    out = out or Console(highlight=False)
    m = result.machine
    out.print(
        f"[bold]iommusim bench[/]: {m.get('cpus')} CPU(s) ({m.get('cpu')}), Python {m.get('python')}, "
        f"numpy {m.get('numpy')}, C: {m.get('c_compiler', 'none')}; median of {result.repeats} run(s) "
        f"after {m.get('warmup', 0)} warm-up"
    )
    _baselines(result, out)
    for v in result.vendors:
        out.rule(f"[bold]{v.vendor}")
        if "*" in v.skipped:
            out.print(f"[yellow]skipped:[/] {v.skipped['*']}")
            continue
        _figure_lines(result, v, out)
        figs = [v.figures[k] for k in FIGURES if k in v.figures and v.figures[k].by_size]
        if figs:
            out.print(_growth_table(f"{v.vendor}: median time per item by size", figs, result.sizes))
        _memory(v, out)
        _targets(result, v, out)
        for note in v.notes:
            out.print(f"[yellow]note:[/] {note}")
