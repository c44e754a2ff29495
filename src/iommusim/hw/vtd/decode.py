"""Read a VT-d translation setup back from memory alone: root table -> context entries -> mappings.

This is what the unit would do for every source id at once, without caches: given anything that yields
frames (live machine memory, or a memory image of a crashed machine) and the root-table address the unit
was programmed with, list each device's context and the translations its second-level tables make.
Devices of one domain share tables, so each table tree is walked once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from iommusim.errors import BadAddress
from iommusim.frames import PAGE_SHIFT
from iommusim.hw.vtd.regs import agaw_to_levels
from iommusim.hw.vtd.structs import ContextEntry, RootEntry, TranslationType, context_reserved, root_reserved
from iommusim.pagetable.vtd import VtdSecondLevelFormat
from iommusim.pagetable.walk import FrameReader, Mapping, mappings

__all__ = ["DeviceView", "decode_root_table"]


@dataclass
class DeviceView:
    """One present context entry and what it translates."""

    sid: int
    context: ContextEntry
    mappings: list[Mapping] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def bdf(self) -> str:
        return f"{self.sid >> 8:02x}:{self.sid >> 3 & 0x1F:02x}.{self.sid & 7}"


def _entry(reader: FrameReader, maddr: int) -> tuple[int, int]:
    words = reader.peek_words(maddr >> PAGE_SHIFT)
    i = (maddr & 0xFFF) >> 3
    return int(words[i]), int(words[i + 1])


def decode_root_table(
    reader: FrameReader, root_table: int, *, fmt: VtdSecondLevelFormat | None = None
) -> list[DeviceView]:
    """Every present context entry under the root table, with its translations (pass-through: none)."""
    fmt = fmt or VtdSecondLevelFormat(haw=52)
    out: list[DeviceView] = []
    walked: dict[tuple[int, int], tuple[list[Mapping], list[str]]] = {}
    for bus in range(256):
        rlo, rhi = _entry(reader, root_table + 16 * bus)
        root = RootEntry.decode(rlo, rhi)
        if not root.present:
            continue
        rsvd = root_reserved(rlo, rhi, fmt.haw)
        for devfn in range(256):
            try:
                lo, hi = _entry(reader, root.ctp + 16 * devfn)
            except BadAddress as exc:
                out.append(DeviceView(bus << 8, ContextEntry(False), problems=[f"context table: {exc.message}"]))
                break
            ctx = ContextEntry.decode(lo, hi)
            if not ctx.present:
                continue
            view = DeviceView(bus << 8 | devfn, ctx)
            if rsvd:
                view.problems.append(f"reserved bits {rsvd:#x} set in the root entry of bus {bus:#x}")
            bad = context_reserved(lo, hi, fmt.haw)
            if bad:
                view.problems.append(f"reserved bits {bad:#x} set in the context entry")
            if ctx.t != TranslationType.PASS_THROUGH:
                key = (ctx.slptptr, ctx.aw)
                if key not in walked:
                    problems: list[str] = []
                    try:
                        runs = mappings(
                            reader, fmt, ctx.slptptr >> PAGE_SHIFT, agaw_to_levels(ctx.aw), problems=problems
                        )
                    except BadAddress as exc:
                        runs, problems = [], [exc.message]
                    walked[key] = (runs, problems)
                view.mappings, extra = walked[key]
                view.problems.extend(extra)
            out.append(view)
    return out
