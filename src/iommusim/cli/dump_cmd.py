"""``iommusim dump``: a domain's IOMMU tables (tree and mappings), the hardware's caches and counters."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from iommusim.cli.common import Exit, console, scenario_path, user_errors, write_json
from iommusim.images import write_elf, write_raw
from iommusim.platform import Platform
from iommusim.tools.dump import dump_platform
from iommusim.tools.render import machine_dump
from iommusim.tools.scenario.model import load_scenario
from iommusim.tools.scenario.runner import run_scenario, vendors_for
from iommusim.tools.vendors import VENDOR_TITLES, vendor_tools

__all__ = ["dump_command"]


def _save(out: Console, platform: Platform, path: Path, vendor: str, *, many: bool) -> dict[str, object]:
    """Write the machine's memory as an image and say how to decode each of its trees."""
    if many:
        path = path.with_name(f"{path.stem}-{vendor}{path.suffix}")
    elf = path.suffix.lower() in (".elf", ".core", ".vmcore")
    if elf:
        write_elf(platform.machine.memory, path)
    else:
        write_raw(platform.machine.memory, path)
    targets = vendor_tools(vendor).decode_targets(platform)
    out.print(f"wrote {'an ELF core' if elf else 'a raw image'} of machine memory to {path}; decode it with:")
    commands = []
    for t in targets:
        opts = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in t.options.items())
        cmd = f"iommusim decode {path} --format {t.format} --root {t.root:#x} {opts}".rstrip()
        commands.append({"label": t.label, "command": cmd})
        out.print(f"  {cmd}    [dim]# {t.label}[/]")
    return {"path": str(path), "format": "elf" if elf else "raw", "decode": commands}


def dump_command(
    scenario: str = typer.Argument("demo", help="A scenario file or example name (default: the demo's machine)."),
    vendor: str | None = typer.Option(
        None, "--vendor", "-v", help="Only this vendor (default: every one it applies to)."
    ),
    until: str = typer.Option(
        None, "--until", "-u", help="Dump the machine as it is after this step (number or name)."
    ),
    domain: list[int] | None = typer.Option(
        None, "--domain", "-d", help="Only these domains (repeatable; default: all)."
    ),
    tree: bool = typer.Option(True, "--tree/--no-tree", help="Show each domain's table pages as a tree."),
    caches: bool = typer.Option(True, "--caches/--no-caches", help="Show every cached translation and its state."),
    max_rows: int = typer.Option(64, "--max-rows", help="Rows of each table to show (JSON has them all)."),
    max_tables: int = typer.Option(64, "--max-tables", help="Table pages of each tree to show."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the dump as JSON here ('-': stdout)."),
    save_image: Path | None = typer.Option(
        None, "--save-image", help="Also write machine memory as an image (.elf or .core: an ELF core; else raw)."
    ),
) -> None:
    """Dump IOMMU state the way Xen's "dump IOMMU page tables" key does, read back from memory.

    For each domain: its tables as a tree (levels, table addresses, entries) and as a coalesced list of
    mappings (Dfn range -> Mfn range, permissions, page size), the contexts its devices have in the
    hardware and the flushes it still owes; then every cached translation, marked ok or stale, and the
    units' counters.

    Examples:

      iommusim dump                                    the demo machine, every vendor
      iommusim dump superpage-split --until split -d 1 one domain, right after a step
      iommusim dump my.toml --vendor vtd --json -      as JSON
      iommusim dump --vendor vtd --save-image mem.elf  and a memory image to try 'iommusim decode' on
    """
    to_stdout = json_path is not None and str(json_path) == "-"
    out = console(quiet=to_stdout)
    failed = False
    dumps = []
    with user_errors():
        sc = load_scenario(scenario_path(scenario))
        if until is not None:
            sc.step_index(until)
        vendors = vendors_for(sc, vendor)
        for v in vendors:
            res = run_scenario(sc, v, until=until)
            where = f"after step {until}" if until is not None else "at the end"
            out.rule(f"[bold]{sc.name}[/] on {VENDOR_TITLES.get(v, v)}, {where}")
            if res.failure is not None:
                failed = True
                out.print(Text(f"the scenario failed: {res.failure}; this is the machine at that point", style="red"))
            assert res.platform is not None
            dump = dump_platform(res.platform, domains=domain or None, tree=tree, caches=caches, max_nodes=max_tables)
            out.print(machine_dump(dump, max_rows=max_rows))
            entry = {"vendor": v, "until": until, "failure": res.failure, **dump.to_json()}
            if save_image is not None:
                entry["image"] = _save(out, res.platform, save_image, v, many=len(vendors) > 1)
            dumps.append(entry)
        if json_path is not None:
            write_json(json_path, {"scenario": sc.name, "file": sc.source, "dumps": dumps})
    raise typer.Exit(int(Exit.FAILED if failed else Exit.OK))
