"""mypy is the first line of defence: misuse of frame kinds must not type-check, correct code must.

Each misuse snippet is its own module, checked by one mypy run under the project's strict settings; every
snippet must produce at least one error on the line marked ``# E``, and the correct snippets none.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = """\
from iommusim import Dfn, Mfn, Gfn, Daddr, Maddr, Perm, dfn_to_daddr, mfn_to_maddr
from iommusim.iommu import Iommu
from iommusim.machine import Domain
"""

MISUSE = {
    "wrong_kind_argument": "def f(io: Iommu, d: Domain) -> None:\n    io.map_page(d, Mfn(1), Mfn(2), Perm.RW)  # E",
    "bare_int_argument": "def f(io: Iommu, d: Domain) -> None:\n    io.unmap_page(d, 5)  # E",
    "swapped_arguments": "def f(io: Iommu, d: Domain) -> None:\n    io.map_page(d, Dfn(1), Dfn(2), Perm.RW)  # E",
    "dfn_plus_mfn": "x = Dfn(1) + Mfn(2)  # E",
    "dfn_plus_dfn": "x = Dfn(1) + Dfn(2)  # E",
    "dfn_minus_mfn": "x = Dfn(1) - Mfn(2)  # E",
    "ordering_across_kinds": "b = Dfn(1) < Mfn(2)  # E",
    "equality_across_kinds": "b = Dfn(1) == Gfn(1)  # E",
    "inequality_across_kinds": "b = Mfn(1) != Gfn(1)  # E",
    "equality_with_int": "b = Dfn(1) == 1  # E",
    "mfn_key_in_dfn_dict": "m: dict[Dfn, int] = {}\nv = m[Mfn(1)]  # E",
    "mfn_in_dfn_list": "xs: list[Dfn] = []\nxs.append(Mfn(1))  # E",
    "membership_across_kinds": "xs: list[Dfn] = []\nb = Mfn(1) in xs  # E",
    "returning_wrong_kind": "def f(m: Mfn) -> Dfn:\n    return m  # E",
    "assigning_wrong_kind": "x: Gfn = Mfn(1)  # E",
    "int_where_frame_returned": "def f(d: Dfn) -> Dfn:\n    return d.value + 1  # E",
    "wrong_conversion": "a = dfn_to_daddr(Mfn(1))  # E",
    "address_kinds_mix": "a: Maddr = mfn_to_maddr(Mfn(1))\nb: Daddr = a  # E",
    "frame_as_index": "xs = [1, 2, 3]\nv = xs[Dfn(1)]  # E",
    "flags_as_frame": "def f(io: Iommu, d: Domain) -> None:\n    io.map_page(d, Dfn(1), Mfn(2), 3)  # E",
}

CORRECT = {
    "arithmetic": "a: Dfn = Dfn(1) + 3\nb: Dfn = 3 + Dfn(1)\nc: int = Dfn(9) - Dfn(1)\nd: Dfn = Dfn(9) - 1",
    "ordering": "b: bool = Dfn(1) < Dfn(2) and Mfn(1) >= Mfn(0)\ns = sorted([Dfn(2), Dfn(1)])",
    "dicts_and_sets": "m: dict[Dfn, Mfn] = {Dfn(1): Mfn(2)}\nv: Mfn = m[Dfn(1)]\ns = {Gfn(1)} | {Gfn(2)}",
    "conversions": "a: Daddr = dfn_to_daddr(Dfn(1))\nb: Maddr = mfn_to_maddr(Mfn(1))\nn: int = int(Dfn(3))",
    "explicit_identity": "m = Mfn(7)\nd: Dfn = Dfn(int(m))",
    "layer_calls": (
        "def f(io: Iommu, d: Domain) -> None:\n"
        "    io.map_page(d, Dfn(1), Mfn(2), Perm.R | Perm.W)\n"
        "    mfn, perms = io.lookup_page(d, Dfn(1))\n"
        "    io.iotlb_flush(d, Dfn(1), 1)\n"
        "    io.unmap(d, Dfn(1), 4)"
    ),
}


def _mypy(paths: list[str]) -> str:
    stdout, stderr, _ = mypy_api.run(
        ["--config-file", str(ROOT / "pyproject.toml"), "--no-incremental", "--show-error-codes", *paths]
    )
    return stdout + stderr


@pytest.fixture(scope="module")
def snippet_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[int, str]]]:
    d = tmp_path_factory.mktemp("snippets")
    paths = []
    for name, body in {**MISUSE, **CORRECT}.items():
        p = d / f"snip_{name}.py"
        p.write_text(PRELUDE + textwrap.dedent(body) + "\n")
        paths.append(str(p))
    out = _mypy(paths)
    errors: dict[str, list[tuple[int, str]]] = {n: [] for n in {**MISUSE, **CORRECT}}
    for line in out.splitlines():
        parts = line.split(":", 3)
        if len(parts) == 4 and parts[2].strip() == "error":
            name = Path(parts[0]).stem.removeprefix("snip_")
            if name in errors:
                errors[name].append((int(parts[1]), parts[3] if len(parts) > 3 else line))
    return errors


@pytest.mark.parametrize("name", sorted(MISUSE))
def test_misuse_is_rejected_by_mypy(name: str, snippet_errors: dict[str, list[tuple[int, str]]]) -> None:
    body_lines = (PRELUDE + textwrap.dedent(MISUSE[name])).splitlines()
    marked = [i + 1 for i, line in enumerate(body_lines) if line.rstrip().endswith("# E")]
    assert marked, "snippet has no # E marker"
    got_lines = {ln for ln, _ in snippet_errors[name]}
    assert set(marked) <= got_lines, f"mypy accepted misuse {name!r}; errors: {snippet_errors[name]}"


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_correct_code_is_accepted_by_mypy(name: str, snippet_errors: dict[str, list[tuple[int, str]]]) -> None:
    assert snippet_errors[name] == []


def test_at_least_twelve_misuse_snippets() -> None:
    assert len(MISUSE) >= 12


def test_package_is_mypy_strict_clean() -> None:
    out = _mypy([str(ROOT / "src" / "iommusim")])
    assert "Success: no issues found" in out, out[-3000:]
