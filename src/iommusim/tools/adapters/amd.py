"""The tools' view of AMD-Vi: contexts from the device table, the IOTLB and ATS caches, ``amd-v1``/``amd-dt`` images.

A context is read the way an AMD IOMMU resolves a request: Control.IommuEn (off: nothing is translated),
the DevTabBase register (base and size; a device id beyond the table faults), then the device's 256-bit
device-table entry, from the unit's DTE cache if it holds one (that is what the next request uses) or else
from memory.  The entry's fields are applied in the unit's order:

* V=0: the entry says nothing and DMA passes untranslated (the model's hardware, as the specification says);
* reserved bits set, or TV=1 with a paging mode the unit does not implement: the unit refuses the entry
  (ILLEGAL_DEV_TABLE_ENTRY): blocked, and a problem;
* an enabled exclusion range that applies to the device (Allow, or the entry's EX) lets DMA into it bypass
  the tables: a problem, since the device then reaches memory its tables do not give it;
* TV=0: every request faults (blocked);
* IR=IW=0: every access is denied (blocked: later Xen blocks devices exactly so);
* paging mode 0: addresses pass untranslated, IR and IW still checked (pass-through);
* otherwise translated through the v1 tree at the entry's root with the paging mode as its level count,
  capped by IR/IW, under the entry's domain id (the IOTLB's tag).

The IOTLB is tagged by domain id; each ATS device's remote IOTLB by its device id (``by_source``).

Image formats: ``amd-v1`` is one v1 tree (``--paging-mode`` 1-6: its level count); ``amd-dt`` is a device
table (``--dt-pages``: its size in 4 KiB pages, DevTabBase bits 8:0 plus one), decoded into every valid
entry, grouped by the domain and tables they share.  The shared walker reads the v1 format's level skips
and NextLevel-7 pages through ``iommusim.pagetable.amd``.
"""

from __future__ import annotations

from collections.abc import Mapping as MappingABC
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from iommusim.drivers.amd.domain import AmdDomain
from iommusim.errors import BadAddress, InvalidArgument
from iommusim.frames import PAGE_SHIFT
from iommusim.hw.amd import regs
from iommusim.hw.amd.structs import DTE_SIZE, Dte, Event, EventCode, EventFlag, dte_reserved_bits
from iommusim.hw.amd.unit import AmdIommu
from iommusim.hw.base import DmaRemapper
from iommusim.hw.iotlb import Iotlb
from iommusim.machine.pci import Sbdf
from iommusim.pagetable.amd import MAX_LEVELS, AmdV1Format
from iommusim.pagetable.walk import FrameReader
from iommusim.perms import Perm
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

__all__ = ["ADAPTER", "DEVICE_TABLE_DECODER", "V1_DECODER", "AmdTools", "dte_context"]

#: One format object for every tree the tools name, so that a device's tree and its domain's are the same key.
FORMAT = AmdV1Format()
_DTES_PER_PAGE = 4096 // DTE_SIZE
_QWORDS = DTE_SIZE // 8

Qwords = tuple[int, int, int, int]


def _bdf(devid: int) -> str:
    return f"{devid >> 8:02x}:{devid >> 3 & 0x1F:02x}.{devid & 7}"


def _units(platform: Platform) -> list[AmdIommu]:
    return [u for u in platform.units if isinstance(u, AmdIommu)]


def _describe(dte: Dte) -> str:
    text = (
        f"domain {dte.domain_id}, V={int(dte.valid)} TV={int(dte.translation_valid)}, paging mode {dte.mode}, "
        f"IR={int(dte.ir)} IW={int(dte.iw)}"
    )
    return text + (", I=1" if dte.iotlb else "")


