"""The tools' view of the ARM SMMU: contexts from stream matching and context banks, the TLB, ``arm-s2`` images.

A context is read the way the SMMU resolves a stream: sCR0 (client port disabled: everything bypasses),
the stream match registers (no match: sCR0.USFCFG decides between a fault and bypass; the lowest matching
group wins, as the model does), the group's S2CR (translate, bypass, fault) and, for a translating group,
its context bank: CBAR (a stage-2 context and its VMID, which tags the TLB), SCTLR.M, TTBR0 and TCR (the
start level and concatenated root tables of the walk).  All of it from registers; the tables from memory.

The ``arm-s2`` image format is one stage-2 tree: ``--start-level`` (ARM lookup level 0-3 of the root,
default 1) and ``--root-pages`` (1-16 concatenated root tables, default 1).
"""

from __future__ import annotations

from collections.abc import Mapping as MappingABC
from typing import TYPE_CHECKING

from iommusim.errors import InvalidArgument
from iommusim.frames import PAGE_SHIFT
from iommusim.hw.base import DmaRemapper
from iommusim.hw.iotlb import Iotlb
from iommusim.hw.smmu import SmmuFaultRecord, SmmuV2, regs
from iommusim.pagetable.arm_s2 import ArmS2Format, S2Geometry, our_level, s2_geometry_aarch32, s2_geometry_aarch64
from iommusim.pagetable.walk import FrameReader
from iommusim.tools.decode import DecodedSpace, DecodeResult, check_options
from iommusim.tools.tables import TableRoot, table_mappings
from iommusim.tools.vendors import (
    CachedTranslation,
    CacheSummary,
    ContextMode,
    DecodeTarget,
    DeviceContext,
    ReservedRegion,
    iotlb_translations,
)

if TYPE_CHECKING:
    from iommusim.machine.domain import Domain
    from iommusim.platform import Platform

__all__ = ["ADAPTER", "STAGE2_DECODER", "SmmuTools"]

FORMAT = ArmS2Format()


def _units(platform: Platform) -> list[SmmuV2]:
    return [u for u in platform.units if isinstance(u, SmmuV2)]


def _geometry(unit: SmmuV2, bank: int) -> S2Geometry | None:
    """The walk a context bank's TCR describes, within the input size IDR2 reports."""
    tcr = unit.banks[bank].tcr.value
    if unit.gr1.get(f"CBA2R{bank}") & regs.CBA2R_VA64:
        t = regs.Tcr.decode(tcr)
        geom = s2_geometry_aarch64(t.t0sz, t.sl0) if t.tg0 == 0 else None
    else:
        geom = s2_geometry_aarch32(*regs.Tcr.aarch32_fields(tcr))
    ias = regs.id_bits_to_size(regs.Idr2.decode(unit.gr0.get("IDR2")).ias)
    if geom is not None and geom.ipa_bits > ias:
        return None
    return geom


