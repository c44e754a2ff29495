"""The ``iommusim`` command line."""

from __future__ import annotations

import typer

from iommusim import __version__
from iommusim.cli import bench_cmd
from iommusim.cli.tools_cmds import register_tools

app = typer.Typer(
    name="iommusim",
    help="An executable model of Xen's IOMMU layer and the VT-d, AMD-Vi and ARM SMMU hardware below it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"iommusim {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """iommusim: run a demo, scenarios, dumps, decodes, checks, benchmarks and plots."""


@app.command()
def demo(
    vendor: list[str] = typer.Option(None, "--vendor", "-v", help="Only these vendors (default: every one)."),
) -> None:
    """A short narrated run of the model on every vendor that is installed."""
    from iommusim.cli.demo import run_demo

    raise typer.Exit(run_demo(vendor or None))


app.command("bench")(bench_cmd.bench)
register_tools(app)  # run, dump, decode, check, plot


def main() -> None:
    app()