def dte_context(
    unit: str,
    devid: int,
    qws: Sequence[int],
    *,
    paging_levels: int = MAX_LEVELS,
    exclusion: tuple[int, int] | None = None,
) -> DeviceContext:
    """What a unit does with a device's requests given its DTE (see the module docstring for the order).

    ``exclusion`` is the unit's enabled exclusion range (first and last address) with whether its Allow
    bit is set folded in by the caller: None when it is off or applies to no device without EX.
    """
    dte = Dte.from_qwords(qws)
    detail = _describe(dte)
    who = f"device id {devid:#06x} ({_bdf(devid)})"
    if not dte.valid:
        return DeviceContext(unit, devid, ContextMode.PASSTHROUGH, None, None, "V=0: DMA passes untranslated")
    tag = dte.domain_id
    reserved = dte_reserved_bits(qws)
    if reserved:
        problem = f"reserved bits {reserved:#x} set in the DTE of {who}: the unit refuses it (ILLEGAL_DEV_TABLE_ENTRY)"
        return DeviceContext(unit, devid, ContextMode.BLOCKED, tag, None, detail, (problem,))
    if dte.translation_valid and (dte.mode == 7 or dte.mode > paging_levels):
        problem = (
            f"the DTE of {who} asks for paging mode {dte.mode}; the unit walks at most {paging_levels} levels, "
            f"so it refuses the entry (ILLEGAL_DEV_TABLE_ENTRY)"
        )
        return DeviceContext(unit, devid, ContextMode.BLOCKED, tag, None, detail, (problem,))
    problems: tuple[str, ...] = ()
    if exclusion is not None:
        lo, hi = exclusion
        problems = (f"DMA of {who} to {lo:#x}-{hi:#x} bypasses its tables: the exclusion range applies to it",)
    if not dte.translation_valid:
        what = f"{detail}: TV=0, every request faults"
        return DeviceContext(unit, devid, ContextMode.BLOCKED, tag, None, what, problems)
    perms = Perm(int(dte.ir) | (int(dte.iw) << 1))
    if perms == Perm.NONE:
        return DeviceContext(unit, devid, ContextMode.BLOCKED, tag, None, f"{detail}: every access denied", problems)
    if dte.mode == 0:
        what = f"{detail}: paging mode 0, addresses pass untranslated"
        return DeviceContext(unit, devid, ContextMode.PASSTHROUGH, tag, None, what, problems)
    tables = TableRoot(FORMAT, dte.root >> PAGE_SHIFT, dte.mode, perms=perms)
    return DeviceContext(unit, devid, ContextMode.TRANSLATED, tag, tables, detail, problems)


def _same(a: DeviceContext, b: DeviceContext) -> bool:
    """Whether two contexts translate alike (the fields a cached entry could disagree with memory on)."""
    return (a.mode, a.tag, a.tables.key if a.tables else None) == (b.mode, b.tag, b.tables.key if b.tables else None)


def _read_dte(reader: FrameReader, maddr: int) -> Qwords:
    words = reader.peek_words(maddr >> PAGE_SHIFT)
    i = (maddr & 0xFFF) >> 3
    return int(words[i]), int(words[i + 1]), int(words[i + 2]), int(words[i + 3])


def _devtab(unit: AmdIommu) -> tuple[int, int]:
    """(base address, entries) of the device table the DevTabBase register names."""
    reg = unit.mmio.reg(regs.DEV_TAB_BASE).value
    return reg & regs.BASE_ADDR_MASK, ((reg & regs.DEV_TAB_SIZE_MASK) + 1) * _DTES_PER_PAGE


