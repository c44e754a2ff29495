"""``iommusim check``: isolation invariants of a scenario's machine, or of the tables in a memory image."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from iommusim.cli.common import Exit, console, scenario_path, user_errors, write_json
from iommusim.cli.decode_cmd import gather_options, parse_int
from iommusim.images import open_image
from iommusim.tools.check import check, check_image
from iommusim.tools.decode import CachingReader, decoder, image_frames
from iommusim.tools.render import check_report, print_step
from iommusim.tools.scenario.model import load_scenario
from iommusim.tools.scenario.runner import StepRecord, run_scenario, vendors_for
from iommusim.tools.vendors import VENDOR_TITLES

__all__ = ["check_command"]


def check_command(
    scenario: str = typer.Argument("demo", help="A scenario file or example name (default: the demo's machine)."),
    vendor: str | None = typer.Option(
        None, "--vendor", "-v", help="Only this vendor (default: every one it applies to)."
    ),
    until: str | None = typer.Option(None, "--until", "-u", help="Check the machine as it is after this step."),
    verbose: bool = typer.Option(False, "--verbose", "-V", help="Show the scenario's steps as they run."),
    image: Path | None = typer.Option(None, "--image", help="Check the tables in this memory image instead."),
    fmt: str = typer.Option(
        None, "--format", "-f", help="With --image: the image format (iommusim decode --list-formats)."
    ),
    root: str | None = typer.Option(None, "--root", "-r", help="With --image: machine address of the root table."),
    base: str = typer.Option("0", "--base", help="With --image: physical address of a raw image's first byte."),
    option: list[str] | None = typer.Option(None, "--option", "-o", help="With --image: a format option, KEY=VALUE."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the report as JSON here ('-': stdout)."),
) -> None:
    """Check isolation: every translation a device can make lands in memory its domain owns or was granted.

    On a scenario (run to its end, or to --until, and checked at its check steps on the way): every
    device's tables are walked from memory, every cached translation is compared with memory (a
    disagreement the flush ledger says is owed is a stale window, anything else a violation), and table
    pages are checked for orphans, leaks and sharing.  The policy is written out in the README ("What
    check checks").  On an image: decoding problems, table pages shared between address spaces and
    translations that reach table pages.

    Exit status: 0 no violation, 1 violations (or a failed scenario), 2 a usage or scenario mistake,
    3 an image that cannot be decoded.

    Examples:

      iommusim check                                   the demo machine
      iommusim check my.toml --until before-flush --json report.json
      iommusim check --image mem.raw --format vtd-root --root 0xfff7000
      iommusim check --image amd.raw --format amd-dt --root 0xfff8000 -o dt-pages=8
    """
    to_stdout = json_path is not None and str(json_path) == "-"
    out = console(quiet=to_stdout)
    if image is not None:
        if fmt is None or root is None:
            raise typer.BadParameter("--image needs --format and --root")
        with user_errors(image=True):
            dec = decoder(fmt)
            with open_image(image, base=parse_int(base, "--base")) as img:
                reader = CachingReader(img)
                bound = image_frames(img)
                result = dec.decode(
                    reader, parse_int(root, "--root"), gather_options({}, option or []), max_tables=bound
                )
                report = check_image(result, reader, max_tables=bound)
            out.print(check_report(report))
            if json_path is not None:
                write_json(json_path, {"image": str(image), "format": fmt, **report.to_json()})
        raise typer.Exit(int(Exit.OK if report.ok else Exit.FAILED))
    failed = False
    reports = []
    with user_errors():
        sc = load_scenario(scenario_path(scenario))
        if until is not None:
            sc.step_index(until)
        for v in vendors_for(sc, vendor):
            out.rule(f"[bold]{sc.name}[/] on {VENDOR_TITLES.get(v, v)}")

            def show(rec: StepRecord) -> None:
                if verbose or rec.outcome == "failed":
                    print_step(out, rec, show_console=verbose)

            res = run_scenario(sc, v, until=until, on_step=show)
            assert res.platform is not None
            if res.failure is not None:
                failed = True
                out.print(Text(f"the scenario failed: {res.failure}; checking the machine as it is", style="red"))
            report = check(res.platform, grants=res.grants)
            failed = failed or not report.ok
            out.print(check_report(report))
            reports.append({"vendor": v, "until": until, "scenario_failure": res.failure, **report.to_json()})
        if json_path is not None:
            write_json(json_path, {"scenario": sc.name, "file": sc.source, "checks": reports})
    raise typer.Exit(int(Exit.FAILED if failed else Exit.OK))
