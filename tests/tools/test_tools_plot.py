"""iommusim plot writes real pictures: checked by opening the PNG, not by comparing pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tools_helpers import TOOLED, cli, run

from iommusim.pagetable.walk import Mapping
from iommusim.perms import Perm
from iommusim.tools.plot import plot_address_map, plot_iotlb_timeline

pytestmark = pytest.mark.skipif(not TOOLED, reason="no vendor with tools support is installed")


def _picture(path: Path, size: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == size
        pixels = np.asarray(img.convert("RGB"))
    packed = (pixels[:, :, 0].astype(np.int32) << 16) | (pixels[:, :, 1].astype(np.int32) << 8) | pixels[:, :, 2]
    assert np.unique(packed).size > 20, "a picture, not a blank page"
    inked = (pixels.sum(axis=2) < 600).mean()
    assert 0.01 < inked < 0.9
    return pixels


def test_address_map_of_a_split_superpage(tmp_path: Path) -> None:
    vendor = TOOLED[0]
    out = tmp_path / "split.png"
    result = cli("plot", "superpage-split", "--vendor", vendor, "--until", "split", "-d", "1", "-o", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "d1: 2047 pages in 4 runs" in result.output
    pixels = _picture(out, (1000, 700))
    green = (pixels[:, :, 1] > 120) & (pixels[:, :, 0] < 90) & (pixels[:, :, 2] < 90)
    assert green.sum() > 500, "read-write mappings are drawn in green"


def test_timeline_and_both_kinds(tmp_path: Path) -> None:
    out = tmp_path / "pic.png"
    result = cli("plot", "stale-window", "--kind", "both", "--vendor", TOOLED[-1], "-o", out)
    assert result.exit_code == 0, result.output
    _picture(tmp_path / "pic-map.png", (1000, 700))
    _picture(tmp_path / "pic-timeline.png", (1100, 650))
    assert "IOTLB events" in result.output


def test_one_file_per_vendor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[Path] = []
    monkeypatch.setattr("iommusim.tools.plot.plot_iotlb_timeline", lambda _e, path, **_kw: written.append(path) or path)
    result = cli("plot", "basic", "--kind", "timeline", "-o", tmp_path / "t.png")
    assert result.exit_code == 0
    assert written == [tmp_path / f"t-{v}.png" for v in TOOLED]


def test_the_run_records_iotlb_events_step_by_step() -> None:
    res = run("stale-window", TOOLED[0], record_iotlb=True)
    kinds = {e.kind for e in res.iotlb_events}
    assert {"hit", "miss", "fill"} <= kinds
    assert [e.seq for e in res.iotlb_events] == list(range(len(res.iotlb_events)))
    by_step = {e.step for e in res.iotlb_events if e.kind == "hit"}
    unmap = next(s.index for s in res.steps if s.name == "unmap-no-flush")
    assert any(step > unmap for step in by_step), "the stale reads hit the IOTLB after the unflushed unmap"
    assert not any(e.step == unmap for e in res.iotlb_events), "the skipped flush invalidated nothing"


def test_pictures_of_nothing_are_still_pictures(tmp_path: Path) -> None:
    plot_address_map([], tmp_path / "empty.png", title="nothing")
    plot_iotlb_timeline([], tmp_path / "quiet.png")
    with Image.open(tmp_path / "empty.png") as a, Image.open(tmp_path / "quiet.png") as b:
        assert a.size == (1000, 700) and b.size == (1100, 650)


def test_plot_mistakes() -> None:
    assert cli("plot", "--kind", "pie").exit_code == 2
    assert cli("plot", "--vendor", TOOLED[0], "-d", "9", "-o", "/tmp/x.png").exit_code == 2


def test_pages_of_any_size_are_drawn(tmp_path: Path) -> None:
    """Regression: the legend knew only 4K, 2M and 1G pages, so an AMD tree with a NextLevel-7 page (16K,
    4M, ...) could not be drawn (KeyError)."""
    runs = [Mapping(0x4, 0x100, 4, Perm.RW, 14), Mapping(0x800, 0x400, 1024, Perm.R, 22), Mapping(0, 0, 4, Perm.RW, 12)]
    out = plot_address_map(runs, tmp_path / "sizes.png", title="odd sizes")
    _picture(out, (1000, 700))