def _valid_ids(reader: FrameReader, base: int, entries: int) -> list[int]:
    """Device ids whose DTE has V set (pages outside memory are skipped: the unit would fault on them)."""
    out: list[int] = []
    for page in range(-(-entries // _DTES_PER_PAGE)):
        try:
            words = reader.peek_words((base >> PAGE_SHIFT) + page)
        except BadAddress:
            continue
        valid = np.nonzero(words[::_QWORDS] & np.uint64(1))[0]
        out += [page * _DTES_PER_PAGE + int(i) for i in valid]
    return [i for i in out if i < entries]


class AmdTools:
    vendor = "amd"

    # -- contexts, from registers, the DTE cache and memory ----------------------------------------------

    def _exclusion(self, unit: AmdIommu, dte: Dte) -> tuple[int, int] | None:
        ex = unit.mmio.reg(regs.EXCL_BASE).value
        if not ex & regs.EXCL_ENABLE or not (ex & regs.EXCL_ALLOW or dte.allow_exclusion):
            return None
        return ex & regs.BASE_ADDR_MASK, unit.mmio.reg(regs.EXCL_LIMIT).value | 0xFFF

    def _from_qwords(self, unit: AmdIommu, devid: int, qws: Sequence[int]) -> DeviceContext:
        excl = self._exclusion(unit, Dte.from_qwords(qws))
        return dte_context(unit.name, devid, qws, paging_levels=unit.paging_levels, exclusion=excl)

    def context(self, platform: Platform, unit: DmaRemapper, source_id: int) -> DeviceContext:
        if not isinstance(unit, AmdIommu):
            raise InvalidArgument(f"{unit.name} is not an AMD IOMMU")
        name = unit.name
        devid = source_id & 0xFFFF
        if not unit.enabled:
            return DeviceContext(name, devid, ContextMode.UNTRANSLATED, detail="IOMMU disabled (Control.IommuEn=0)")
        cached = unit.dte_cache.peek(devid)
        base, entries = _devtab(unit)
        if devid >= entries:
            if cached is not None:
                return self._from_qwords(unit, devid, cached)
            problem = f"device id {devid:#06x} is beyond the {entries}-entry device table: every request faults"
            return DeviceContext(name, devid, ContextMode.BLOCKED, problems=(problem,))
        where = base + devid * DTE_SIZE
        try:
            mem = self._from_qwords(unit, devid, _read_dte(unit.memory, where))
        except BadAddress as exc:
            if cached is not None:
                return self._from_qwords(unit, devid, cached)
            problem = f"the DTE of device id {devid:#06x} at {where:#x} cannot be read: {exc.message}"
            return DeviceContext(name, devid, ContextMode.BLOCKED, problems=(problem,))
        if cached is None:
            return mem
        held = self._from_qwords(unit, devid, cached)
        if _same(held, mem):
            return held
        # the unit translates with the entry it cached: memory changed and no INVALIDATE_DEVTAB_ENTRY reached it
        stale = (
            f"the context cache (DTE cache) of {name} still holds device id {devid:#06x} ({_bdf(devid)}) -> "
            f"{held.detail}, but memory says {mem.detail}"
        )
        return DeviceContext(
            name, devid, held.mode, held.tag, held.tables, f"cached: {held.detail}", (*held.problems, stale)
        )

    def contexts(self, platform: Platform) -> list[DeviceContext]:
        """Per unit: the device ids routed to it, those its DTE cache holds, and valid DTEs no other unit serves."""
        units = [u for u in _units(platform) if u.enabled]
        routed: dict[str, set[int]] = {u.name: set() for u in units}
        m = platform.machine
        for dev in m.pci:
            for devfn in [dev.sbdf.devfn, *dev.phantom_devfns]:
                route = m.dma.route_of(dev, None if devfn == dev.sbdf.devfn else devfn)
                if route is not None and route.unit.name in routed:
                    routed[route.unit.name].add(route.source_id & 0xFFFF)
        out: list[DeviceContext] = []
        for u in units:
            elsewhere = set().union(*(ids for n, ids in routed.items() if n != u.name))
            base, entries = _devtab(u)
            valid = set(_valid_ids(u.memory, base, entries)) - elsewhere
            ids = routed[u.name] | set(u.dte_cache.keys()) | valid
            out += [self.context(platform, u, devid) for devid in sorted(ids)]
        return out

    # -- the driver's side, as Xen's dump key reads it --------------------------------------------------

    def domain_tables(self, platform: Platform, d: Domain) -> TableRoot | None:
        arch = getattr(d.iommu, "arch", None)
        if not isinstance(arch, AmdDomain) or arch.table.root is None:
            return None
        return TableRoot(FORMAT, arch.table.root.value, arch.paging_mode)

    def table_owner(self, domid: int) -> str:
        return f"d{domid}:amd-pt"

    def pending_frees(self, platform: Platform) -> list[tuple[int, int]]:
        """Tables a merge replaced by a superpage, freed by the flush of every page the caller owes.

        A merged table holds only leaves, so each is a subtree of one page (given as level 1).
        """
        out = []
        for d in platform.machine.domains.values():
            arch = getattr(d.iommu, "arch", None)
            if isinstance(arch, AmdDomain):
                out += [(mfn.value, 1) for mfn in arch.pending_free]
        return out

    # -- caches ----------------------------------------------------------------------------------------------

    def iotlbs(self, platform: Platform) -> dict[str, Iotlb]:
        return {u.name: u.iotlb for u in _units(platform)}

    def cached_translations(self, platform: Platform) -> list[CachedTranslation]:
        out: list[CachedTranslation] = []
        for u in _units(platform):
            out += iotlb_translations(u.name, u.iotlb)
            for devid, atc in sorted(u.atcs().items()):
                out += [
                    CachedTranslation(u.name, "device-tlb", devid, e.daddr, e.page_shift, e.out, e.perms, True)
                    for e in atc.entries()
                ]
        return out

    def cache_summaries(self, platform: Platform) -> list[CacheSummary]:
        out = []
        for u in _units(platform):
            atcs = u.atcs()
            out += [
                CacheSummary(u.name, "iotlb", len(u.iotlb), u.iotlb.capacity),
                CacheSummary(u.name, "DTE cache", len(u.dte_cache), u.dte_cache.capacity),
                CacheSummary(u.name, "device TLBs (ATS)", sum(len(a) for a in atcs.values())),
            ]
        return out

    # -- faults, firmware, images ----------------------------------------------------------------------------

    def fault_reasons(self, record: object) -> list[str]:
        if not isinstance(record, Event):
            return []
        names = [f"{record.code:#x}", str(record.code), record.name, record.name.lower().replace("_", "-")]
        if record.code == EventCode.IO_PAGE_FAULT:
            flags = record.flags
            names.append("write" if flags & EventFlag.RW else "read")
            names.append("present" if flags & EventFlag.PR else "not-present")
            if flags & EventFlag.PE:
                names.append("permission")
            if flags & EventFlag.RZ:
                names.append("reserved-bit")
            if flags & EventFlag.TR:
                names.append("translation-request")
        elif record.code in (EventCode.DEV_TAB_HARDWARE_ERROR, EventCode.PAGE_TAB_HARDWARE_ERROR):
            kind = {1: "master-abort", 2: "target-abort", 3: "data-error"}.get(record.hw_error_type)
            if kind:
                names.append(kind)
        return names

    def reserved_regions(self, platform: Platform) -> list[ReservedRegion]:
        """The IVMD unity ranges firmware describes, with every device whose requestor id each one covers."""
        extra = platform.spec.extra
        aliases = {Sbdf.parse(k).bdf: Sbdf.parse(v).bdf for k, v in dict(extra.get("aliases", {})).items()}
        rid_of: dict[int, set[str]] = {}
        for dev in platform.machine.pci:
            for devfn in [dev.sbdf.devfn, *dev.phantom_devfns]:
                bdf = dev.sbdf.bus << 8 | devfn
                rid_of.setdefault(aliases.get(bdf, bdf), set()).add(str(dev.sbdf))
        out = []
        for r in extra.get("ivmd", ()):
            rids = {aliases.get(Sbdf.parse(s).bdf, Sbdf.parse(s).bdf) for s in r.get("devices", ())}
            devices = sorted({name for rid in rids for name in rid_of.get(rid, ())})
            if devices:  # a range for no device is mapped for nobody
                out.append(ReservedRegion(int(r["first_pfn"]), int(r["pages"]), tuple(devices)))
        return out

    def decode_targets(self, platform: Platform) -> list[DecodeTarget]:
        out = []
        seen: set[tuple[int, int]] = set()
        for u in _units(platform):
            if not u.enabled:
                continue
            base, entries = _devtab(u)
            if (base, entries) in seen:  # the units of a segment share one device table
                continue
            seen.add((base, entries))
            out.append(DecodeTarget("amd-dt", base, {"dt_pages": entries // _DTES_PER_PAGE}, f"{u.name} device table"))
        for d in sorted(platform.machine.domains.values(), key=lambda x: x.domid):
            t = self.domain_tables(platform, d)
            if t is not None:
                opts = {"paging_mode": t.levels}
                out.append(DecodeTarget("amd-v1", t.root_maddr, opts, f"d{d.domid} tables", d.domid))
        return out


ADAPTER = AmdTools()


# -- image decoders -------------------------------------------------------------------------------------------


def _paging_mode(options: MappingABC[str, int]) -> int:
    if "paging_mode" not in options:
        raise InvalidArgument("amd-v1 needs --paging-mode (the DTE's paging mode: the tree's levels, 1-6)")
    mode = options["paging_mode"]
    if not 1 <= mode <= MAX_LEVELS:
        raise InvalidArgument(f"AMD v1 tables have paging modes 1 to {MAX_LEVELS}, not {mode}")
    return mode


class V1Decoder:
    name = "amd-v1"
    vendor = "amd"
    summary = "one AMD-Vi v1 I/O page-table tree (a domain's DMA tables): --paging-mode 1-6"
    options: MappingABC[str, str] = {"paging_mode": "the DTE's paging mode: levels of the tree, 1-6 (required)"}

    def decode(self, reader: FrameReader, root: int, options: MappingABC[str, int], *, max_tables: int) -> DecodeResult:
        opts = check_options(self, options)
        mode = _paging_mode(opts)
        if root & 0xFFF:
            raise InvalidArgument(f"a table root is 4 KiB aligned; {root:#x} is not")
        tables = TableRoot(FORMAT, root >> PAGE_SHIFT, mode)
        space = DecodedSpace(f"tables at {root:#x}", ContextMode.TRANSLATED, tables)
        space.attrs = {"paging_mode": mode, "width": min(64, 12 + 9 * mode)}
        space.mappings = table_mappings(reader, tables, problems=space.problems, max_tables=max_tables)
        return DecodeResult(self.name, root, opts, [space])


class DeviceTableDecoder:
    name = "amd-dt"
    vendor = "amd"
    summary = "an AMD-Vi device table: every valid entry, its domain and the v1 tables it uses (--dt-pages)"
    options: MappingABC[str, str] = {
        "dt_pages": "size of the table in 4 KiB pages, 1-512: DevTabBase bits 8:0 plus one (required)"
    }

    def decode(self, reader: FrameReader, root: int, options: MappingABC[str, int], *, max_tables: int) -> DecodeResult:
        opts = check_options(self, options)
        if "dt_pages" not in opts:
            raise InvalidArgument("amd-dt needs --dt-pages (the device table's size: DevTabBase bits 8:0 plus one)")
        pages = opts["dt_pages"]
        if not 1 <= pages <= 512:
            raise InvalidArgument(f"a device table is 1 to 512 pages, not {pages}")
        if root & 0xFFF:
            raise InvalidArgument(f"a device table is 4 KiB aligned; {root:#x} is not")
        result = DecodeResult(self.name, root, opts)
        spaces: dict[tuple[object, ...], DecodedSpace] = {}
        for page in range(pages):
            words = reader.peek_words((root >> PAGE_SHIFT) + page)  # a table cut off: let the error name it
            for i in np.nonzero(words[::_QWORDS] & np.uint64(1))[0].tolist():
                devid = page * _DTES_PER_PAGE + i
                qws = tuple(int(q) for q in words[_QWORDS * i : _QWORDS * (i + 1)])
                self._add(reader, result, spaces, devid, root + devid * DTE_SIZE, qws, max_tables)
        result.spaces = list(spaces.values())
        return result

    @staticmethod
    def _add(
        reader: FrameReader,
        result: DecodeResult,
        spaces: dict[tuple[object, ...], DecodedSpace],
        devid: int,
        where: int,
        qws: Sequence[int],
        max_tables: int,
    ) -> None:
        dte = Dte.from_qwords(qws)
        dc = dte_context("image", devid, qws)
        t = dc.tables
        key = (dc.mode, dte.domain_id, t.root_mfn if t else None, t.levels if t else 0, int(t.perms) if t else 0)
        space = spaces.get(key)
        if space is None:
            if t is not None:
                capped = f", {t.perms.short()} only" if t.perms != Perm.RW else ""
                label = f"domain {dte.domain_id}, tables at {dte.root:#x}, mode {dte.mode}{capped}"
            else:
                label = f"domain {dte.domain_id} ({dc.mode.value})"
            attrs: dict[str, object] = {
                "domain_id": dte.domain_id,
                "paging_mode": dte.mode,
                "tv": int(dte.translation_valid),
                "ir": int(dte.ir),
                "iw": int(dte.iw),
            }
            space = DecodedSpace(label, dc.mode, t, attrs=attrs)
            if t is not None:
                try:
                    space.mappings = table_mappings(reader, t, problems=space.problems, max_tables=max_tables)
                except BadAddress as exc:
                    space.problems.append(exc.message)
            spaces[key] = space
        space.sources.append(_bdf(devid))
        for p in dc.problems:
            text = f"{p} (entry at {where:#x})"
            if text not in space.problems:
                space.problems.append(text)


V1_DECODER = V1Decoder()
DEVICE_TABLE_DECODER = DeviceTableDecoder()
