"""Registers the tool commands (run, dump, decode, check, plot) on the ``iommusim`` app."""

from __future__ import annotations

import typer

__all__ = ["register_tools"]


def register_tools(app: typer.Typer) -> None:
    from iommusim.cli.run_cmd import run_command

    app.command("run", epilog=None)(run_command)
