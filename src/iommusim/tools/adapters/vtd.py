"""The tools' view of Intel VT-d: contexts from the root table, caches, fault reasons, image formats.

Contexts are read as a remapping unit reads them: the root-table address from the RTADDR register, the
root entry of the bus, the context entry of the device and function, all from memory; a context the unit
still holds in its context cache wins over memory, because that is what the device's next request uses.
The IOTLB is tagged with the context's domain id; device TLBs (ATS) by source id.

Image formats: ``vtd-sl`` is one second-level tree (``--levels`` 2-5, or ``--agaw`` 0-3, default 4 levels,
Xen's 48-bit width); ``vtd-root`` is a root table, decoded into every present context entry, grouped by the
tables they share.  Both take ``--haw`` (the host address width the tables were written for; default 52,
which reserves no address bit).
"""

from __future__ import annotations

from collections.abc import Mapping as MappingABC
from typing import TYPE_CHECKING

from iommusim.drivers.vtd.state import VtdDomain
from iommusim.errors import BadAddress, InvalidArgument
from iommusim.frames import PAGE_SHIFT
from iommusim.hw.base import DmaRemapper
from iommusim.hw.iotlb import Iotlb
from iommusim.hw.vtd.caches import CtxInfo
from iommusim.hw.vtd.regs import agaw_to_levels, agaw_to_width
from iommusim.hw.vtd.structs import (
    ContextEntry,
    FaultReason,
    FaultRecord,
    RootEntry,
    TranslationType,
    context_reserved,
    root_reserved,
)
from iommusim.hw.vtd.unit import VtdUnit
from iommusim.pagetable.vtd import VtdSecondLevelFormat
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

__all__ = ["ADAPTER", "ROOT_TABLE_DECODER", "SECOND_LEVEL_DECODER", "VtdTools"]


def _bdf(sid: int) -> str:
    return f"{sid >> 8:02x}:{sid >> 3 & 0x1F:02x}.{sid & 7}"


def _units(platform: Platform) -> list[VtdUnit]:
    return [u for u in platform.units if isinstance(u, VtdUnit)]


def _context_from_entry(
    unit_name: str, sid: int, ctx: ContextEntry, fmt: VtdSecondLevelFormat, agaw_ok: bool, problems: list[str]
) -> DeviceContext:
    detail = f"did {ctx.did}, T={ctx.t}, AW={ctx.aw}"
    t = ctx.t
    if t == TranslationType.PASS_THROUGH:
        return DeviceContext(unit_name, sid, ContextMode.PASSTHROUGH, ctx.did, None, detail, tuple(problems))
    if t == TranslationType.RESERVED or not agaw_ok:
        problems.append(f"context entry of {_bdf(sid)} is invalid (T={t}, AW={ctx.aw}): the unit blocks it")
        return DeviceContext(unit_name, sid, ContextMode.BLOCKED, ctx.did, None, detail, tuple(problems))
    tables = TableRoot(fmt, ctx.slptptr >> PAGE_SHIFT, agaw_to_levels(ctx.aw))
    return DeviceContext(unit_name, sid, ContextMode.TRANSLATED, ctx.did, tables, detail, tuple(problems))


def _entry(reader: FrameReader, maddr: int) -> tuple[int, int]:
    words = reader.peek_words(maddr >> PAGE_SHIFT)
    i = (maddr & 0xFFF) >> 3
    return int(words[i]), int(words[i + 1])


