"""What every tool command shares: exit codes, error reporting at the boundary, JSON output, consoles.

Exit codes: 0 ok; 1 an expectation or check failed; 2 a usage or scenario mistake; 3 an image or its tables
could not be decoded.  A user's mistake is reported in one clear message on stderr, never a traceback.
"""

from __future__ import annotations

import json
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from iommusim.errors import BadAddress, IommuError
from iommusim.images import ImageError
from iommusim.pagetable.walk import TableWalkError
from iommusim.tools.scenario.model import ScenarioError

__all__ = ["Exit", "console", "error_console", "fail", "scenario_path", "user_errors", "write_json"]


class Exit(IntEnum):
    OK = 0
    FAILED = 1  # an expectation did not hold, or a check found violations
    USAGE = 2  # bad arguments or a malformed scenario
    IMAGE = 3  # an image or its tables could not be decoded


def console(*, quiet: bool = False) -> Console:
    """Human output: stdout, or nowhere when the caller asked for JSON on stdout."""
    return Console(highlight=False, quiet=quiet)


def error_console() -> Console:
    return Console(stderr=True, highlight=False)


def fail(code: Exit, message: str) -> typer.Exit:
    error_console().print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(int(code))


@contextmanager
def user_errors(*, image: bool = False) -> Iterator[None]:
    """Turn a user's mistake into a message and an exit code (2, or 3 for images and their tables)."""
    try:
        yield
    except ScenarioError as exc:
        raise fail(Exit.USAGE, exc.message) from None
    except (ImageError, TableWalkError) as exc:
        raise fail(Exit.IMAGE, exc.message) from None
    except BadAddress as exc:
        raise fail(Exit.IMAGE if image else Exit.USAGE, exc.message) from None
    except IommuError as exc:
        raise fail(Exit.USAGE, exc.message) from None
    except tomllib.TOMLDecodeError as exc:
        raise fail(Exit.USAGE, f"not valid TOML: {exc}") from None
    except OSError as exc:
        raise fail(Exit.USAGE, f"{exc.filename or ''}: {exc.strerror or exc}") from None


def write_json(path: Path, data: Any) -> None:
    """Write JSON to a file, or to stdout when the path is '-'."""
    text = json.dumps(data, indent=2, sort_keys=False)
    if str(path) == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    else:
        path.write_text(text + "\n", encoding="utf-8")


def scenario_path(name: str) -> Path:
    """A scenario file, or the name of one shipped with iommusim (``iommusim run --list`` shows them)."""
    from iommusim.tools.scenario.library import packaged_scenarios

    p = Path(name)
    if p.exists() or p.suffix == ".toml" or "/" in name:
        return p
    found = packaged_scenarios().get(name)
    if found is None:
        raise ScenarioError([f"no such file, and no example scenario is called {name!r} (see iommusim run --list)"])
    return found
