"""The suite end to end on a toy platform, its options, its report, the CLI and the benchmarks/ script."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from bench_doubles import build_direct_mapped_toy, build_direct_mapped_toy_attached, build_toy_platform
from rich.console import Console
from typer.testing import CliRunner

from iommusim.bench import FIGURES, TARGETS, BenchOptions, BenchResult, make_options, parse_sizes, render, run_vendor
from iommusim.bench.baseline_c import find_compiler
from iommusim.bench.subjects import hwdom_platform, make_subject
from iommusim.bench.suite import ideal_tables, run_benchmarks
from iommusim.cli.app import app
from iommusim.errors import InvalidArgument, NotSupported
from iommusim.frames import Daddr, Maddr
from iommusim.iommu.config import IommuConfig
from iommusim.machine import PciDevice
from iommusim.platform import VENDORS, HardwareSpec, Platform

ROOT = Path(__file__).resolve().parents[2]
SIZES = (64, 256)


def tiny(**kw: object) -> BenchOptions:
    base: dict[str, object] = {"sizes": SIZES, "repeats": 1, "warmup": 0, "budget_s": None, "vendors": ("toy",)}
    base.update(kw)
    return BenchOptions(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def toy_result() -> BenchResult:
    return run_benchmarks(tiny(), factories={"toy": build_toy_platform})


def test_every_figure_is_measured_at_every_size(toy_result: BenchResult) -> None:
    (v,) = toy_result.vendors
    assert v.vendor == "toy" and not v.skipped
    assert set(v.figures) == set(FIGURES)
    for fig in v.figures.values():
        assert set(fig.by_size) == set(SIZES)
        for n, m in fig.by_size.items():
            assert m.items == n and len(m.samples_ns) == 1 and m.median_ns > 0
    for key in ("translate-bypass", "translate-iotlb"):
        extra = v.figures[key].by_size[256].extra
        # every random address is mapped, and each came back where the subject's mapping sends it
        assert extra["faults"] == 0 and extra["wrong"] == 0
        assert extra["iotlb_bypassed"] == 0  # the toy unit has no batch API: the reference loop was used
    assert any("reference loop" in n for n in v.notes)
    replay = v.figures["replay"].by_size[256].extra
    assert replay["steps"] == 256 and replay["hits"] + replay["misses"] == 256 and 0 < replay["hit_rate"] < 1


def test_memory_rows_by_hand(toy_result: BenchResult) -> None:
    (v,) = toy_result.vendors
    row = v.memory[256]
    # 256 frames from dfn 0x40000 (1 GiB): the root exists since the device was assigned, so the map adds
    # a level-3 table (root slot 0 -> index 1 of it), a level-2 and a level-1 table: 3 frames = 48 B/page
    assert row.table_frames == 3 and row.table_bytes_per_page == 3 * 4096 / 256
    # a C-shaped tree of frames 0..255 has a root and one table per level below: 4 tables
    assert ideal_tables(256) == 4 and row.ideal_bytes_per_page == 4 * 4096 / 256
    assert ideal_tables(1 << 20) == 1 + 1 + 4 + 2048
    assert row.ratio == (row.table_bytes_per_page + row.bookkeeping_bytes_per_page) / row.table_bytes_per_page
    assert row.bookkeeping_bytes_per_page >= 0 and row.rss_bytes_per_page >= 0


def test_baselines_agree_and_ratios_are_per_item(toy_result: BenchResult) -> None:
    r = toy_result
    for n in SIZES:
        assert r.checks[n]["np_fill_matches_py"] is True
        assert set(r.baselines["py-insert"].by_size) == set(SIZES)
    (v,) = r.vendors
    fig, base = v.figures["map-page"].by_size[256], r.baselines["py-insert"].by_size[256]
    assert r.ratio(v, "map-page", "py-insert", 256) == fig.per_item_ns / base.per_item_ns
    statuses = r.target_status(v)
    assert [s.target for s in statuses] == list(TARGETS)
    has_c = find_compiler() is not None
    for s in statuses:
        if s.target.baseline.startswith("c-") and not has_c:
            assert s.ratio is None and s.met is None
            continue
        assert s.pages == 256 and s.ratio is not None and isinstance(s.met, bool)
        assert s.target.figure == "memory" or "not 2^20" in s.note
    if has_c:
        assert r.checks[256]["c_matches_py"] is True


def test_json_holds_every_number(toy_result: BenchResult) -> None:
    data = json.loads(json.dumps(toy_result.to_json()))
    assert data["sizes"] == list(SIZES) and data["repeats"] == 1
    (v,) = data["vendors"]
    assert set(v["figures"]) == set(FIGURES) and set(v["memory"]) == {"64", "256"}
    m = v["figures"]["bulk-map-nosp"]["by_size"]["256"]
    assert len(m["samples_ns"]) == 1 and m["per_item_ns"] == m["median_ns"] / 256
    assert set(v["ratios"]["bulk-map-nosp"]) == {"c-map", "np-fill"}
    assert len(v["targets"]) == len(TARGETS)
    assert set(data["baselines"]) == {"c-map", "c-walk", "py-insert", "py-walk", "np-fill"}


def test_report_prints_figures_beside_baselines(toy_result: BenchResult) -> None:
    buf = io.StringIO()
    render(toy_result, Console(file=buf, width=200, highlight=False))
    text = buf.getvalue()
    assert "bulk map, no superpages at 2^8:" in text and "x numpy fill" in text
    assert "per-page map + flush at 2^8:" in text and "x Python radix insert" in text
    assert "Targets of issue 8" in text and "2^8 / 2^6" in text
    assert ("x C per-page map" in text) == (find_compiler() is not None)


def test_subjects_follow_the_architecture() -> None:
    # x86 shape: a PV guest owns the frames and has the device; device frame == machine frame
    s = make_subject(build_toy_platform, "toy", 64, superpages=())
    assert not s.domain.is_hardware and s.device.owner is s.domain
    assert s.dfn.value == s.mfn.value and s.mfn.value % (1 << 18) == 0
    # ARM shape: the direct-mapped hardware domain keeps the device and maps frame == frame; the device
    # is attached to its context by an assignment (no add_device op), or already was (EEXIST is fine)
    a = make_subject(build_direct_mapped_toy, "toy", 64, superpages=())
    assert a.domain.is_hardware and a.device.owner is a.domain and a.dfn.value == a.mfn.value
    b = make_subject(build_direct_mapped_toy_attached, "toy", 64, superpages=())
    for subj in (s, a, b):
        subj.map_all()
        dma = subj.platform.machine.dma
        dma.write(subj.device, Daddr((subj.dfn.value + 5) << 12), b"bench")
        assert subj.platform.machine.memory.read(Maddr((subj.mfn.value + 5) << 12), 5) == b"bench"


def test_hwdom_memory_starts_aligned() -> None:
    p = hwdom_platform(build_toy_platform, "toy", 512, superpages=(21,))
    d = p.create_hardware_domain(512 << 12)
    assert d.extents[0].mfn.value % (1 << 18) == 0


def test_missing_vendors_are_skipped_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(VENDORS, "ghost", "iommusim.no_such_module:build")
    opts = tiny(vendors=("ghost", "nobody"))
    ghost, nobody = (run_vendor(v, opts) for v in ("ghost", "nobody"))
    assert "not installed" in ghost.skipped["*"] and "unknown vendor" in nobody.skipped["*"]
    result = BenchResult(SIZES, 1, vendors=[ghost])
    buf = io.StringIO()
    render(result, Console(file=buf, width=200))
    assert "skipped: the vendor model is not installed" in buf.getvalue()


def failing_bulk(spec: HardwareSpec, config: IommuConfig, devices: Sequence[PciDevice]) -> Platform:
    p = build_toy_platform(spec, config, devices)
    p.ops.fail_with["map_range"] = NotSupported("no bulk map here")  # type: ignore[attr-defined]
    return p


def test_a_failing_figure_is_recorded_and_the_rest_goes_on() -> None:
    v = run_vendor("toy", tiny(sizes=(64,), only=frozenset({"per-page", "bulk", "translate"})), factory=failing_bulk)
    assert set(v.figures) == {"map-page"}  # unmap-page, bulk and translate need the bulk map in their set-up
    assert "no bulk map here" in v.skipped["bulk-map-nosp"] and "no bulk map here" in v.skipped["translate-iotlb"]
    assert "hwdom-nosp" not in v.skipped  # not asked for


def test_options() -> None:
    assert parse_sizes("14,16") == (1 << 14, 1 << 16) and parse_sizes("2^10 2^8 2^10") == (256, 1024)
    for bad in ("", "x", "31", "-1"):
        with pytest.raises(InvalidArgument):
            parse_sizes(bad)
    quick = make_options(quick=True)
    assert quick.sizes == (256, 1024) and quick.repeats == 3
    full = make_options(only=["bulk,memory", "map-page"], vendors=["vtd"])
    assert full.sizes == (1 << 14, 1 << 16, 1 << 18, 1 << 20) and full.repeats == 5 and full.vendors == ("vtd",)
    assert full.wants("bulk-map-sp") and full.wants("memory") and full.wants("map-page")
    assert not full.wants("unmap-page") and not full.wants("replay") and full.vendor_figures_wanted
    assert not make_options(only=["baselines"]).vendor_figures_wanted
    with pytest.raises(InvalidArgument):
        make_options(only=["nope"])
    with pytest.raises(InvalidArgument):
        BenchOptions(sizes=(0,))


def test_cli_help_and_errors() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--help"])
    assert result.exit_code == 0
    for words in ("per-page map", "C program", "--only", "translate-bypass", "1024-entry IOTLB"):
        assert words in result.output
    assert runner.invoke(app, ["bench", "--only", "nope"]).exit_code == 2
    assert runner.invoke(app, ["bench", "--sizes", "40"]).exit_code == 2


def test_cli_baselines_only_with_json(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    result = CliRunner().invoke(
        app, ["bench", "--sizes", "6", "--repeats", "1", "--only", "baselines", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "Python radix insert" in result.output
    data = json.loads(out.read_text())
    assert set(data["baselines"]["np-fill"]["by_size"]) == {"64"} and data["vendors"] == []


def test_cli_measures_a_registered_vendor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(VENDORS, "toy", "bench_doubles:build_toy_platform")
    args = ["bench", "--vendor", "toy", "--sizes", "6", "--repeats", "1", "--only", "bulk-map-nosp"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "bulk map, no superpages at 2^6:" in result.output


def test_benchmarks_folder_runs_the_same_code(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    script = ROOT / "benchmarks" / "run_all.py"
    args = [sys.executable, str(script), "--sizes", "6", "--repeats", "1", "--only", "baselines", "--json", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "numpy fill" in proc.stdout and json.loads(out.read_text())["sizes"] == [64]