class VtdTools:
    vendor = "vtd"

    # -- contexts, from registers and memory ----------------------------------------------------------

    def _memory_context(self, unit: VtdUnit, sid: int) -> DeviceContext:
        name = unit.name
        if not unit.translation_enabled:
            return DeviceContext(name, sid, ContextMode.UNTRANSLATED, detail="translation disabled (GSTS.TES=0)")
        rta = unit.regs.get("RTADDR") & ~0xFFF
        bus, devfn = sid >> 8, sid & 0xFF
        try:
            rlo, rhi = _entry(unit.memory, rta + 16 * bus)
            root = RootEntry.decode(rlo, rhi)
            if not root.present:
                return DeviceContext(name, sid, ContextMode.BLOCKED, detail=f"root entry of bus {bus:#04x} not present")
            lo, hi = _entry(unit.memory, root.ctp + 16 * devfn)
        except BadAddress as exc:
            return DeviceContext(name, sid, ContextMode.BLOCKED, problems=(f"context lookup: {exc.message}",))
        ctx = ContextEntry.decode(lo, hi)
        if not ctx.present:
            return DeviceContext(name, sid, ContextMode.BLOCKED, detail="context entry not present")
        problems = []
        if root_reserved(rlo, rhi, unit.haw):
            problems.append(f"reserved bits set in the root entry of bus {bus:#04x}")
        if context_reserved(lo, hi, unit.haw):
            problems.append(f"reserved bits set in the context entry of {_bdf(sid)}")
        return _context_from_entry(name, sid, ctx, unit.fmt, unit.cap.supports_agaw(ctx.aw), problems)

    def context(self, platform: Platform, unit: DmaRemapper, source_id: int) -> DeviceContext:
        if not isinstance(unit, VtdUnit):
            raise InvalidArgument(f"{unit.name} is not a VT-d unit")
        mem = self._memory_context(unit, source_id)
        if not unit.translation_enabled:
            return mem
        cached = dict(unit.context_cache.entries()).get(source_id)
        if cached is None or not cached.present or _same(cached, mem):
            return mem
        # the unit translates with the context it cached: memory changed and no invalidation reached it
        tables = TableRoot(unit.fmt, cached.slptptr >> PAGE_SHIFT, cached.levels) if cached.t != 2 else None
        mode = ContextMode.PASSTHROUGH if cached.t == 2 else ContextMode.TRANSLATED
        stale = (
            f"the context cache of {unit.name} still holds {_bdf(source_id)} -> did {cached.did}, tables at "
            f"{cached.slptptr:#x}, but memory says {mem.detail or mem.mode.value}"
        )
        return DeviceContext(
            unit.name, source_id, mode, cached.did, tables, f"cached: did {cached.did}", (*mem.problems, stale)
        )

    def contexts(self, platform: Platform) -> list[DeviceContext]:
        out: list[DeviceContext] = []
        for unit in _units(platform):
            if not unit.translation_enabled:
                continue
            rta = unit.regs.get("RTADDR") & ~0xFFF
            try:
                roots = unit.memory.peek_words(rta >> PAGE_SHIFT)
            except BadAddress:
                continue
            for bus in range(256):
                root = RootEntry.decode(int(roots[2 * bus]), int(roots[2 * bus + 1]))
                if not root.present:
                    continue
                try:
                    ctxs = unit.memory.peek_words(root.ctp >> PAGE_SHIFT)
                except BadAddress:
                    continue
                for devfn in range(256):
                    if int(ctxs[2 * devfn]) & 1:
                        out.append(self.context(platform, unit, bus << 8 | devfn))
        return out

    # -- the driver's side, as Xen's dump key reads it --------------------------------------------------

    def domain_tables(self, platform: Platform, d: Domain) -> TableRoot | None:
        arch = getattr(d.iommu, "arch", None)
        units = _units(platform)
        if not isinstance(arch, VtdDomain) or arch.table.root is None or not units:
            return None
        return TableRoot(units[0].fmt, arch.table.root.value, arch.levels)

    def table_owner(self, domid: int) -> str:
        return f"d{domid}:iommu-pt"

    def pending_frees(self, platform: Platform) -> list[tuple[int, int]]:
        return []  # the driver frees through the generic deferred list only

    # -- caches ----------------------------------------------------------------------------------------------

    def iotlbs(self, platform: Platform) -> dict[str, Iotlb]:
        return {u.name: u.iotlb for u in _units(platform)}

    def cached_translations(self, platform: Platform) -> list[CachedTranslation]:
        out: list[CachedTranslation] = []
        for u in _units(platform):
            out += iotlb_translations(u.name, u.iotlb)
            for sid, daddr, e in u.device_tlb.entries():
                out.append(CachedTranslation(u.name, "device-tlb", sid, daddr, e.page_shift, e.out, e.perms, True))
        return out

    def cache_summaries(self, platform: Platform) -> list[CacheSummary]:
        out = []
        for u in _units(platform):
            out += [
                CacheSummary(u.name, "iotlb", len(u.iotlb), u.iotlb.capacity),
                CacheSummary(u.name, "context cache", len(u.context_cache)),
                CacheSummary(u.name, "paging-structure (PDE) cache", len(u.pde_cache)),
                CacheSummary(u.name, "not-present cache", len(u.negative)),
                CacheSummary(u.name, "device TLBs", len(u.device_tlb.entries())),
            ]
        return out

    # -- faults, firmware, images ----------------------------------------------------------------------------

    def fault_reasons(self, record: object) -> list[str]:
        if not isinstance(record, FaultRecord):
            return []
        names = [f"{record.reason:#x}", str(record.reason), record.reason_text]
        if record.reason in {int(r) for r in FaultReason}:
            names.append(FaultReason(record.reason).name.lower().replace("_", "-"))
        return names

    def reserved_regions(self, platform: Platform) -> list[ReservedRegion]:
        out = []
        for r in platform.spec.extra.get("rmrr", ()):
            base, end = int(r["base"]), int(r["end"])
            out.append(ReservedRegion(base, end - base + 1, tuple(str(s) for s in r.get("devices", ()))))
        return out

    def decode_targets(self, platform: Platform) -> list[DecodeTarget]:
        out = []
        for u in _units(platform):
            if u.translation_enabled:
                rta = u.regs.get("RTADDR") & ~0xFFF
                out.append(DecodeTarget("vtd-root", rta, {"haw": u.haw}, f"{u.name} root table"))
        for d in sorted(platform.machine.domains.values(), key=lambda x: x.domid):
            tables = self.domain_tables(platform, d)
            if tables is not None:
                opts = {"levels": tables.levels, "haw": _units(platform)[0].haw}
                out.append(DecodeTarget("vtd-sl", tables.root_maddr, opts, f"d{d.domid} tables", d.domid))
        return out


