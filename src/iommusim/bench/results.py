"""What a benchmark run produces: figures by size, baselines, memory rows, ratios and the issue's targets.

Every figure is a set of ``Measurement``s, one per size (pages mapped, addresses translated, accesses
replayed), compared with a baseline measured in the same run at the same size.  A ratio is always "per
item of the figure / per item of the baseline", so 1.31x means 31% slower than the baseline per page.
``BenchResult.to_json`` holds every number, including each raw sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from iommusim.bench.timing import Measurement

__all__ = [
    "BASELINES",
    "FIGURES",
    "GROUPS",
    "TARGETS",
    "BaselineSpec",
    "BenchResult",
    "Figure",
    "FigureSpec",
    "MemoryRow",
    "Target",
    "TargetStatus",
    "VendorResult",
]


@dataclass(frozen=True)
class BaselineSpec:
    key: str
    title: str
    unit: str


BASELINES: dict[str, BaselineSpec] = {
    b.key: b
    for b in (
        BaselineSpec("c-map", "C per-page map", "page"),
        BaselineSpec("c-walk", "C random walk", "address"),
        BaselineSpec("py-insert", "Python radix insert", "page"),
        BaselineSpec("py-walk", "Python radix walk", "address"),
        BaselineSpec("np-fill", "numpy fill", "entry"),
    )
}


@dataclass(frozen=True)
class FigureSpec:
    """One figure of a vendor: what it measures and which baselines it is printed against (first: main)."""

    key: str
    group: str
    title: str
    unit: str
    baselines: tuple[str, ...]


FIGURES: dict[str, FigureSpec] = {
    f.key: f
    for f in (
        FigureSpec("map-page", "per-page", "per-page map + flush", "page", ("py-insert", "c-map")),
        FigureSpec("unmap-page", "per-page", "per-page unmap + flush", "page", ("py-insert", "c-map")),
        FigureSpec("bulk-map-nosp", "bulk", "bulk map, no superpages", "page", ("c-map", "np-fill")),
        FigureSpec("bulk-unmap-nosp", "bulk", "bulk unmap, no superpages", "page", ("c-map", "np-fill")),
        FigureSpec("bulk-map-sp", "bulk", "bulk map, 2M/1G superpages allowed", "page", ("c-map", "np-fill")),
        FigureSpec("bulk-unmap-sp", "bulk", "bulk unmap, 2M/1G superpages allowed", "page", ("c-map", "np-fill")),
        FigureSpec("hwdom-nosp", "hwdom", "hwdom set-up, no superpages", "page", ("c-map",)),
        FigureSpec("hwdom-sp", "hwdom", "hwdom set-up, 2 MiB superpages allowed", "page", ("c-map",)),
        FigureSpec(
            "translate-bypass", "translate", "batched translation, IOTLB bypassed", "address", ("c-walk", "py-walk")
        ),
        FigureSpec(
            "translate-iotlb", "translate", "batched translation through the IOTLB", "address", ("c-walk", "py-walk")
        ),
        FigureSpec("replay", "replay", "trace replay, 1024-entry IOTLB", "access", ("c-walk", "py-walk")),
    )
}

#: Names ``--only`` accepts besides figure keys.
GROUPS: tuple[str, ...] = ("baselines", "per-page", "bulk", "hwdom", "translate", "replay", "memory")


@dataclass(frozen=True)
class Target:
    """A ratio the issue asks for: ``figure`` per item at most ``max_ratio`` times ``baseline`` per item."""

    figure: str
    baseline: str  # a baseline key, or "tables" for the memory target
    max_ratio: float
    text: str


TARGETS: tuple[Target, ...] = (
    Target("bulk-map-nosp", "c-map", 1.5, "bulk map without superpages <= 1.5x C per-page map"),
    Target("translate-bypass", "c-walk", 2.0, "batched translation bypassing the IOTLB <= 2x C random walk"),
    Target("map-page", "py-insert", 5.0, "per-page map with its flush <= 5x Python radix insert"),
    Target("hwdom-nosp", "c-map", 2.0, "hwdom set-up <= 2x C per-page map of as many pages"),
    Target("hwdom-sp", "c-map", 0.1, "hwdom set-up with 2 MiB superpages <= 0.1x C per-page map"),
    Target("memory", "tables", 1.05, "table memory <= 1.05x the bytes of the table pages"),
)


@dataclass
class Figure:
    key: str
    title: str
    unit: str
    by_size: dict[int, Measurement] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "title": self.title,
            "unit": self.unit,
            "by_size": {str(n): m.to_json() for n, m in sorted(self.by_size.items())},
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class MemoryRow:
    """Memory a bulk map of ``pages`` 4 KiB pages (no superpages) costs, per mapped page."""

    pages: int
    table_frames: int  # table pages the allocator accounted to the map
    table_bytes_per_page: float  # table_frames * 4096 / pages
    bookkeeping_bytes_per_page: float  # Python heap growth outside frame storage (tracemalloc), per page
    rss_bytes_per_page: float  # process RSS growth, per page
    ideal_bytes_per_page: float  # the tables a 4-level tree of this many pages needs (as the C program builds)

    @property
    def ratio(self) -> float:
        """(table pages + bookkeeping) / table pages: what the target bounds."""
        if not self.table_bytes_per_page:
            return 0.0
        return (self.table_bytes_per_page + self.bookkeeping_bytes_per_page) / self.table_bytes_per_page

    @property
    def rss_ratio(self) -> float:
        return self.rss_bytes_per_page / self.table_bytes_per_page if self.table_bytes_per_page else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "pages": self.pages,
            "table_frames": self.table_frames,
            "table_bytes_per_page": self.table_bytes_per_page,
            "bookkeeping_bytes_per_page": self.bookkeeping_bytes_per_page,
            "rss_bytes_per_page": self.rss_bytes_per_page,
            "ideal_bytes_per_page": self.ideal_bytes_per_page,
            "ratio": self.ratio,
            "rss_ratio": self.rss_ratio,
        }


@dataclass(frozen=True)
class TargetStatus:
    target: Target
    pages: int | None  # the size the ratio was taken at (the largest both sides have)
    ratio: float | None  # None: not measured
    note: str = ""

    @property
    def met(self) -> bool | None:
        return None if self.ratio is None else self.ratio <= self.target.max_ratio

    def to_json(self) -> dict[str, object]:
        return {
            "figure": self.target.figure,
            "baseline": self.target.baseline,
            "max_ratio": self.target.max_ratio,
            "text": self.target.text,
            "pages": self.pages,
            "ratio": self.ratio,
            "met": self.met,
            "note": self.note,
        }


@dataclass
class VendorResult:
    vendor: str
    figures: dict[str, Figure] = field(default_factory=dict)
    memory: dict[int, MemoryRow] = field(default_factory=dict)
    #: figure key (or "*" for the whole vendor) -> why it was not measured
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "vendor": self.vendor,
            "figures": {k: f.to_json() for k, f in self.figures.items()},
            "memory": {str(n): r.to_json() for n, r in sorted(self.memory.items())},
            "skipped": dict(self.skipped),
            "notes": list(self.notes),
        }


@dataclass
class BenchResult:
    sizes: tuple[int, ...]
    repeats: int
    machine: dict[str, object] = field(default_factory=dict)
    baselines: dict[str, Figure] = field(default_factory=dict)
    #: Cross-checks between the baselines (C against Python checksums...), by size.
    checks: dict[int, dict[str, object]] = field(default_factory=dict)
    baseline_notes: list[str] = field(default_factory=list)
    vendors: list[VendorResult] = field(default_factory=list)

    def baseline_per_item(self, key: str, pages: int) -> float | None:
        fig = self.baselines.get(key)
        m = fig.by_size.get(pages) if fig is not None else None
        return m.per_item_ns if m is not None else None

    def ratio(self, vendor: VendorResult, figure: str, baseline: str, pages: int) -> float | None:
        """Per-item time of the vendor's figure over the baseline's, both at ``pages``."""
        fig = vendor.figures.get(figure)
        m = fig.by_size.get(pages) if fig is not None else None
        base = self.baseline_per_item(baseline, pages)
        if m is None or not base:
            return None
        return m.per_item_ns / base

    def target_status(self, vendor: VendorResult) -> list[TargetStatus]:
        out: list[TargetStatus] = []
        for t in TARGETS:
            if t.figure == "memory":
                if not vendor.memory:
                    out.append(TargetStatus(t, None, None, vendor.skipped.get("memory", "not measured")))
                    continue
                pages = max(vendor.memory)
                out.append(TargetStatus(t, pages, vendor.memory[pages].ratio))
                continue
            fig = vendor.figures.get(t.figure)
            base = self.baselines.get(t.baseline)
            common = sorted(set(fig.by_size) & set(base.by_size)) if fig and base else []
            if not common:
                why = vendor.skipped.get(t.figure) or ("baseline not measured" if fig else "not measured")
                out.append(TargetStatus(t, None, None, why))
                continue
            pages = common[-1]
            note = "" if pages == 1 << 20 else f"taken at {pages} pages, not 2^20"
            out.append(TargetStatus(t, pages, self.ratio(vendor, t.figure, t.baseline, pages), note))
        return out

    def to_json(self) -> dict[str, object]:
        return {
            "sizes": list(self.sizes),
            "repeats": self.repeats,
            "machine": dict(self.machine),
            "baselines": {k: f.to_json() for k, f in self.baselines.items()},
            "checks": {str(n): c for n, c in sorted(self.checks.items())},
            "baseline_notes": list(self.baseline_notes),
            "vendors": [
                {
                    **v.to_json(),
                    "ratios": {
                        key: {
                            base: {str(n): self.ratio(v, key, base, n) for n in sorted(fig.by_size)}
                            for base in FIGURES[key].baselines
                        }
                        for key, fig in v.figures.items()
                        if key in FIGURES
                    },
                    "targets": [s.to_json() for s in self.target_status(v)],
                }
                for v in self.vendors
            ],
        }
