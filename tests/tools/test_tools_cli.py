"""The command line as a whole: help with examples everywhere, the demo's story, the vendor adapters' contract."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tools_helpers import INSTALLED, TOOLED, cli, run

from iommusim.errors import DmaFault
from iommusim.frames import Daddr
from iommusim.tools.decode import available_decoders
from iommusim.tools.tables import table_frames
from iommusim.tools.vendors import ContextMode, vendor_tools

COMMANDS = ["run", "dump", "decode", "check", "plot"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_everywhere_with_examples(command: str) -> None:
    result = cli(command, "--help")
    assert result.exit_code == 0
    assert "Examples" in result.output and f"iommusim {command}" in result.output
    assert "--json" in result.output or command == "plot"


def test_the_commands_are_listed() -> None:
    result = cli("--help")
    for command in ["demo", *COMMANDS]:
        assert command in result.output


def test_demo_tells_the_stale_window_with_the_guests_own_bytes() -> None:
    result = cli("demo")
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert out.count("read b'd1 secret, page 0x101'") == len(INSTALLED)
    assert out.count("stale translation") == len(INSTALLED)
    assert out.count("the flush ledger says d1 owes: dfn 0x101") == len(INSTALLED)
    assert out.count("the flush ledger is empty again: True") == len(INSTALLED)
    assert out.count("hypervisor log:") >= 2 * len(INSTALLED)
    assert "counters" in out
    for vendor in TOOLED:
        assert out.count("isolation check: no violation, 1 stale window(s) with the flush still owed") == len(TOOLED)
        del vendor


def test_demo_is_deterministic() -> None:
    assert cli("demo").output == cli("demo").output


def test_the_installed_command_runs_a_scenario() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "iommusim", "run", "basic", "--vendor", TOOLED[0], "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "basic on" in proc.stdout and "passed" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "iommusim", "run", "nosuch"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "error:" in proc.stderr


@pytest.mark.parametrize("vendor", TOOLED)
def test_a_vendor_adapter_keeps_its_contract(vendor: str) -> None:
    """What every VendorTools must do; AMD's adapter will be held to exactly this."""
    res = run("basic", vendor)
    p = res.platform
    assert p is not None
    tools = vendor_tools(vendor)
    g = p.machine.domains[1]
    nic = p.device("0000:03:00.0")
    route = p.machine.dma.route_of(nic)
    assert route is not None
    ctx = tools.context(p, route.unit, route.source_id)
    d1 = tools.domain_tables(p, g)
    assert ctx.mode == ContextMode.TRANSLATED and ctx.tag is not None
    assert d1 is not None and ctx.tables is not None and ctx.tables.key == d1.key
    assert any(c.source_id == route.source_id for c in tools.contexts(p))
    # table pages are accounted to the domain's table owner
    owned = {m.value for m in p.machine.allocator.frames_of(tools.table_owner(1))}
    assert set(table_frames(p.machine.memory, d1)) <= owned
    # a DMA fills a cache the adapter shows, under the context's tag
    p.machine.dma.read(nic, Daddr(0x7000), 4)
    cached = [c for c in tools.cached_translations(p) if not c.by_source and c.daddr == 0x7000]
    assert cached and cached[0].tag == ctx.tag and cached[0].unit == route.unit.name
    assert tools.iotlbs(p) and tools.cache_summaries(p)
    with pytest.raises(DmaFault) as info:
        p.machine.dma.read(nic, Daddr(0x7000_0000), 4)
    assert tools.fault_reasons(info.value.record)
    formats = {t.format for t in tools.decode_targets(p)}
    assert formats and formats <= set(available_decoders())
    assert tools.reserved_regions(p) is not None
