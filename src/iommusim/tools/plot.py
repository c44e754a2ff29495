"""Pictures where people would rather look than read: a domain's address-space map, the IOTLB's timeline.

Both draw with matplotlib's object API on the Agg canvas (no display, no pyplot state), so they work in
tests, on servers and from threads.

* ``plot_address_map``: every translation of a domain's tables as a segment from (Dfn, Mfn) to
  (Dfn + n, Mfn + n): a 1:1 map is the diagonal, a guest's RAM a line offset from it.  Colour says the
  permissions, line width the page size; grey bands mark the machine frames the domain owns, so a
  segment outside the bands is a translation into memory that is not the domain's.
* ``plot_iotlb_timeline``: the IOTLB events a scenario run recorded (hits, misses, fills, evictions and
  invalidations by granularity) against their order, with the steps that caused them marked, and the
  running hit and miss counts below.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MultipleLocator

from iommusim.pagetable.walk import Mapping
from iommusim.perms import Perm
from iommusim.tools.scenario.runner import IotlbEvent, StepRecord

__all__ = ["plot_address_map", "plot_iotlb_timeline"]

_PERM_COLOUR = {Perm.RW: "#2ca02c", Perm.R: "#1f77b4", Perm.W: "#ff7f0e", Perm.NONE: "#7f7f7f"}
_PERM_NAME = {Perm.RW: "read-write", Perm.R: "read-only", Perm.W: "write-only", Perm.NONE: "no access"}
_SIZE_WIDTH = {12: 1.5, 21: 3.5, 30: 6.0}
_EVENT_ROWS = ["hit", "miss", "fill", "evict", "inv-page", "inv-domain", "inv-all"]
_EVENT_COLOUR = {
    "hit": "#2ca02c",
    "miss": "#d62728",
    "fill": "#1f77b4",
    "evict": "#9467bd",
    "inv-page": "#ff7f0e",
    "inv-domain": "#8c564b",
    "inv-all": "#e377c2",
}


def _size_width(shift: int) -> float:
    """Line width for a page size: the usual three, and sizes between them (AMD NextLevel-7 pages) between."""
    if shift in _SIZE_WIDTH:
        return _SIZE_WIDTH[shift]
    return min(8.0, max(1.0, 1.5 + (shift - 12) * (6.0 - 1.5) / 18))


def _size_name(shift: int) -> str:
    size = 1 << shift
    for unit, bits in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << bits:
            return f"{size >> bits}{unit} pages"
    return f"{size}-byte pages"


def _tick_step(span: float) -> int:
    """A power-of-two tick spacing giving 4 to 8 ticks: frame numbers read best in hex at such steps."""
    step = 1
    while span / step > 8:
        step *= 2
    return step


def plot_address_map(
    mappings: Sequence[Mapping],
    path: str | Path,
    *,
    title: str = "",
    owned: Sequence[tuple[int, int]] = (),
    size: tuple[float, float] = (10.0, 7.0),
    dpi: int = 100,
) -> Path:
    """Draw the translations (Dfn -> Mfn) of one tree; ``owned`` lists (first mfn, count) the domain owns."""
    fig = Figure(figsize=size, dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    for first, count in owned:
        ax.axhspan(first, first + count, color="#dddddd", zorder=0, lw=0)
    by_style: dict[tuple[Perm, int], list[list[tuple[float, float]]]] = {}
    starts: dict[Perm, list[tuple[float, float]]] = {}
    for m in mappings:
        perms = Perm(int(m.perms) & int(Perm.RW))
        by_style.setdefault((perms, m.page_shift), []).append([(m.dfn, m.mfn), (m.dfn_end, m.mfn + m.pages)])
        starts.setdefault(perms, []).append((m.dfn, m.mfn))
    for (perms, shift), segs in sorted(by_style.items(), key=lambda kv: (kv[0][1], int(kv[0][0]))):
        lc = LineCollection(segs, colors=_PERM_COLOUR[perms], linewidths=_size_width(shift), zorder=2)
        ax.add_collection(lc)
    for perms, pts in starts.items():
        arr = np.array(pts, dtype=float)
        ax.scatter(arr[:, 0], arr[:, 1], s=9, color=_PERM_COLOUR[perms], zorder=3)
    if mappings:
        lo_d = min(m.dfn for m in mappings)
        hi_d = max(m.dfn_end for m in mappings)
        lo_m = min([m.mfn for m in mappings] + [f for f, _ in owned])
        hi_m = max([m.mfn + m.pages for m in mappings] + [f + n for f, n in owned])
        pad_d, pad_m = max(1, (hi_d - lo_d) // 20), max(1, (hi_m - lo_m) // 20)
        ax.set_xlim(lo_d - pad_d, hi_d + pad_d)
        ax.set_ylim(lo_m - pad_m, hi_m + pad_m)
    else:
        ax.text(0.5, 0.5, "no translations", ha="center", va="center", transform=ax.transAxes, fontsize=14)
    ax.set_xlabel("device frame (Dfn)")
    ax.set_ylabel("machine frame (Mfn)")
    ax.ticklabel_format(style="plain", useOffset=False)
    for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        axis.set_major_locator(MultipleLocator(_tick_step(hi - lo)))
        axis.set_major_formatter(lambda v, _pos: f"{int(v):#x}")
    ax.grid(True, alpha=0.3)
    pages: Counter[int] = Counter()
    for m in mappings:
        pages[m.page_shift] += m.pages
    summary = ", ".join(f"{n} pages in {_size_name(s)}" for s, n in sorted(pages.items()))
    ax.set_title((title + "\n" if title else "") + (summary or "nothing mapped"), fontsize=10)
    handles = [Line2D([], [], color=_PERM_COLOUR[p], lw=3, label=_PERM_NAME[p]) for p in starts]
    handles += [
        Line2D([], [], color="black", lw=_size_width(s), label=_size_name(s)) for s in sorted({k[1] for k in by_style})
    ]
    if owned:
        handles.append(Line2D([], [], color="#dddddd", lw=8, label="frames the domain owns"))
    if handles:
        ax.legend(handles=handles, loc="best", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out


def plot_iotlb_timeline(
    events: Sequence[IotlbEvent],
    path: str | Path,
    *,
    steps: Sequence[StepRecord] = (),
    title: str = "",
    size: tuple[float, float] = (11.0, 6.5),
    dpi: int = 100,
) -> Path:
    """Draw the recorded IOTLB events in order, with the steps that caused them and running hit/miss counts."""
    fig = Figure(figsize=size, dpi=dpi)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    kinds = [k for k in _EVENT_ROWS if any(e.kind == k for e in events)] or _EVENT_ROWS[:2]
    row = {k: i for i, k in enumerate(kinds)}
    seq = np.array([e.seq for e in events], dtype=float)
    for k in kinds:
        xs = [e.seq for e in events if e.kind == k]
        top.scatter(xs, [row[k]] * len(xs), marker="|", s=140, color=_EVENT_COLOUR.get(k, "black"), label=k)
    top.set_yticks(range(len(kinds)))
    top.set_yticklabels(kinds)
    top.set_ylim(-0.7, len(kinds) - 0.3)
    labels = {s.index: (s.name or s.do) for s in steps}
    first_of_step: dict[int, int] = {}
    for e in events:
        first_of_step.setdefault(e.step, e.seq)
    for step, x in sorted(first_of_step.items()):
        top.axvline(x - 0.5, color="#999999", lw=0.6, ls="--")
        bottom.axvline(x - 0.5, color="#999999", lw=0.6, ls="--")
        top.text(
            x - 0.4,
            len(kinds) - 0.45,
            "set-up" if step == 0 else f"{step} {labels.get(step, '')}",
            fontsize=7,
            rotation=90,
            va="top",
            color="#555555",
        )
    if events:
        hits = np.cumsum([e.kind == "hit" for e in events])
        misses = np.cumsum([e.kind == "miss" for e in events])
        bottom.step(seq, hits, where="post", color=_EVENT_COLOUR["hit"], label="hits so far")
        bottom.step(seq, misses, where="post", color=_EVENT_COLOUR["miss"], label="misses so far")
        bottom.legend(loc="upper left", fontsize=8)
        total = Counter(e.kind for e in events)
        summary = ", ".join(f"{total[k]} {k}" for k in kinds if total[k])
    else:
        top.text(0.5, 0.5, "no IOTLB activity was recorded", ha="center", va="center", transform=top.transAxes)
        summary = "no events"
    bottom.set_xlabel("IOTLB event (in order)")
    bottom.set_ylabel("count")
    bottom.grid(True, alpha=0.3)
    top.grid(True, axis="x", alpha=0.3)
    top.set_title((title + "\n" if title else "") + summary, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out
