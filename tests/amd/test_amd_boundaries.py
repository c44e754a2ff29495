"""House rules that code review alone would not keep: the hardware model's imports, the quirk registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from amd_support import scenario

import iommusim.hw.amd
from iommusim.errors import HypervisorBug, NotSupported
from iommusim.frames import Dfn
from iommusim.quirks import QUIRKS

_FORBIDDEN = ("iommusim.drivers", "iommusim.iommu", "iommusim.platform")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
    return out


def test_the_hardware_model_sees_only_memory_and_registers() -> None:
    files = sorted(Path(iommusim.hw.amd.__file__).parent.glob("*.py"))
    assert len(files) >= 5
    for f in files:
        bad = [m for m in _imports(f) if m.startswith(_FORBIDDEN)]
        assert not bad, f"{f.name} imports {bad}"


def test_every_amd_quirk_is_registered_with_an_explanation() -> None:
    used = {
        "amd-remap-perm-no-flush",
        "amd-pv-no-map-flush",
        "amd-no-iotlb-flush-op",
        "amd-unmap-grows-tree",
        "amd-cmd-ring-drop",
        "amd-iotlb-s-bit-zero",
        "amd-split-rw-children",
        "amd-merge-counter",
        "amd-unity-map-seed",
        "amd-no-lookup-op",
    }
    registered = {q for q in QUIRKS if q.startswith("amd-")}
    assert registered == used
    assert all(len(QUIRKS[q]) > 30 for q in used)


def test_lookup_op_can_be_taken_away_as_in_xen() -> None:
    s = scenario(quirks=("amd-no-lookup-op",), hwdom_passthrough=True)
    assert "lookup_page" not in s.driver.provided
    with pytest.raises(NotSupported):
        s.p.iommu.lookup_page(s.guest, Dfn(1))
    s = scenario(quirks=("amd-no-lookup-op", "lookup-null-deref"), hwdom_passthrough=True)
    with pytest.raises(HypervisorBug):
        s.p.iommu.lookup_page(s.guest, Dfn(1))
