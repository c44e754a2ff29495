"""Bare units of every vendor with page tables written entry by entry from a drawn recipe (no driver).

A recipe is a list of ``Op``s, each writing one crafted entry at one level of the path to one device
address: a leaf, a pointer to a fresh table with some rights, an empty entry, a malformed one, or an
encoding Xen never writes (AMD level skips and NextLevel-7 pages, VT-d pointers beyond DRAM, SMMU leaves
without the access flag or beyond the output size...).  Building the same recipe twice gives two units in
the same state, so one can run the fast batch and the other the reference loop.

``state(rig)`` is everything software or a later access could observe: counters, the IOTLB and the other
caches in LRU order, every register, the event log, the interrupts raised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from iommusim.frames import PAGE_SHIFT
from iommusim.hw.amd import regs as amd_regs
from iommusim.hw.amd.structs import Dte
from iommusim.hw.amd.unit import AmdIommu
from iommusim.hw.mmio import RegisterBlock
from iommusim.hw.smmu import SmmuV2, context_irq
from iommusim.hw.smmu import regs as smmu_regs
from iommusim.hw.smmu.unit import SmmuConfig
from iommusim.hw.vtd.regs import GCMD, GSTS, Cap, Ecap, Reg
from iommusim.hw.vtd.structs import ContextEntry, RootEntry
from iommusim.hw.vtd.unit import VtdUnit
from iommusim.machine.machine import Machine
from iommusim.pagetable.amd import AmdV1Format, sized_leaf_address
from iommusim.pagetable.arm_s2 import AF, ArmS2Format, S2Attrs
from iommusim.pagetable.format import level_shift
from iommusim.perms import Perm

SID = 0x0310
MiB2 = 1 << 21

#: device addresses the recipes and the translated addresses live around (paths differing at each level)
REGIONS = (0, MiB2, 3 * MiB2, 1 << 30, (1 << 39) + MiB2, 1 << 47)
KINDS = ("run", "run", "leaf", "leaf", "leaf", "table", "empty", "bad", "special")


@dataclass(frozen=True)
class Op:
    region: int  # index into REGIONS
    page: int  # 4 KiB page inside the region
    level: int  # level of the entry written (clamped to the tree's)
    kind: str
    perms: int
    x: int  # free bits: output address, which bad bit, which special encoding


def _regs(block: RegisterBlock) -> dict[int, int]:
    return {off: r.value for off, r in block._regs.items()}


class Rig:
    """One unit, its machine and the tables of one device, with the tables it created by (level, prefix)."""

    levels: int
    unit: Any
    machine: Machine
    root_mfn: int
    irqs: list[int]

    def __init__(self) -> None:
        self.tables: dict[tuple[int, int], int] = {}
        self.pointers: dict[tuple[int, int], int] = {}
        self.irqs = []

    # -- what a vendor says about its entries ---------------------------------------------------------
    def pointer(self, mfn: int, level: int, perms: int) -> int:
        raise NotImplementedError

    def leaf(self, maddr: int, level: int, perms: int) -> int | None:
        raise NotImplementedError

    def bad(self, level: int, perms: int, x: int) -> int:
        raise NotImplementedError

    def special(self, op: Op, daddr: int, level: int) -> int:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- the tree ---------------------------------------------------------------------------------------
    def new_table(self) -> int:
        return self.machine.allocator.alloc("test:pt").value

    def load(self, mfn: int, index: int) -> int:
        return self.machine.memory.load_word(mfn, index)

    def store(self, mfn: int, index: int, raw: int) -> None:
        self.machine.memory.store_word(mfn, index, raw)

    def root_index(self, daddr: int) -> tuple[int, int]:
        return self.root_mfn, (daddr >> level_shift(self.levels)) & 511

    def slot(self, daddr: int, level: int) -> tuple[int, int]:
        """The (frame, index) of the entry at ``level`` on the path to ``daddr``, making plain tables above."""
        mfn, index = self.root_index(daddr)
        for lv in range(self.levels, level, -1):
            key = (lv - 1, daddr >> level_shift(lv))
            table = self.tables.get(key)
            if table is None or self.load(mfn, index) != self.pointers.get((mfn, index)):
                table = self.tables[key] = self.new_table()
                self.pointers[(mfn, index)] = self.pointer(table, lv, 3)
                self.store(mfn, index, self.pointers[(mfn, index)])
            mfn, index = table, (daddr >> level_shift(lv - 1)) & 511
        return mfn, index

    def apply(self, op: Op) -> None:
        daddr = REGIONS[op.region % len(REGIONS)] + (op.page << PAGE_SHIFT)
        level = 1 + (op.level - 1) % self.levels
        mfn, index = self.slot(daddr, level)
        raw: int | None
        if op.kind == "run":  # eight 4 KiB pages from this one, as a driver maps a buffer
            for k in range(8):
                mfn, index = self.slot(daddr + (k << PAGE_SHIFT), 1)
                self.store(mfn, index, self.leaf(((op.x + k) % 4096) << PAGE_SHIFT, 1, op.perms) or 0)
            return
        if op.kind == "leaf":
            size = level_shift(level)
            raw = self.leaf(((op.x % 4096) << size) & ((1 << 44) - 1), level, op.perms)
        elif op.kind == "table" and level > 1:
            table = self.tables[(level - 1, daddr >> level_shift(level))] = self.new_table()
            raw = self.pointers[(mfn, index)] = self.pointer(table, level, op.perms)
        elif op.kind == "special":
            raw = self.special(op, daddr, level)
        elif op.kind == "bad":
            raw = self.bad(level, op.perms, op.x)
        else:
            raw = 0
        self.store(mfn, index, raw if raw is not None else self.bad(level, op.perms, op.x))


# ==========================================================================================================
# VT-d
# ==========================================================================================================


class VtdRig(Rig):
    def __init__(
        self, *, aw: int, cm: bool, sllps: int, nfr: int, handler: bool, iotlb: int, pde: int, t: int = 0
    ) -> None:
        super().__init__()
        self.machine = m = Machine(ram_bytes=64 << 20, address_width=46)
        cap = Cap(fro=0x200, nfr=nfr, cm=cm, sllps=sllps, sagaw=0b01110, mgaw=57 if aw == 3 else 48)
        self.unit = u = VtdUnit(
            "vtd0",
            m.memory,
            cap=cap,
            ecap=Ecap(iro=0x100),
            haw=46,
            dram_limit=m.pages.frames << PAGE_SHIFT,
            iotlb_entries=iotlb,
            pde_cache_entries=pde,
            negative_entries=8,
        )
        if handler:
            u.fault_irq.connect(lambda: self.irqs.append(u.regs.read(Reg.FSTS, 4)))
        self.levels = aw + 2
        root = self.new_table()
        ctx_table = self.new_table()
        self.root_mfn = self.new_table()
        lo, hi = RootEntry(True, ctx_table << PAGE_SHIFT).encode()
        bus, devfn = SID >> 8, SID & 0xFF
        self.store(root, 2 * bus, lo)
        self.store(root, 2 * bus + 1, hi)
        lo, hi = ContextEntry(True, t=t, slptptr=self.root_mfn << PAGE_SHIFT, aw=aw, did=7).encode()
        self.store(ctx_table, 2 * devfn + 1, hi)
        self.store(ctx_table, 2 * devfn, lo)
        u.regs.write(Reg.RTADDR, root << PAGE_SHIFT, 8)
        for bit in (GCMD.SRTP, GCMD.TE):
            status = u.regs.read(Reg.GSTS, 4) & GSTS.PERSISTENT
            u.regs.write(Reg.GCMD, status | bit, 4)
        u.regs.write(Reg.FECTL, 0, 4)  # unmask the fault interrupt

    def pointer(self, mfn: int, level: int, perms: int) -> int:
        return (mfn << PAGE_SHIFT) | (perms & 3)

    def leaf(self, maddr: int, level: int, perms: int) -> int | None:
        return maddr | (perms & 3) | (0x80 if level > 1 else 0)

    def bad(self, level: int, perms: int, x: int) -> int:
        bits = (1 << 2, 1 << 46, 1 << 11 if level > 1 else 1 << 5, 1 << 62 if level > 1 else 1 << 50, 1 << 12)
        bit = bits[x % len(bits)]
        if bit == 1 << 12 and level == 1:
            bit = 1 << 4
        sp = 0x80 if level > 1 and x & 8 else 0
        return (0x1000 << 10) | bit | sp | (perms & 3 or 1)

    def special(self, op: Op, daddr: int, level: int) -> int:
        if level > 1 and op.x % 3 == 0:
            return self.pointer(self.machine.pages.frames + 5, level, 3)  # a table beyond DRAM
        if op.x % 3 == 1:
            return ((op.x % 8) << 39) | 0x80 | 3  # a leaf (at an SP level the unit may not support)
        return self.pointer(self.new_table(), level, op.perms) if level > 1 else 0

    def state(self) -> dict[str, Any]:
        u = self.unit
        assert isinstance(u, VtdUnit)
        return {
            "counters": dict(u.counters()),
            "iotlb": list(u.iotlb.entries()),
            "pde": u.pde_cache._c.items(),
            "negative": u.negative._c.items(),
            "context": u.context_cache.entries(),
            "regs": _regs(u.regs),
            "next_frcd": u._next_frcd,
            "irqs": (list(self.irqs), u.fault_irq.raised),
        }


# ==========================================================================================================
# AMD-Vi
# ==========================================================================================================

_AMD = AmdV1Format()


class AmdRig(Rig):
    def __init__(self, *, mode: int, dte_perms: int, handler: bool, iotlb: int, evt_head: int, exclusion: bool) -> None:
        super().__init__()
        self.machine = m = Machine(ram_bytes=64 << 20, address_width=46)
        self.unit = u = AmdIommu("amd0", m.memory, iotlb_entries=iotlb)
        self.levels = mode
        self.devtab = devtab = m.allocator.alloc("test:devtab", 16).value << PAGE_SHIFT
        self.evt = m.allocator.alloc("test:evt", 1).value << PAGE_SHIFT
        mm = u.mmio
        mm.write(amd_regs.DEV_TAB_BASE, amd_regs.dev_table_base_value(devtab, 16), 8)
        mm.write(amd_regs.EVT_LOG_BASE, amd_regs.ring_base_value(self.evt, 256), 8)
        mm.write(amd_regs.EVT_LOG_HEAD, amd_regs.ring_ptr_value(evt_head), 8)
        mm.write(amd_regs.EVT_LOG_TAIL, amd_regs.ring_ptr_value(0), 8)
        ctrl = amd_regs.CTRL_IOMMU_EN | amd_regs.CTRL_EVENT_LOG_EN | amd_regs.CTRL_EVENT_INT_EN
        mm.write(amd_regs.CONTROL, ctrl, 8)
        if exclusion:
            mm.write(amd_regs.EXCL_BASE, MiB2 | amd_regs.EXCL_ENABLE | amd_regs.EXCL_ALLOW, 8)
            mm.write(amd_regs.EXCL_LIMIT, MiB2 + 0x3000, 8)
        if handler:
            u.irq_handler = lambda: self.irqs.append(u.mmio.read(amd_regs.STATUS))
        self.root_mfn = self.new_table()
        dte = Dte(
            valid=True,
            translation_valid=True,
            mode=mode,
            root=self.root_mfn << PAGE_SHIFT,
            ir=bool(dte_perms & 1),
            iw=bool(dte_perms & 2),
            domain_id=9,
        )
        for i, q in enumerate(dte.qwords()):
            m.memory.write_u64(devtab + (SID & 0xFFFF) * 32 + 8 * i, q)

    def pointer(self, mfn: int, level: int, perms: int) -> int:
        return (_AMD.table_entry(mfn << PAGE_SHIFT, level) & ~(3 << 61)) | ((perms & 3) << 61)

    def leaf(self, maddr: int, level: int, perms: int) -> int | None:
        if level > 5:
            return None
        return maddr | _AMD.leaf_bits(Perm(perms & 3), level)

    def bad(self, level: int, perms: int, x: int) -> int:
        choice = x % 4
        base = 0x5000 | 1 | ((perms & 3) << 61)
        if choice == 0:
            return base | (1 << 53)  # reserved bits 58:52 (a leaf) / 60:52 (a pointer)
        if choice == 1:
            return base | (min(level, 6) << 9)  # a next level not below this one
        if choice == 2:
            return base | (1 << 60) | (1 << 9) if level > 1 else base | (1 << 58)  # FC in a pointer, bit 58
        return base | (7 << 9) | (0xFFF << 12)  # a NextLevel-7 size this level cannot hold

    def special(self, op: Op, daddr: int, level: int) -> int:
        """A pointer that skips levels (to a table holding a few leaves), or a NextLevel-7 page."""
        if level >= 3 and op.x % 2 == 0:
            nl = 1 + (op.x >> 1) % (level - 2)  # below level - 1
            t = self.new_table()
            for k in range(4):
                a = daddr + (k << level_shift(nl))
                self.store(t, (a >> level_shift(nl)) & 511, self.leaf((0x40 + k) << 21, nl, 3) or 0)
            return _AMD.pointer_entry(t << PAGE_SHIFT, nl)
        if level > 5:
            return 0
        lo, hi = level_shift(level), min(level_shift(level + 1), 53)
        shift = lo + 1 + (op.x >> 1) % max(1, hi - lo - 1)
        maddr = ((op.x >> 4) % 64) << shift & ((1 << 44) - 1)
        return sized_leaf_address(maddr, shift) | 1 | (7 << 9) | ((op.perms & 3) << 61)

    def state(self) -> dict[str, Any]:
        u = self.unit
        assert isinstance(u, AmdIommu)
        mem = self.machine.memory
        return {
            "counters": dict(u.counters()),
            "iotlb": list(u.iotlb.entries()),
            "dte_cache": u.dte_cache.items(),
            "regs": {off: r.value for off, r in u.mmio._regs.items()},
            "events": [mem.read_u64(self.evt + 8 * i) for i in range(512)],
            "reported": sorted(u._fault_reported),
            "irqs": list(self.irqs),
        }


# ==========================================================================================================
# SMMU
# ==========================================================================================================

_S2 = ArmS2Format()
#: (T0SZ, SL0) pairs: start at ARM level 1 (39 and 40 bits, the latter two concatenated tables), level 0
#: (48 bits) and level 2 (34 bits in 16 concatenated tables, 30 bits in one)
SMMU_GEOMETRIES = ((25, 1), (24, 1), (16, 2), (30, 0), (34, 0))


class SmmuRig(Rig):
    def __init__(
        self,
        *,
        geometry: int,
        ps: int,
        affd: bool,
        stall: bool,
        handler: bool,
        iotlb: int,
        tlb_shifts: tuple[int, ...] = (12, 21, 30),
    ) -> None:
        super().__init__()
        self.machine = m = Machine(ram_bytes=64 << 20, address_width=46)
        self.unit = u = SmmuV2(m.memory, SmmuConfig(tlb_entries=iotlb, oas_bits=48, tlb_page_shifts=tlb_shifts))
        t0sz, sl0 = SMMU_GEOMETRIES[geometry]
        start = {0: 2, 1: 1, 2: 0}[sl0]
        ipa_bits = 64 - t0sz
        root_pages = 1 << max(0, ipa_bits - (12 + 9 * (3 - start)) - 9)
        self.levels = 4 - start
        self.root_pages = root_pages
        self.root_mfn = m.allocator.alloc("test:root", root_pages, align_order=root_pages.bit_length() - 1).value
        mm = u.mmio
        half = u.window_size // 2
        mm.write(smmu_regs.gr0_smr(0), smmu_regs.Smr(id=SID & 0x7FFF).encode())
        mm.write(smmu_regs.gr0_s2cr(0), smmu_regs.S2cr(smmu_regs.S2crType.TRANSLATE, 0).encode())
        mm.write(smmu_regs.PAGE_SIZE + smmu_regs.gr1_cbar(0), smmu_regs.Cbar(smmu_regs.CbarType.S2_TRANS, 5).encode())
        mm.write(smmu_regs.PAGE_SIZE + smmu_regs.gr1_cba2r(0), smmu_regs.CBA2R_VA64)
        mm.write(half + smmu_regs.CB_TCR, smmu_regs.Tcr(t0sz, sl0, ps=ps).encode())
        mm.write(half + smmu_regs.CB_TTBR0, self.root_mfn << PAGE_SHIFT, 8)
        sctlr = smmu_regs.Sctlr.M | smmu_regs.Sctlr.CFIE | smmu_regs.Sctlr.CFRE
        sctlr |= (smmu_regs.Sctlr.AFFD if affd else 0) | (smmu_regs.Sctlr.CFCFG if stall else 0)
        mm.write(half + smmu_regs.CB_SCTLR, sctlr)
        scr0 = mm.read(smmu_regs.GR0_SCR0) & ~smmu_regs.Scr0.CLIENTPD
        mm.write(smmu_regs.GR0_SCR0, scr0 | smmu_regs.Scr0.GFIE)
        if handler:

            def hook() -> None:
                self.irqs.append(mm.read(half + smmu_regs.CB_FSR))

            u.connect_irq(context_irq(0), hook)

    def root_index(self, daddr: int) -> tuple[int, int]:
        index = (daddr >> level_shift(self.levels)) & ((self.root_pages << 9) - 1)
        return self.root_mfn + (index >> 9), index & 511

    def pointer(self, mfn: int, level: int, perms: int) -> int:
        return _S2.table_entry(mfn << PAGE_SHIFT, level)

    def leaf(self, maddr: int, level: int, perms: int) -> int | None:
        if level > 3:
            return None
        return maddr | _S2.leaf_bits(Perm(perms & 3), level)

    def bad(self, level: int, perms: int, x: int) -> int:
        good = self.leaf(0x4000_0000, min(level, 3), perms) or 0
        choice = x % 4
        if choice == 0:
            return good | (1 << 11)  # RES0
        if choice == 1:
            return good | (1 << 49)  # output address bits 51:48
        if choice == 2:
            return (good & ~2) if level == 1 else good | (1 << 60) | 2  # reserved encoding / table RES0
        return good | (1 << 12) if level > 1 else 0x1  # a misaligned block, or a lone valid bit

    def special(self, op: Op, daddr: int, level: int) -> int:
        lv = min(level, 3)
        if op.x % 2 == 0:
            return (self.leaf((op.x % 16) << level_shift(lv), lv, op.perms) or 0) & ~AF  # access flag clear
        big = 1 << 40 | ((op.x % 8) << level_shift(lv))  # beyond a 40-bit output size (PS = 2)
        if level > 1 and op.x % 4 == 1:
            return _S2.table_entry(big & ~((1 << level_shift(1)) - 1), level)
        return big | _S2.leaf_bits(Perm(op.perms & 3), lv, S2Attrs())

    def state(self) -> dict[str, Any]:
        u = self.unit
        assert isinstance(u, SmmuV2)
        return {
            "counters": dict(u.counters()),
            "tlb": list(u.tlb.entries()),
            "gr0": _regs(u.gr0),
            "gr1": _regs(u.gr1),
            "banks": [(_regs(b.regs), b.stalled) for b in u.banks],
            "irqs": list(self.irqs),
        }
