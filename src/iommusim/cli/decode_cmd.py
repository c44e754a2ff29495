"""``iommusim decode``: IOMMU tables read back from a memory image (raw or ELF core)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from iommusim.cli.common import Exit, console, fail, user_errors, write_json
from iommusim.images import open_image
from iommusim.tools.decode import CachingReader, DecodeResult, available_decoders, decoder, image_frames
from iommusim.tools.render import decode_result
from iommusim.tools.tables import TableTree, build_tree

__all__ = ["decode_command", "decode_image", "parse_int"]


def parse_int(text: str, what: str) -> int:
    try:
        value = int(text.replace("_", ""), 0)
    except ValueError:
        raise typer.BadParameter(f"{what} must be a number (0x... for hex), not {text!r}") from None
    if value < 0:
        raise typer.BadParameter(f"{what} cannot be negative")
    return value


def gather_options(pairs: dict[str, int | None], extra: list[str]) -> dict[str, int]:
    opts = {k: v for k, v in pairs.items() if v is not None}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--option takes KEY=VALUE, not {item!r}")
        opts[key.strip().replace("-", "_")] = parse_int(value.strip(), f"--option {key}")
    return opts


def decode_image(
    image: Path,
    fmt: str,
    root: int,
    options: dict[str, int],
    *,
    base: int = 0,
    tree: bool = False,
    max_tables: int = 64,
) -> tuple[DecodeResult, dict[str, TableTree]]:
    """Decode an image (raising ImageError/TableWalkError/InvalidArgument for the caller to report)."""
    dec = decoder(fmt)
    with open_image(image, base=base) as img:
        reader = CachingReader(img)
        bound = image_frames(img)
        result = dec.decode(reader, root, options, max_tables=bound)
        trees: dict[str, TableTree] = {}
        if tree:
            for s in result.spaces:
                if s.tables is not None:
                    trees[s.label] = build_tree(reader, s.tables, max_nodes=max_tables, max_tables=bound)
    return result, trees


def _formats() -> None:
    out = console()
    t = Table(title="Image formats", title_justify="left", show_edge=False)
    t.add_column("format", style="bold")
    t.add_column("vendor")
    t.add_column("what it reads")
    t.add_column("options")
    for name in available_decoders():
        dec = decoder(name)
        opts = "\n".join(f"--{k.replace('_', '-')}: {h}" for k, h in dec.options.items())
        t.add_row(name, dec.vendor, dec.summary, opts)
    out.print(t)


def decode_command(
    image: Path = typer.Argument(
        None, help="A raw physical-memory file or an ELF core (QEMU dump-guest-memory, kdump)."
    ),
    fmt: str | None = typer.Option(None, "--format", "-f", help="What the root points at (see --list-formats)."),
    root: str | None = typer.Option(None, "--root", "-r", help="Machine address of the root table (0x... for hex)."),
    base: str = typer.Option("0", "--base", help="Physical address of the first byte of a raw image."),
    levels: int | None = typer.Option(None, "--levels", help="Table levels (vtd-sl)."),
    agaw: int | None = typer.Option(None, "--agaw", help="VT-d AGAW code, instead of --levels (vtd-sl)."),
    haw: int | None = typer.Option(None, "--haw", help="Host address width the entries were written for (vtd-*)."),
    paging_mode: int | None = typer.Option(None, "--paging-mode", help="AMD paging mode, 1-6 (amd-v1)."),
    dt_pages: int | None = typer.Option(
        None, "--dt-pages", help="AMD device-table size in 4 KiB pages, 1-512: DevTabBase bits 8:0 plus one (amd-dt)."
    ),
    start_level: int | None = typer.Option(None, "--start-level", help="ARM lookup level of the root, 0-3 (arm-s2)."),
    root_pages: int | None = typer.Option(None, "--root-pages", help="Concatenated root tables, 1-16 (arm-s2)."),
    option: list[str] | None = typer.Option(
        None, "--option", "-o", help="Another integer option of the format, KEY=VALUE."
    ),
    tree: bool = typer.Option(False, "--tree/--no-tree", help="Show the table pages as a tree too."),
    max_rows: int = typer.Option(64, "--max-rows", help="Rows of each mapping table to show (JSON has them all)."),
    max_tables: int = typer.Option(64, "--max-tables", help="Table pages of each tree to show."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the result as JSON here ('-': stdout)."),
    list_formats: bool = typer.Option(False, "--list-formats", help="List the image formats and their options."),
) -> None:
    """Walk IOMMU tables in a memory image someone else made, from the root address you give.

    A truncated or corrupt image, a pointer outside it or a loop in the tables is reported with the
    address involved (exit status 3); what could be decoded is still shown.

    Examples:

      iommusim decode --list-formats
      iommusim decode mem.raw --format vtd-root --root 0xfff7000
      iommusim decode vmcore --format vtd-sl --root 0x7fff1000 --levels 4 --tree
      iommusim decode dump.raw --base 0x80000000 --format arm-s2 --root 0x8fff8000 --start-level 1 --root-pages 2
      iommusim decode amd.raw --format amd-dt --root 0xfff8000 --dt-pages 8
      iommusim decode amd.raw --format amd-v1 --root 0xffef000 --paging-mode 2 --tree
    """
    if list_formats:
        _formats()
        raise typer.Exit(0)
    if image is None or fmt is None or root is None:
        raise typer.BadParameter("give an IMAGE, --format and --root (or --list-formats)")
    to_stdout = json_path is not None and str(json_path) == "-"
    out = console(quiet=to_stdout)
    opts = gather_options(
        {
            "levels": levels,
            "agaw": agaw,
            "haw": haw,
            "paging_mode": paging_mode,
            "dt_pages": dt_pages,
            "start_level": start_level,
            "root_pages": root_pages,
        },
        option or [],
    )
    with user_errors(image=True):
        result, trees = decode_image(
            image,
            fmt,
            parse_int(root, "--root"),
            opts,
            base=parse_int(base, "--base"),
            tree=tree,
            max_tables=max_tables,
        )
        out.print(decode_result(result, trees, max_rows=max_rows))
        if json_path is not None:
            data = result.to_json()
            data["image"] = str(image)
            if trees:
                data["trees"] = {k: t.to_json() for k, t in trees.items()}
            write_json(json_path, data)
    problems = result.all_problems
    if problems:
        raise fail(Exit.IMAGE, f"{len(problems)} problem(s) in the image; first: {problems[0]}")
    raise typer.Exit(0)
