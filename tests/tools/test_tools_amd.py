"""The AMD-Vi tools adapter: contexts read from the device table as the unit reads them, IVMD, ATS caches.

Every context the adapter reports is checked against what the hardware model then does with the device's
DMA, so the adapter cannot drift from the unit: a DTE is changed in memory (and invalidated with the
driver's own INVALIDATE_DEVTAB_ENTRY, where the test wants the unit to see it), then the context and a DMA
are compared.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from tools_helpers import SMALL, TOOLED, cli_json, run

from iommusim.errors import DmaFault, InvalidArgument
from iommusim.frames import Daddr, Dfn, Gfn, Mfn
from iommusim.hw.amd import regs
from iommusim.hw.amd.structs import DTE_SIZE, Dte, Event, EventCode
from iommusim.hw.amd.unit import AmdIommu
from iommusim.images import open_image, write_raw
from iommusim.machine import Machine
from iommusim.pagetable.amd import AmdV1Format
from iommusim.perms import Perm
from iommusim.platform import Platform
from iommusim.tools.check import check
from iommusim.tools.decode import decoder
from iommusim.tools.dump import dump_platform
from iommusim.tools.vendors import ContextMode, DeviceContext, vendor_tools

pytestmark = pytest.mark.skipif("amd" not in TOOLED, reason="AMD-Vi is not installed")

NIC = "0000:03:00.0"
DISK = '\n[[devices]]\nsbdf = "0000:04:00.0"\n'  # a second device, left with dom0
RID = 0x0300  # bus 3, device 0, function 0
TOOLS = vendor_tools("amd") if "amd" in TOOLED else None


def _machine(text: str = SMALL) -> Platform:
    res = run(text, "amd")
    assert res.ok and res.platform is not None
    return res.platform


def _unit(p: Platform) -> AmdIommu:
    u = p.units[0]
    assert isinstance(u, AmdIommu)
    return u


def _context(p: Platform) -> DeviceContext:
    assert TOOLS is not None
    return TOOLS.context(p, _unit(p), RID)


def _dte_addr(p: Platform) -> int:
    base = _unit(p).mmio.reg(regs.DEV_TAB_BASE).value & regs.BASE_ADDR_MASK
    return base + RID * DTE_SIZE


def _dte(p: Platform) -> Dte:
    a = _dte_addr(p)
    return Dte.from_qwords([p.machine.memory.read_u64(a + 8 * i) for i in range(4)])


def _set_dte(p: Platform, dte: Dte, *, invalidate: bool = True) -> None:
    """Write the NIC's DTE in memory, then (by default) send the driver's INVALIDATE_DEVTAB_ENTRY."""
    a = _dte_addr(p)
    for i, q in enumerate(dte.qwords()):
        p.machine.memory.write_u64(a + 8 * i, q)
    if invalidate:
        p.ops.units[0].flush_device(RID)  # type: ignore[attr-defined]


def _nic_read(p: Platform, daddr: int) -> bytes | DmaFault:
    try:
        return p.machine.dma.read(p.device(NIC), Daddr(daddr), 8)
    except DmaFault as exc:
        return exc


def test_a_translated_device_names_its_domain_tables_and_tag() -> None:
    p = _machine()
    ctx = _context(p)
    d1 = p.machine.domains[1]
    assert TOOLS is not None
    tables = TOOLS.domain_tables(p, d1)
    assert ctx.mode == ContextMode.TRANSLATED and ctx.tag == 1 and not ctx.problems
    assert tables is not None and ctx.tables is not None and ctx.tables.key == tables.key
    # an HVM guest starts at two levels, and the DTE says so: the tree's level count is the paging mode
    assert ctx.tables.levels == _dte(p).mode == 2 and ctx.tables.perms == Perm.RW
    assert "domain 1" in ctx.detail and "paging mode 2" in ctx.detail
    assert TOOLS.table_owner(1) == "d1:amd-pt"


def test_v0_passes_dma_untranslated() -> None:
    p = _machine()
    _set_dte(p, Dte())  # V=0: the entry says nothing about the device
    ctx = _context(p)
    assert ctx.mode == ContextMode.PASSTHROUGH and ctx.tables is None and "V=0" in ctx.detail
    # the unit agrees: the DMA address is the machine address, whoever owns that frame
    p.machine.memory.write_bytes(0x5_0000, b"untransl")
    assert _nic_read(p, 0x5_0000) == b"untransl"
    report = check(p)
    assert report.kinds() == {"untranslated"} and "V=0" in report.violations[0].message


def test_tv0_and_no_permission_block_every_request() -> None:
    p = _machine()
    good = _dte(p)
    for dte in (
        Dte(valid=True, domain_id=1),  # TV=0
        Dte(valid=True, translation_valid=True, mode=good.mode, root=good.root, domain_id=1),  # IR=IW=0
    ):
        _set_dte(p, dte)
        ctx = _context(p)
        assert ctx.mode == ContextMode.BLOCKED and ctx.tag == 1 and not ctx.problems, ctx
        fault = _nic_read(p, 0x1000)
        assert isinstance(fault, DmaFault) and isinstance(fault.record, Event)
        assert fault.record.code == EventCode.IO_PAGE_FAULT
        assert check(p).ok  # a blocked device reaches nothing


def test_entries_the_unit_refuses_are_blocked_with_the_problem() -> None:
    p = _machine(SMALL.replace('memory = "128M"', 'memory = "128M"\n[machine.extra.amd]\npaging_modes = 4'))
    good = _dte(p)
    reserved = replace(good, extra_q0=1 << 5)  # bit 5: reserved in quadword 0
    too_deep = replace(good, mode=5)  # the unit implements four levels (EFR.HATS)
    for dte, words in ((reserved, "reserved bits 0x20"), (too_deep, "paging mode 5")):
        _set_dte(p, dte)
        ctx = _context(p)
        assert ctx.mode == ContextMode.BLOCKED and len(ctx.problems) == 1 and words in ctx.problems[0]
        assert "ILLEGAL_DEV_TABLE_ENTRY" in ctx.problems[0]
        fault = _nic_read(p, 0x1000)
        assert isinstance(fault, DmaFault)
        assert TOOLS is not None and "illegal-dev-table-entry" in TOOLS.fault_reasons(fault.record)
        assert check(p).kinds() == {"context"}


def test_paging_mode_0_and_a_read_only_dte() -> None:
    p = _machine()
    good = _dte(p)
    _set_dte(p, Dte(valid=True, translation_valid=True, mode=0, ir=True, domain_id=1))
    ctx = _context(p)
    assert ctx.mode == ContextMode.PASSTHROUGH and "paging mode 0" in ctx.detail
    p.machine.memory.write_bytes(0x5_0000, b"mode 0!!")
    assert _nic_read(p, 0x5_0000) == b"mode 0!!"  # untranslated, IR still checked
    with pytest.raises(DmaFault):
        p.machine.dma.write(p.device(NIC), Daddr(0x5_0000), b"no")  # IW=0
    # translated, read-only at the DTE: every translation is capped, and the cached one agrees with memory
    _set_dte(p, replace(good, iw=False))
    ctx = _context(p)
    assert ctx.mode == ContextMode.TRANSLATED and ctx.tables is not None and ctx.tables.perms == Perm.R
    assert isinstance(_nic_read(p, 0x7000), bytes)
    report = check(p)
    assert report.ok and report.stats["cached_translations"] >= 1, report.violations


def test_the_exclusion_range_is_a_problem_and_the_unit_honours_it() -> None:
    p = _machine()
    u = _unit(p)
    u.mmio.write(regs.EXCL_LIMIT, 0x5_0000, 8)
    u.mmio.write(regs.EXCL_BASE, 0x5_0000 | regs.EXCL_ALLOW | regs.EXCL_ENABLE, 8)
    ctx = _context(p)
    assert ctx.mode == ContextMode.TRANSLATED
    assert ctx.problems == (f"DMA of device id {RID:#06x} (03:00.0) to 0x50000-0x50fff bypasses its tables: "
                            "the exclusion range applies to it",)  # fmt: skip
    p.machine.memory.write_bytes(0x5_0000, b"excluded")
    assert _nic_read(p, 0x5_0000) == b"excluded"
    assert check(p).kinds() == {"context"}


def test_a_dte_changed_without_its_invalidation_is_a_stale_context() -> None:
    p = _machine()
    good = _dte(p)
    assert isinstance(_nic_read(p, 0x7000), bytes)  # the unit caches the DTE
    _set_dte(p, Dte(valid=True, domain_id=1), invalidate=False)  # TV=0 in memory, no INVALIDATE_DEVTAB_ENTRY
    ctx = _context(p)
    # what the next request uses: the cached entry, which still translates
    assert ctx.mode == ContextMode.TRANSLATED and ctx.tables is not None and ctx.tables.root_maddr == good.root
    assert "the context cache (DTE cache) of amd0 still holds device id 0x0300" in ctx.problems[-1]
    assert isinstance(_nic_read(p, 0x7000), bytes)
    assert check(p).kinds() == {"stale-context"}
    p.ops.units[0].flush_device(RID)  # type: ignore[attr-defined]
    assert _context(p).mode == ContextMode.BLOCKED
    assert isinstance(_nic_read(p, 0x7000), DmaFault)


def test_a_disabled_iommu_and_a_device_beyond_the_table() -> None:
    p = _machine()
    u = _unit(p)
    base = u.mmio.reg(regs.DEV_TAB_BASE).value & regs.BASE_ADDR_MASK
    u.mmio.write(regs.DEV_TAB_BASE, base, 8)  # size 0: one page, device ids 0-127
    ctx = _context(p)
    assert ctx.mode == ContextMode.BLOCKED and "beyond the 128-entry device table" in ctx.problems[0]
    assert isinstance(_nic_read(p, 0x7000), DmaFault)
    u.mmio.write(regs.CONTROL, u.mmio.read(regs.CONTROL) & ~regs.CTRL_IOMMU_EN)
    ctx = _context(p)
    assert ctx.mode == ContextMode.UNTRANSLATED and "IommuEn=0" in ctx.detail
    assert check(p).kinds() == {"untranslated"}


IVMD = SMALL.replace(
    'memory = "128M"',
    'memory = "128M"\n[machine.extra.amd]\n'
    'ivmd = [{ first_pfn = 0x7000, pages = 4, perms = "rw", devices = ["0000:03:00.0"] },'
    ' { first_pfn = 0x7100, pages = 1, devices = ["0000:09:00.0"] }]\n',
)


def test_ivmd_ranges_are_reserved_for_the_devices_whose_requestor_id_they_cover(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = _machine(IVMD)
    assert TOOLS is not None
    (region,) = TOOLS.reserved_regions(p)  # the range for a device this machine lacks is for nobody
    assert (region.first_mfn, region.count, region.devices) == (0x7000, 4, (NIC,))
    # the guest's tables map the range 1:1 (the driver's unity map), and the checker allows it
    g = p.machine.domains[1]
    assert p.iommu.lookup_page(g, Dfn(0x7002))[0].value == 0x7002
    assert check(p).ok
    monkeypatch.setattr(type(TOOLS), "reserved_regions", lambda self, platform: [])
    report = check(p)
    assert "escape" in report.kinds() and any("dfn 0x7000-0x7003" in v.message for v in report.violations)
    monkeypatch.undo()
    # a function whose DMA carries the NIC's requestor id (an IVRS alias) needs the range as well
    aliased = IVMD.replace(
        "[machine.extra.amd]\n", '[machine.extra.amd]\naliases = { "0000:03:00.1" = "0000:03:00.0" }\n'
    )
    aliased += '\n[[devices]]\nsbdf = "0000:03:00.1"\n'
    (region,) = TOOLS.reserved_regions(_machine(aliased))
    assert region.devices == (NIC, "0000:03:00.1")


def test_an_unflushed_unmap_is_a_stale_window_in_the_iotlb_and_the_device_tlb(tmp_path: Path) -> None:
    p = _machine(SMALL.replace("assign = 1", "assign = 1\nats = true"))
    g = p.machine.domains[1]
    assert _dte(p).iotlb  # the NIC has ATS: DTE.I is set
    assert isinstance(_nic_read(p, 0x5000), bytes)  # fills the IOTLB and the NIC's own TLB
    p.guest_unmap(g, Gfn(5), flush=False)
    assert isinstance(_nic_read(p, 0x5000), bytes)  # the stale window
    report = check(p)
    assert report.ok and {(w.cache, w.dfn) for w in report.stale} == {("iotlb", 5), ("device-tlb", 5)}
    dump = dump_platform(p, domains=[1])
    states = {(c.entry.cache, c.entry.by_source, c.entry.dfn): c.state for c in dump.caches}
    assert states[("iotlb", False, 5)] == "stale" and states[("device-tlb", True, 5)] == "stale"
    assert any(s.name == "DTE cache" and s.entries >= 1 for s in dump.cache_sizes)
    # forgetting the debt without the flush leaves both caches wrong, with nothing outstanding
    p.iommu.ledger.flushed(1, 5, 1)
    assert check(p).kinds() == {"stale-tlb"}
    p.iommu.iotlb_flush(g, Dfn(5), 1)  # INVALIDATE_IOMMU_PAGES and INVALIDATE_IOTLB_PAGES
    assert check(p).ok and isinstance(_nic_read(p, 0x5000), DmaFault)


def test_dump_and_check_of_the_stale_window_scenario_on_the_command_line(tmp_path: Path) -> None:
    result, data = cli_json("dump", "stale-window", "--vendor", "amd", "--until", "unmap-no-flush", tmp=tmp_path)
    assert result.exit_code == 0, result.output
    (dump,) = data["dumps"]
    stale = [c for c in dump["caches"] if c["state"] == "stale"]
    assert [(c["cache"], c["daddr"]) for c in stale] == [("iotlb", "0x101000")]
    result, data = cli_json("check", "stale-window", "--vendor", "amd", "--until", "unmap-no-flush", tmp=tmp_path)
    out = " ".join(result.output.split())
    assert result.exit_code == 0 and "isolation holds: no violation" in out
    assert "[stale window] amd0 iotlb entry (tag 0x1, d1, 4K) still says dfn 0x101" in out
    (report,) = data["checks"]
    assert report["ok"] and [w["dfn"] for w in report["stale_windows"]] == ["0x101"]


def test_decode_a_device_table_image(tmp_path: Path) -> None:
    p = _machine(SMALL + DISK)
    assert TOOLS is not None
    (dt,) = [t for t in TOOLS.decode_targets(p) if t.format == "amd-dt"]
    image = tmp_path / "mem.raw"
    # a DTE with reserved bits, and one with TV=0: both are listed with what the unit would do
    base = dt.root
    mem = p.machine.memory
    mem.write_u64(base + 0x0500 * DTE_SIZE, 1 | (1 << 5))
    mem.write_u64(base + 0x0600 * DTE_SIZE, 1)
    # and one whose tables lie far outside the image (domain 7, two levels at 0x40_0000_0000)
    far = Dte(valid=True, translation_valid=True, mode=2, root=0x40_0000_0000, ir=True, iw=True, domain_id=7)
    for i, q in enumerate(far.qwords()):
        mem.write_u64(base + 0x0700 * DTE_SIZE + 8 * i, q)
    write_raw(mem, image)
    with open_image(image) as img:
        result = decoder("amd-dt").decode(img, dt.root, dt.options, max_tables=1 << 16)
    d1 = TOOLS.domain_tables(p, p.machine.domains[1])
    assert d1 is not None
    guest = next(s for s in result.spaces if s.tables is not None and s.tables.root_mfn == d1.root_mfn)
    assert guest.sources == ["03:00.0"] and guest.attrs["domain_id"] == 1 and guest.pages == 8 << 20 >> 12
    blocked = [s for s in result.spaces if s.mode == ContextMode.BLOCKED]
    assert {src for s in blocked for src in s.sources} == {"05:00.0", "06:00.0"}
    assert any("reserved bits 0x20" in x and f"{base + 0x500 * DTE_SIZE:#x}" in x for x in result.all_problems)
    lost = next(s for s in result.spaces if s.attrs["domain_id"] == 7)
    assert lost.sources == ["07:00.0"] and not lost.mappings
    assert any("0x4000000000" in x and "outside" in x for x in lost.problems)
    res, data = cli_json("decode", image, "--format", "amd-dt", "--root", hex(base), "--dt-pages",
                          str(dt.options["dt_pages"]), tmp=tmp_path)  # fmt: skip
    assert res.exit_code == 3 and data is not None and not data["ok"] and len(data["spaces"]) == len(result.spaces)
    with pytest.raises(InvalidArgument, match="--dt-pages"):
        decoder("amd-dt").decode(mem, dt.root, {}, max_tables=16)
    with pytest.raises(InvalidArgument, match="--paging-mode"):
        decoder("amd-v1").decode(mem, dt.root, {}, max_tables=16)


def test_a_table_a_merge_unhooked_waits_for_the_owed_flush_and_is_no_orphan() -> None:
    """Regression: the checker called the table a batched merge replaced an orphan, though the driver frees
    it with the flush the caller owes (the hardware may still walk it until then)."""
    p = _machine(SMALL.replace('memory = "8M"', 'memory = "8M"\nalign = "2M"'))
    g = p.machine.domains[1]
    first = g.extents[0].mfn
    assert first.value % 512 == 0
    with p.iommu.dont_flush():  # 512 contiguous frames at a 2M-aligned dfn: the last map merges them
        for i in range(512):
            p.iommu.map_page(g, Dfn(0x10000 + i), first + i, Perm.R)
    assert TOOLS is not None
    (pending,) = TOOLS.pending_frees(p)
    assert p.machine.allocator.owner_of(Mfn(pending[0])) == "d1:amd-pt"
    report = check(p)
    assert report.ok, report.violations
    assert "1 table page(s) wait for the deferred free" in report.notes
    p.iommu.iotlb_flush_all(g)
    assert TOOLS.pending_frees(p) == [] and check(p).ok
    assert p.machine.allocator.owner_of(Mfn(pending[0])) is None


def test_a_hardware_domain_in_pass_through_mode_is_noted_not_reported() -> None:
    p = _machine(SMALL.replace("[hardware_domain]", "[iommu]\npassthrough = true\n[hardware_domain]") + DISK)
    assert TOOLS is not None
    route = p.machine.dma.route_of(p.device("0000:04:00.0"))
    assert route is not None
    ctx = TOOLS.context(p, route.unit, route.source_id)
    assert ctx.mode == ContextMode.PASSTHROUGH and "V=0" in ctx.detail  # Xen leaves V clear, TV set
    report = check(p)
    assert report.ok and any("0000:04:00.0 (d0) is not translated (V=0" in n for n in report.notes)


def test_decode_of_skipped_levels_and_next_level_7_pages(tmp_path: Path) -> None:
    """A tree Xen never writes but the hardware reads: a level-3 root whose entry 1 skips straight to a
    level-1 table, holding a 16 KiB NextLevel-7 page, and a 4 MiB NextLevel-7 page in a level-2 table."""
    fmt = AmdV1Format()
    m = Machine(ram_bytes=64 << 20)
    l3, l2, l1 = (m.allocator.alloc("t").value for _ in range(3))
    m.memory.store_word(l3, 0, fmt.pointer_entry(l2 << 12, 2))
    # root entry 1 covers dfn 0x40000 (1 GiB); pointing at a level-1 table skips level 2 (DVA bits 29:21)
    m.memory.store_word(l3, 1, fmt.pointer_entry(l1 << 12, 1))
    for k in range(8, 12):  # a 16 KiB page at 0x20_0000 in slots 8-11: dfn 0x40008-0x4000b
        m.memory.store_word(l1, k, fmt.sized_leaf(0x20_0000, 14, Perm.RW))
    for k in (4, 5):  # a 4 MiB page at 0x40_0000 in level-2 slots 4-5: dfn 0x800-0xbff
        m.memory.store_word(l2, k, fmt.sized_leaf(0x40_0000, 22, Perm.R))
    image = tmp_path / "hand.raw"
    write_raw(m.memory, image)
    with open_image(image) as img:
        result = decoder("amd-v1").decode(img, l3 << 12, {"paging_mode": 3}, max_tables=64)
    (space,) = result.spaces
    assert [(r.dfn, r.mfn, r.pages, r.page_shift) for r in space.mappings] == [
        (0x800, 0x400, 1024, 22),
        (0x40008, 0x200, 4, 14),
    ]
    assert not result.all_problems
    # the tree shows the level-1 table right under the root
    result_cli, data = cli_json(
        "decode", image, "--format", "amd-v1", "--root", hex(l3 << 12), "--paging-mode", "3", "--tree", tmp=tmp_path
    )
    assert result_cli.exit_code == 0, result_cli.output
    (tree,) = data["trees"].values()
    (top,) = tree["tops"]
    assert [c["level"] for c in top["children"]] == [2, 1]
    assert top["children"][1]["dfn"] == "0x40000"
