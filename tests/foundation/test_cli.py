"""The command line as a user meets it."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from iommusim.cli.app import app


def test_demo_runs_and_narrates() -> None:
    result = CliRunner().invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    assert "Dfn(0x1f000) + 3 = Dfn(0x1f003)" in result.output
    assert "TypeError" in result.output


def test_help_and_version() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("iommusim ")


def test_module_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "iommusim", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("iommusim ")
