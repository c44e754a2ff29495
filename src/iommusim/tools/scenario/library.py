"""The example scenarios shipped with iommusim (``iommusim/scenarios/*.toml``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["packaged_scenarios"]


def packaged_scenarios() -> dict[str, Path]:
    """Example scenarios by name (the file name without ``.toml``), sorted."""
    root = resources.files("iommusim") / "scenarios"
    out: dict[str, Path] = {}
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            out[entry.name[: -len(".toml")]] = Path(str(entry))
    return out
