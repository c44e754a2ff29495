"""Registers the tool commands (run, dump, decode, check, plot) on the ``iommusim`` app.

Each command lives in its own module.  Its docstring is its ``--help``: paragraphs are re-flowed to the
terminal's width, while indented lines (the examples) are kept as they are.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import typer

__all__ = ["help_text", "register_tools"]


def help_text(fn: Callable[..., Any]) -> str:
    """A docstring as typer help: paragraph lines joined, indented lines (examples) kept verbatim."""
    doc = inspect.getdoc(fn) or ""
    out: list[str] = []
    para: list[str] = []
    for line in [*doc.splitlines(), ""]:
        if line.strip() and not line.startswith(" "):
            para.append(line.strip())
            continue
        if para:
            out.append(" ".join(para))
            para = []
        out.append(line)
    return "\n".join(out).strip()


def register_tools(app: typer.Typer) -> None:
    from iommusim.cli.check_cmd import check_command
    from iommusim.cli.decode_cmd import decode_command
    from iommusim.cli.dump_cmd import dump_command
    from iommusim.cli.plot_cmd import plot_command
    from iommusim.cli.run_cmd import run_command

    for name, fn in (
        ("run", run_command),
        ("dump", dump_command),
        ("decode", decode_command),
        ("check", check_command),
        ("plot", plot_command),
    ):
        app.command(name, help=help_text(fn))(fn)