def _same(cached: CtxInfo, mem: DeviceContext) -> bool:
    if mem.mode == ContextMode.PASSTHROUGH:
        return cached.t == TranslationType.PASS_THROUGH and cached.did == mem.tag
    if mem.mode != ContextMode.TRANSLATED or mem.tables is None:
        return False
    return (
        cached.did == mem.tag
        and cached.slptptr >> PAGE_SHIFT == mem.tables.root_mfn
        and cached.levels == mem.tables.levels
        and cached.t != TranslationType.PASS_THROUGH
    )


ADAPTER = VtdTools()


# -- image decoders -------------------------------------------------------------------------------------------


def _image_format(options: MappingABC[str, int]) -> VtdSecondLevelFormat:
    haw = options.get("haw", 52)
    return VtdSecondLevelFormat(haw=haw, superpage_levels=frozenset({2, 3}))


class SecondLevelDecoder:
    name = "vtd-sl"
    vendor = "vtd"
    summary = "one VT-d second-level tree (a domain's DMA tables): --levels 2-5 or --agaw 0-3, --haw"
    options: MappingABC[str, str] = {
        "levels": "table levels, 2-5 (default 4: Xen's 48-bit domains)",
        "agaw": "the context entry's AW field instead of --levels: 0-3 for 2-5 levels",
        "haw": "host address width the entries were written for (default 52)",
    }

    def decode(self, reader: FrameReader, root: int, options: MappingABC[str, int], *, max_tables: int) -> DecodeResult:
        opts = check_options(self, options)
        if "levels" in opts and "agaw" in opts:
            raise InvalidArgument("give --levels or --agaw, not both")
        levels = agaw_to_levels(opts["agaw"]) if "agaw" in opts else opts.get("levels", 4)
        if not 2 <= levels <= 5:
            raise InvalidArgument(f"VT-d second-level tables have 2 to 5 levels, not {levels}")
        if root & 0xFFF:
            raise InvalidArgument(f"a table root is 4 KiB aligned; {root:#x} is not")
        tables = TableRoot(_image_format(opts), root >> PAGE_SHIFT, levels)
        space = DecodedSpace(f"tables at {root:#x}", ContextMode.TRANSLATED, tables)
        space.attrs = {"levels": levels, "width": 12 + 9 * levels}
        space.mappings = table_mappings(reader, tables, problems=space.problems, max_tables=max_tables)
        return DecodeResult(self.name, root, opts, [space])


