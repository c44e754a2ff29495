"""What a benchmark run measures: sizes, repeats, the figures asked for, the vendors; as the front ends take them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from iommusim.bench.results import FIGURES, GROUPS
from iommusim.bench.timing import Measurement, measure
from iommusim.errors import InvalidArgument

__all__ = ["DEFAULT_SIZES", "QUICK_SIZES", "BenchOptions", "make_options", "parse_sizes"]

S = TypeVar("S")

DEFAULT_SIZES: tuple[int, ...] = (1 << 14, 1 << 16, 1 << 18, 1 << 20)
QUICK_SIZES: tuple[int, ...] = (1 << 8, 1 << 10)


@dataclass(frozen=True)
class BenchOptions:
    sizes: tuple[int, ...] = DEFAULT_SIZES
    repeats: int = 5
    warmup: int = 1
    #: Stop repeating a figure at one size once it has taken this long (after at least three runs).
    budget_s: float | None = 30.0
    #: Figure keys or group names to measure (empty: all); baselines are always measured.
    only: frozenset[str] = frozenset()
    #: Vendors to measure (None: every registered one).
    vendors: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.sizes or any(n < 1 for n in self.sizes):
            raise InvalidArgument("benchmark sizes are positive page counts")
        if self.repeats < 1:
            raise InvalidArgument("at least one repeat")
        unknown = set(self.only) - set(FIGURES) - set(GROUPS)
        if unknown:
            names = ", ".join(sorted(set(FIGURES) | set(GROUPS)))
            raise InvalidArgument(f"unknown benchmark {', '.join(sorted(unknown))}; choose from {names}")

    def wants(self, key: str) -> bool:
        if not self.only:
            return True
        group = FIGURES[key].group if key in FIGURES else key
        return key in self.only or group in self.only

    @property
    def vendor_figures_wanted(self) -> bool:
        return not self.only or bool(self.only - {"baselines"})

    def timing(self) -> dict[str, object]:
        return {"repeats": self.repeats, "warmup": self.warmup, "budget_s": self.budget_s}

    def time(self, name: str, run: Callable[[S], object], setup: Callable[[], S], items: int) -> Measurement:
        """``measure`` with these options' repeats, warm-up and budget."""
        return measure(name, run, setup, items=items, repeats=self.repeats, warmup=self.warmup, budget_s=self.budget_s)


_MAX_EXPONENT = 30


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"14,16,18"`` (or ``"2^14 2^16"``) -> (2**14, 2**16, 2**18): sizes are powers of two."""
    out: set[int] = set()
    for word in filter(None, (w.strip() for w in text.replace(" ", ",").split(","))):
        exp = word.removeprefix("2^")
        if not exp.isdigit() or int(exp) > _MAX_EXPONENT:
            raise InvalidArgument(f"{word!r} is not a power-of-two exponent from 0 to {_MAX_EXPONENT}")
        out.add(1 << int(exp))
    if not out:
        raise InvalidArgument("give at least one size, e.g. 14,16")
    return tuple(sorted(out))


def make_options(
    *,
    quick: bool = False,
    sizes: str | None = None,
    repeats: int | None = None,
    only: Sequence[str] = (),
    vendors: Sequence[str] | None = None,
) -> BenchOptions:
    """Options as the front ends take them: ``quick`` means tiny sizes, 3 repeats and a short budget."""
    names = frozenset(w.strip() for item in only for w in item.split(",") if w.strip())
    return BenchOptions(
        sizes=parse_sizes(sizes) if sizes else (QUICK_SIZES if quick else DEFAULT_SIZES),
        repeats=repeats or (3 if quick else 5),
        budget_s=5.0 if quick else 30.0,
        only=names,
        vendors=tuple(vendors) if vendors else None,
    )
