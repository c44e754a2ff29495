"""``iommusim run``: play a scenario file on every vendor it applies to and report each step."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from iommusim.cli.common import Exit, console, scenario_path, user_errors, write_json
from iommusim.tools.render import check_report, print_step
from iommusim.tools.scenario.library import packaged_scenarios
from iommusim.tools.scenario.model import load_scenario
from iommusim.tools.scenario.runner import RunResult, run_scenario, vendors_for
from iommusim.tools.vendors import VENDOR_TITLES

__all__ = ["run_command"]


def _list() -> None:
    out = console()
    t = Table(title="Example scenarios", title_justify="left", show_edge=False)
    t.add_column("name", style="bold")
    t.add_column("vendors")
    t.add_column("what it shows")
    for name, path in packaged_scenarios().items():
        sc = load_scenario(path)
        t.add_row(name, ", ".join(sc.vendors) if sc.vendors else "every vendor", sc.description)
    out.print(t)


def run_command(
    scenario: str | None = typer.Argument(None, help="A scenario file, or the name of an example (see --list)."),
    vendor: str = typer.Option(
        None, "--vendor", "-v", help="Run on this vendor only (default: every one it applies to)."
    ),
    until: str | None = typer.Option(None, "--until", "-u", help="Stop after this step (its number or its name)."),
    json_path: Path = typer.Option(
        None, "--json", help="Write a machine-readable trace of every step here ('-': stdout)."
    ),
    keep_going: bool = typer.Option(
        False, "--keep-going", "-k", help="Play every step even after a failed expectation."
    ),
    final_check: bool = typer.Option(False, "--check", help="Run the isolation check after the last step as well."),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="Only the summary: no step lines, console output or dumps."
    ),
    list_examples: bool = typer.Option(False, "--list", help="List the example scenarios and exit."),
) -> None:
    """Play a scenario: build the machine it describes, run its steps, hold every expectation to account.

    Exit status: 0 when every expectation held on every vendor, 1 when one did not, 2 when the file is
    malformed or asks for a vendor that is not installed.

    Examples:

      iommusim run --list                      the example scenarios shipped with iommusim
      iommusim run stale-window                an example, by name, on every vendor it applies to
      iommusim run my.toml --vendor vtd        a file of your own, on one vendor
      iommusim run my.toml --until before-flush --json trace.json
    """
    if list_examples:
        with user_errors():
            _list()
        raise typer.Exit(0)
    if scenario is None:
        raise typer.BadParameter("give a scenario file or an example name (iommusim run --list)")
    to_stdout = json_path is not None and str(json_path) == "-"
    out = console(quiet=to_stdout)
    with user_errors():
        sc = load_scenario(scenario_path(scenario))
        vendors = vendors_for(sc, vendor)
        if until is not None:
            sc.step_index(until)
        results: list[RunResult] = []
        for v in vendors:
            out.rule(f"[bold]{sc.name}[/] on {VENDOR_TITLES.get(v, v)}")
            if sc.description and not quiet:
                out.print(Text(sc.description, style="italic"))

            def show(rec: object) -> None:
                if not quiet:
                    print_step(out, rec)  # type: ignore[arg-type]

            res = run_scenario(sc, v, until=until, keep_going=keep_going, final_check=final_check, on_step=show)
            results.append(res)
            if res.final_check is not None:
                out.print(check_report(res.final_check))
            passed = sum(1 for s in res.steps if s.outcome == "ok")
            skipped = sum(1 for s in res.steps if s.outcome == "skipped")
            extra = f", {skipped} skipped" if skipped else ""
            if res.ok:
                out.print(Text(f"{sc.name} on {v}: {passed} step(s) passed{extra}", style="bold green"))
            else:
                why = res.failure or "the final isolation check found violations"
                out.print(Text(f"{sc.name} on {v}: FAILED: {why}", style="bold red"))
        if json_path is not None:
            write_json(
                json_path,
                {
                    "scenario": sc.name,
                    "file": sc.source,
                    "description": sc.description,
                    "ok": all(r.ok for r in results),
                    "runs": [r.to_json() for r in results],
                },
            )
    raise typer.Exit(int(Exit.OK if all(r.ok for r in results) else Exit.FAILED))
