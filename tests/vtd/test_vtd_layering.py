"""The hardware model sees only memory and registers: it must not import the driver or the hypervisor."""

from __future__ import annotations

import ast
from pathlib import Path

import iommusim.hw.vtd as hw_vtd

FORBIDDEN = ("iommusim.drivers", "iommusim.iommu", "iommusim.platform")


def test_hw_vtd_imports_nothing_above_it() -> None:
    for path in Path(hw_vtd.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"
