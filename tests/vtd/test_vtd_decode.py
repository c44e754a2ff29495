"""Decoding a VT-d setup from memory alone: live memory and a raw image give the driver's own view."""

from __future__ import annotations

from pathlib import Path

from vtd_helpers import NIC, NVME, boot, guest_with, make

from iommusim.hw.vtd.decode import decode_root_table
from iommusim.images import open_image, write_raw
from iommusim.machine.pci import Sbdf


def test_decode_live_and_from_an_image(tmp_path: Path) -> None:
    p = make(ram=256 << 20, config=None)
    boot(p, 32 << 20)
    g = guest_with(p, NIC, 1, 8 << 20)
    root = p.ops.units[0].root.value << 12  # type: ignore[attr-defined]
    views = {v.sid: v for v in decode_root_table(p.machine.memory, root)}
    nic, nvme = Sbdf.parse(NIC).bdf, Sbdf.parse(NVME).bdf
    assert views[nic].mappings == p.iommu.dump_page_tables(g)
    assert views[nvme].context.did != views[nic].context.did
    assert views[nic].bdf == "03:00.0"
    assert not any(v.problems for v in views.values())
    image = tmp_path / "mem.raw"
    write_raw(p.machine.memory, image)
    with open_image(image) as img:
        again = {v.sid: v for v in decode_root_table(img, root)}
    assert again[nic].mappings == views[nic].mappings
    assert again[nvme].mappings == views[nvme].mappings


def test_decode_reports_malformed_entries() -> None:
    p = make(ram=256 << 20)
    boot(p, 32 << 20)
    g = guest_with(p, NIC, 1, 8 << 20)
    u = p.ops.units[0]  # type: ignore[attr-defined]
    table = g.iommu.arch.table
    frame, index = table.entry_slot(0, 1)
    p.machine.memory.store_word(frame, index, p.machine.memory.load_word(frame, index) | 0x4)
    views = {v.sid: v for v in decode_root_table(p.machine.memory, u.root.value << 12)}
    assert any("malformed" in problem for problem in views[Sbdf.parse(NIC).bdf].problems)