class RootTableDecoder:
    name = "vtd-root"
    vendor = "vtd"
    summary = "a VT-d root table: every present context entry and the second-level tables it uses (--haw)"
    options: MappingABC[str, str] = {"haw": "host address width the entries were written for (default 52)"}

    def decode(self, reader: FrameReader, root: int, options: MappingABC[str, int], *, max_tables: int) -> DecodeResult:
        opts = check_options(self, options)
        if root & 0xFFF:
            raise InvalidArgument(f"a root table is 4 KiB aligned; {root:#x} is not")
        fmt = _image_format(opts)
        haw = fmt.haw
        result = DecodeResult(self.name, root, opts)
        roots = reader.peek_words(root >> PAGE_SHIFT)  # no root table, nothing to say: let the error name it
        spaces: dict[tuple[object, ...], DecodedSpace] = {}
        for bus in range(256):
            rlo, rhi = int(roots[2 * bus]), int(roots[2 * bus + 1])
            rent = RootEntry.decode(rlo, rhi)
            if not rent.present:
                continue
            if root_reserved(rlo, rhi, haw):
                result.problems.append(f"reserved bits set in the root entry of bus {bus:#04x} at {root + 16 * bus:#x}")
            try:
                ctxs = reader.peek_words(rent.ctp >> PAGE_SHIFT)
            except BadAddress as exc:
                result.problems.append(f"bus {bus:#04x}: context table at {rent.ctp:#x}: {exc.message}")
                continue
            for devfn in range(256):
                lo, hi = int(ctxs[2 * devfn]), int(ctxs[2 * devfn + 1])
                ctx = ContextEntry.decode(lo, hi)
                if not ctx.present:
                    continue
                sid = bus << 8 | devfn
                problems = []
                if context_reserved(lo, hi, haw):
                    problems.append(
                        f"reserved bits set in the context entry of {_bdf(sid)} at {rent.ctp + 16 * devfn:#x}"
                    )
                dc = _context_from_entry("image", sid, ctx, fmt, ctx.aw <= 3, problems)
                key = (
                    dc.mode,
                    ctx.did,
                    dc.tables.root_mfn if dc.tables else None,
                    dc.tables.levels if dc.tables else 0,
                )
                space = spaces.get(key)
                if space is None:
                    label = f"did {ctx.did}" + (f", tables at {ctx.slptptr:#x}" if dc.tables else f" ({dc.mode.value})")
                    space = DecodedSpace(label, dc.mode, dc.tables, attrs={"did": ctx.did, "t": ctx.t, "aw": ctx.aw})
                    if dc.tables is not None:
                        space.attrs["width"] = agaw_to_width(ctx.aw)
                        try:
                            space.mappings = table_mappings(
                                reader, dc.tables, problems=space.problems, max_tables=max_tables
                            )
                        except BadAddress as exc:
                            space.problems.append(exc.message)
                    spaces[key] = space
                space.sources.append(_bdf(sid))
                space.problems.extend(p for p in dc.problems if p not in space.problems)
        result.spaces = list(spaces.values())
        return result


SECOND_LEVEL_DECODER = SecondLevelDecoder()
ROOT_TABLE_DECODER = RootTableDecoder()
