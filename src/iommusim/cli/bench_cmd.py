"""``iommusim bench``: measure the model and print each figure beside baselines measured in the same run."""

from __future__ import annotations

import json
from pathlib import Path

import typer

__all__ = ["bench"]


def bench(
    vendor: list[str] = typer.Option(
        None, "--vendor", "-v", help="Only these vendors (repeatable; default: every registered vendor)."
    ),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes (2^8, 2^10) and 3 repeats: a smoke test."),
    sizes: str = typer.Option(
        None, "--sizes", help="Sizes as powers of two, comma-separated: 14,16,18,20 (the default) is 2^14..2^20 pages."
    ),
    repeats: int = typer.Option(None, "--repeats", min=1, help="Timed runs per figure and size (default 5)."),
    json_path: Path = typer.Option(None, "--json", help="Also write every number (raw samples included) here."),
    only: list[str] = typer.Option(
        None,
        "--only",
        help="Only these figures or groups (repeatable or comma-separated): per-page, bulk, hwdom, translate, "
        "replay, memory, baselines, or a figure key such as bulk-map-nosp. Baselines are always measured.",
    ),
) -> None:
    """Benchmark each vendor against C, Python and numpy baselines measured in the same run.

    Each figure is the median of repeated runs, per item (page, address or access), at each size (by
    default 2^14, 2^16, 2^18 and 2^20 pages, so that growth is visible), with its spread (the interquartile
    range) and as a ratio to a baseline: "bulk map, no superpages at 2^20: 182 ns/page = 1.31x C per-page
    map" means 31% slower per page than the C program mapping the same number of pages.

    Baselines: a C program compiled now with the system compiler (-O2): per-page maps into 4-level tables
    of 512 64-bit entries allocated on demand, and random 4-level walks (skipped with a note without a
    compiler); a plain-Python radix model (lists of 512 entries), its insert and its walk; a numpy fill of
    as many 64-bit entries as a bulk map writes.

    Figures per vendor, with their --only names:

    (1) per-page: map-page, unmap-page: per-page map and unmap through the generic layer, each with the
    driver's own flush.

    (2) bulk: bulk-map-nosp, bulk-unmap-nosp, bulk-map-sp, bulk-unmap-sp: map and unmap of the whole range
    in one call and one flush, superpages forbidden (nosp) and 2 MiB and 1 GiB ones allowed (sp).

    (3) hwdom: hwdom-nosp, hwdom-sp: set-up of a hardware domain of that many pages (strict mode: only its
    own pages are mapped), superpages forbidden (nosp) and 2 MiB ones allowed (sp).

    (4) translate: translate-bypass, translate-iotlb: batched translation of that many random addresses,
    bypassing the IOTLB and through it (cold at the start of each run).

    (5) replay: a DMA trace of that many accesses through a 1024-entry IOTLB, with its hit rate.

    (6) memory: bytes per mapped page: table pages, Python bookkeeping, and process RSS growth.

    The issue's targets are printed with whether each is met, at the largest size measured. A vendor that
    is not installed is skipped with a note; a hardware model without a batch API is measured through the
    reference loop over translate(), and the report says so.
    """
    from rich.console import Console

    from iommusim.bench import make_options, render, run_benchmarks
    from iommusim.errors import InvalidArgument

    try:
        opts = make_options(quick=quick, sizes=sizes, repeats=repeats, only=only or (), vendors=vendor or None)
    except InvalidArgument as exc:
        raise typer.BadParameter(exc.message) from None
    err = Console(stderr=True, highlight=False)
    result = run_benchmarks(opts, progress=lambda text: err.print(f"[dim]{text}[/]"))
    render(result)
    if json_path is not None:
        json_path.write_text(json.dumps(result.to_json(), indent=1) + "\n", encoding="utf-8")
        err.print(f"wrote {json_path}")


def _reflow(doc: str) -> str:
    """One line per paragraph, so that the help wraps to the terminal instead of at the source's width."""
    paragraphs = [" ".join(line.strip() for line in p.splitlines()) for p in doc.strip().split("\n\n")]
    return "\n\n".join(paragraphs)


bench.__doc__ = _reflow(bench.__doc__ or "")
