"""Malformed scenarios are a user's mistake: every problem named with its line or key, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tools_helpers import INSTALLED, SMALL, cli

from iommusim.errors import InvalidArgument
from iommusim.tools.scenario.model import ScenarioError, parse_scenario


def _write(tmp: Path, text: str) -> Path:
    p = tmp / "s.toml"
    p.write_text(text)
    return p


def _fails(tmp: Path, text: str, *args: str) -> str:
    result = cli("run", _write(tmp, text), *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


def test_every_problem_is_reported_with_its_line(tmp_path: Path) -> None:
    text = """[scenario]
name = "bad"
vendors = ["vtd", "intel"]

[machine]
memroy = "1G"
units = 0

[[domains]]
id = 1
memory = "lots"

[[steps]]
do = "dma-raed"
device = "0000:03:00.0"

[[steps]]
do = "map"
domain = 1
dfm = 0x10
mfn = 5
perms = "rx"
"""
    out = _fails(tmp_path, text)
    assert "8 problems" in out
    assert "line 3: scenario.vendors: expected one of 'vtd', 'amd', 'smmu', got 'intel'" in out
    assert "line 6: machine: unknown key 'memroy'; did you mean 'memory'?" in out
    assert "line 7: machine.units: expected at least 1, got 0" in out
    assert "line 11: domains[0].memory: expected a size" in out
    assert "line 14: steps[1]: does not know how to do 'dma-raed'; did you mean 'dma-read'?" in out
    assert "line 20: steps[2] (map): unknown key 'dfm'; did you mean 'dfn'?" in out
    assert "line 22: steps[2] (map).perms: bad permission string 'rx'" in out
    assert "line 17: steps[2] (map): needs exactly one of 'dfn' or 'gfn'" in out


def test_references_are_checked_before_anything_runs(tmp_path: Path) -> None:
    text = (
        SMALL
        + """
[[steps]]
name = "a"
do = "unmap"
domain = 7
gfn = 1

[[steps]]
name = "a"
do = "dma-read"
device = "0000:09:00.0"
gfn = 1

[[steps]]
do = "map"
domain = 1
gfn = 0x10
mfn = "d3:0x10"

[[steps]]
do = "create"
domain = 1
"""
    )
    out = _fails(tmp_path, text)
    assert "domain 7 is not declared" in out
    assert "device 0000:09:00.0 is not declared" in out
    assert "step name 'a' is already used by step 1" in out
    assert "mfn names a frame of domain 3, which is not declared" in out
    assert "only a domain declared with create = false can be created by a step" in out


def test_toml_syntax_errors_name_the_line(tmp_path: Path) -> None:
    out = _fails(tmp_path, "[machine]\nmemory = \n")
    assert "not valid TOML" in out and "line 2" in out


@pytest.mark.parametrize(
    ("text", "args", "message", "needs"),
    [
        ('[machine]\nvendor = "amd"\n', (), "the amd model is not installed", "!amd"),
        ("", ("--vendor", "amd"), "the amd model is not installed", "!amd"),
        ("", ("--vendor", "nosuch"), "unknown vendor 'nosuch'", ""),
        ('[scenario]\nvendors = ["amd"]\n', (), "none of them is installed", "!amd"),
        ('[scenario]\nvendors = ["vtd"]\n', ("--vendor", "smmu"), "this scenario is for vtd, not smmu", "smmu"),
        ("[machine.extra.vtd]\nnosuch = 1\n", ("--vendor", "vtd"), "unknown VT-d spec.extra key(s): nosuch", "vtd"),
        ('[iommu]\nquirks = ["no-such-quirk"]\n', (), "iommu.quirks: expected one of", ""),
        ("", ("--until", "12"), "there is no step 12", ""),
    ],
)
def test_vendor_and_machine_mistakes(
    tmp_path: Path, text: str, args: tuple[str, ...], message: str, needs: str
) -> None:
    if needs.startswith("!") and needs[1:] in INSTALLED:
        pytest.skip(f"{needs[1:]} is installed")
    if needs and not needs.startswith("!") and needs not in INSTALLED:
        pytest.skip(f"{needs} is not installed")
    out = _fails(tmp_path, text, *args)
    assert message in out


def test_missing_files_and_examples(tmp_path: Path) -> None:
    result = cli("run", tmp_path / "nope.toml")
    assert result.exit_code == 2 and "cannot read the scenario" in result.output
    result = cli("run", "no-such-example")
    assert result.exit_code == 2 and "no example scenario is called 'no-such-example'" in result.output


def test_the_library_raises_a_scenario_error_listing_the_problems() -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario('[[steps]]\ndo = "flush"\n', "x.toml")
    assert isinstance(info.value, InvalidArgument)
    assert info.value.problems == [
        "line 1: steps[1] (flush): needs 'domain'",
        "line 1: steps[1] (flush): needs exactly one of 'dfn' or 'gfn'",
    ]


_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 1 << 40)
    | st.text(max_size=8)
    | st.sampled_from(["0x10", "d1:0x5", "2M"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["do", "id", "memory", "gfn"]), inner, max_size=3)
    ),
    max_leaves=6,
)
_keys = st.sampled_from(
    ["scenario", "machine", "iommu", "hardware_domain", "domains", "devices", "grants", "steps", "x"]
)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(_keys, _value, max_size=4))
def test_any_document_is_either_a_scenario_or_a_scenario_error(doc: dict[str, object]) -> None:
    import tomllib

    def toml(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return '"' + v.encode("unicode_escape").decode().replace('"', '\\\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(toml(x) for x in v if x is not None) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {toml(x)}" for k, x in v.items() if x is not None) + "}"
        return '""'

    text = "\n".join(f"{k} = {toml(v)}" for k, v in doc.items() if v is not None)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return
    problems: list[str] = []
    try:
        parse_scenario(text)
    except ScenarioError as exc:
        problems = exc.problems or ["<none>"]
    assert "<none>" not in problems