class SmmuTools:
    vendor = "smmu"

    def context(self, platform: Platform, unit: DmaRemapper, source_id: int) -> DeviceContext:
        if not isinstance(unit, SmmuV2):
            raise InvalidArgument(f"{unit.name} is not an SMMU")
        name = unit.name
        scr0 = unit.gr0.get("sCR0")
        if scr0 & regs.Scr0.CLIENTPD:
            return DeviceContext(
                name, source_id, ContextMode.UNTRANSLATED, detail="sCR0.CLIENTPD: the SMMU is bypassed"
            )
        sid = source_id & regs.SMR_ID_MASK
        groups = []
        for n in range(regs.Idr0.decode(unit.gr0.get("IDR0")).numsmrg):
            if regs.Smr.decode(unit.gr0.get(f"SMR{n}")).matches(sid):
                groups.append(n)
        if not groups:
            if scr0 & regs.Scr0.USFCFG:
                return DeviceContext(name, source_id, ContextMode.BLOCKED, detail="no stream match: fault")
            return DeviceContext(name, source_id, ContextMode.UNTRANSLATED, detail="no stream match: bypass")
        problems: tuple[str, ...] = ()
        if len(groups) > 1:
            problems = (f"stream {sid:#x} matches stream match groups {groups}",)
            if scr0 & regs.Scr0.SMCFCFG:
                return DeviceContext(
                    name, source_id, ContextMode.BLOCKED, detail="stream match conflict", problems=problems
                )
        group = groups[0]
        s2cr = regs.S2cr.decode(unit.gr0.get(f"S2CR{group}"))
        where = f"SMR{group}"
        if s2cr.type == regs.S2crType.BYPASS:
            return DeviceContext(
                name, source_id, ContextMode.UNTRANSLATED, detail=f"{where}: S2CR bypass", problems=problems
            )
        if s2cr.type != regs.S2crType.TRANSLATE or s2cr.cbndx >= len(unit.banks):
            return DeviceContext(name, source_id, ContextMode.BLOCKED, detail=f"{where}: S2CR fault", problems=problems)
        n = s2cr.cbndx
        cbar = regs.Cbar.decode(unit.gr1.get(f"CBAR{n}"))
        detail = f"{where} -> context bank {n}, VMID {cbar.vmid}"
        if cbar.type != regs.CbarType.S2_TRANS:
            return DeviceContext(name, source_id, ContextMode.BLOCKED, cbar.vmid, None, detail, problems)
        if not unit.banks[n].sctlr.value & regs.Sctlr.M:
            return DeviceContext(
                name, source_id, ContextMode.UNTRANSLATED, cbar.vmid, None, f"{detail} (SCTLR.M=0)", problems
            )
        geom = _geometry(unit, n)
        if geom is None:
            bad = (*problems, f"context bank {n}: TCR describes no stage-2 walk")
            return DeviceContext(name, source_id, ContextMode.BLOCKED, cbar.vmid, None, detail, bad)
        base = unit.banks[n].ttbr0.value & ((1 << 48) - 1) & ~((geom.root_pages << PAGE_SHIFT) - 1)
        tables = TableRoot(FORMAT, base >> PAGE_SHIFT, geom.levels, geom.root_pages)
        return DeviceContext(name, source_id, ContextMode.TRANSLATED, cbar.vmid, tables, detail, problems)

    def contexts(self, platform: Platform) -> list[DeviceContext]:
        out = []
        for unit in _units(platform):
            for n in range(regs.Idr0.decode(unit.gr0.get("IDR0")).numsmrg):
                smr = regs.Smr.decode(unit.gr0.get(f"SMR{n}"))
                if smr.valid:
                    out.append(self.context(platform, unit, smr.id))
        return out

    def domain_tables(self, platform: Platform, d: Domain) -> TableRoot | None:
        table = getattr(d.p2m, "table", None)
        root = getattr(table, "root", None)
        if table is None or root is None:
            return None
        return TableRoot(FORMAT, root.value, int(table.levels), int(table.root_pages))

    def table_owner(self, domid: int) -> str:
        return f"d{domid}:p2m"

    def pending_frees(self, platform: Platform) -> list[tuple[int, int]]:
        return []  # the p2m frees its pages itself

    def iotlbs(self, platform: Platform) -> dict[str, Iotlb]:
        return {u.name: u.tlb for u in _units(platform)}

    def cached_translations(self, platform: Platform) -> list[CachedTranslation]:
        out: list[CachedTranslation] = []
        for u in _units(platform):
            out += iotlb_translations(u.name, u.tlb, "tlb")
        return out

    def cache_summaries(self, platform: Platform) -> list[CacheSummary]:
        return [CacheSummary(u.name, "tlb", len(u.tlb), u.tlb.capacity) for u in _units(platform)]

    def fault_reasons(self, record: object) -> list[str]:
        if not isinstance(record, SmmuFaultRecord):
            return []
        names = [record.kind, "context" if record.context_bank is not None else "global"]
        if record.level is not None:
            names.append(f"level-{record.level}")
        return names

    def reserved_regions(self, platform: Platform) -> list[ReservedRegion]:
        return []

    def decode_targets(self, platform: Platform) -> list[DecodeTarget]:
        out = []
        for d in sorted(platform.machine.domains.values(), key=lambda x: x.domid):
            t = self.domain_tables(platform, d)
            if t is not None:
                opts = {"start_level": 4 - t.levels, "root_pages": t.root_pages}
                out.append(DecodeTarget("arm-s2", t.root_maddr, opts, f"d{d.domid} stage-2 tables", d.domid))
        return out


ADAPTER = SmmuTools()


class Stage2Decoder:
    name = "arm-s2"
    vendor = "smmu"
    summary = "one ARM stage-2 tree (a p2m, what an SMMU context bank walks): --start-level 0-3, --root-pages 1-16"
    options: MappingABC[str, str] = {
        "start_level": "ARM lookup level of the root table, 0-3 (default 1)",
        "root_pages": "concatenated root tables, 1, 2, 4, 8 or 16 (default 1)",
    }

    def decode(self, reader: FrameReader, root: int, options: MappingABC[str, int], *, max_tables: int) -> DecodeResult:
        opts = check_options(self, options)
        start, pages = opts.get("start_level", 1), opts.get("root_pages", 1)
        if not 0 <= start <= 3:
            raise InvalidArgument(f"ARM lookup levels are 0-3, not {start}")
        if pages not in (1, 2, 4, 8, 16) or (start == 0 and pages > 1):
            raise InvalidArgument(f"{pages} concatenated root tables at lookup level {start} do not exist")
        if root & ((pages << PAGE_SHIFT) - 1):
            raise InvalidArgument(
                f"{pages} concatenated root tables must be aligned to {pages * 4} KiB; {root:#x} is not"
            )
        tables = TableRoot(FORMAT, root >> PAGE_SHIFT, our_level(start), pages)
        space = DecodedSpace(f"stage-2 tables at {root:#x}", ContextMode.TRANSLATED, tables)
        space.attrs = {
            "start_level": start,
            "root_pages": pages,
            "ipa_bits": 12 + 9 * (4 - start) + (pages.bit_length() - 1),
        }
        space.mappings = table_mappings(reader, tables, problems=space.problems, max_tables=max_tables)
        return DecodeResult(self.name, root, opts, [space])


STAGE2_DECODER = Stage2Decoder()
