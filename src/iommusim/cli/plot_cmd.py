"""``iommusim plot``: PNG pictures of a domain's address space and of the IOTLB's activity."""

from __future__ import annotations

from pathlib import Path

import typer

from iommusim.cli.common import Exit, console, scenario_path, user_errors
from iommusim.errors import NoSuchDomain
from iommusim.tools.dump import dump_platform
from iommusim.tools.scenario.model import load_scenario
from iommusim.tools.scenario.runner import RunResult, run_scenario, vendors_for

__all__ = ["plot_command"]


def _out(path: Path, kind: str, vendor: str, many: bool, both: bool) -> Path:
    stem = path.stem + (f"-{kind}" if both else "") + (f"-{vendor}" if many else "")
    return path.with_name(stem + (path.suffix or ".png"))


def _owned(res: RunResult, domid: int) -> list[tuple[int, int]]:
    assert res.platform is not None
    d = res.platform.machine.domains.get(domid)
    return [] if d is None else [(e.mfn.value, e.count) for e in d.extents]


def plot_command(
    scenario: str = typer.Argument("demo", help="A scenario file or example name (default: the demo's machine)."),
    kind: str = typer.Option(
        "map", "--kind", "-k", help="map (a domain's address space), timeline (IOTLB events) or both."
    ),
    output: Path = typer.Option(Path("iommusim.png"), "--output", "-o", help="PNG file to write."),
    vendor: str | None = typer.Option(
        None, "--vendor", "-v", help="Only this vendor (default: every one it applies to)."
    ),
    until: str | None = typer.Option(None, "--until", "-u", help="Picture the machine as it is after this step."),
    domain: int = typer.Option(
        None, "--domain", "-d", help="The domain to map (default: the first guest with tables)."
    ),
) -> None:
    """Draw PNG pictures of a scenario's machine (matplotlib, no display needed).

    map: every translation of a domain's tables, device frame against machine frame, coloured by
    permission, thicker for bigger pages, over grey bands marking the frames the domain owns.
    timeline: the IOTLB's hits, misses, fills, evictions and invalidations in order, the steps that
    caused them, and running hit/miss counts.  With several vendors (or --kind both) the file name gets
    the vendor (and kind) appended.

    Examples:

      iommusim plot -o demo.png
      iommusim plot superpage-split --domain 1 --until split -o split.png
      iommusim plot stale-window --kind timeline -o tlb.png --vendor vtd
    """
    if kind not in ("map", "timeline", "both"):
        raise typer.BadParameter("--kind is map, timeline or both")
    from iommusim.tools.plot import plot_address_map, plot_iotlb_timeline  # matplotlib takes a while to load

    out = console()
    with user_errors():
        sc = load_scenario(scenario_path(scenario))
        if until is not None:
            sc.step_index(until)
        vendors = vendors_for(sc, vendor)
        many = len(vendors) > 1
        failed = False
        for v in vendors:
            res = run_scenario(sc, v, until=until, record_iotlb=kind != "map")
            assert res.platform is not None
            failed = failed or res.failure is not None
            if kind in ("map", "both"):
                every = sorted(res.platform.machine.domains)
                if not every:
                    raise NoSuchDomain("the machine has no domain to map")
                guests = [d for d in every if d != 0]
                doms = [domain] if domain is not None else [(guests or every)[0]]
                dump = dump_platform(res.platform, domains=doms, tree=False, caches=False)
                dd = dump.domains[0]
                where = f" after step {until}" if until else ""
                title = f"{sc.name} on {v}{where}: {dd.name}'s DMA address space"
                path = plot_address_map(
                    dd.mappings, _out(output, "map", v, many, kind == "both"), title=title, owned=_owned(res, dd.domid)
                )
                out.print(f"wrote {path} ({dd.name}: {dd.pages} pages in {len(dd.mappings)} runs)")
            if kind in ("timeline", "both"):
                title = f"{sc.name} on {v}: IOTLB events"
                path = plot_iotlb_timeline(
                    res.iotlb_events, _out(output, "timeline", v, many, kind == "both"), steps=res.steps, title=title
                )
                out.print(f"wrote {path} ({len(res.iotlb_events)} IOTLB events)")
    raise typer.Exit(int(Exit.FAILED if failed else Exit.OK))
