"""A bare VT-d unit on a machine, programmed by hand: tables written word by word, registers poked.

Used by the hardware tests so that they do not depend on the driver: every structure is built here from
the raw encodings the specification gives.
"""

from __future__ import annotations

from iommusim.frames import PAGE_SHIFT
from iommusim.hw.vtd.regs import GCMD, GSTS, Cap, Ecap, Reg
from iommusim.hw.vtd.structs import ContextEntry, RootEntry
from iommusim.hw.vtd.unit import VtdUnit
from iommusim.machine.machine import Machine
from iommusim.perms import Perm

FRO = 0x200
IRO = 0x100


class Rig:
    def __init__(self, *, cap: Cap | None = None, ecap: Ecap | None = None, haw: int = 46, iotlb: int = 64) -> None:
        self.m = Machine(ram_bytes=256 << 20, address_width=haw)
        self.mem = self.m.memory
        self.unit = VtdUnit(
            "vtd0",
            self.mem,
            cap=cap or Cap(fro=FRO, nfr=4),
            ecap=ecap or Ecap(iro=IRO),
            haw=haw,
            dram_limit=self.m.pages.frames << PAGE_SHIFT,
            iotlb_entries=iotlb,
        )
        self.regs = self.unit.regs
        self.root = self.page()
        self.ctx_tables: dict[int, int] = {}

    # -- memory ----------------------------------------------------------------------------------
    def page(self) -> int:
        return self.m.allocator.alloc("rig").value << PAGE_SHIFT

    def w(self, addr: int, value: int) -> None:
        self.mem.write_u64(addr, value)

    # -- registers -------------------------------------------------------------------------------
    def gcmd(self, bit: int, on: bool = True) -> None:
        status = self.regs.read(Reg.GSTS, 4) & GSTS.PERSISTENT
        self.regs.write(Reg.GCMD, status | bit if on else status & ~bit, 4)

    def start(self, *, root: int | None = None) -> None:
        """Latch the root table and enable translation."""
        self.regs.write(Reg.RTADDR, self.root if root is None else root, 8)
        self.gcmd(GCMD.SRTP)
        self.gcmd(GCMD.TE)

    # -- tables --------------------------------------------------------------------------------------
    def context(self, sid: int, *, did: int, slpt: int = 0, t: int = 0, aw: int = 2, fpd: bool = False) -> int:
        bus, devfn = sid >> 8, sid & 0xFF
        table = self.ctx_tables.get(bus)
        if table is None:
            table = self.ctx_tables[bus] = self.page()
            lo, hi = RootEntry(True, table).encode()
            self.w(self.root + 16 * bus, lo)
            self.w(self.root + 16 * bus + 8, hi)
        lo, hi = ContextEntry(True, fpd=fpd, t=t, slptptr=slpt, aw=aw, did=did).encode()
        slot = table + 16 * devfn
        self.w(slot + 8, hi)
        self.w(slot, lo)
        return slot

    def map(
        self, pgd: int, daddr: int, maddr: int, perms: Perm, *, levels: int = 4, leaf_level: int = 1, extra: int = 0
    ) -> int:
        """Write tables (R=W=1) down to ``leaf_level`` and the leaf; returns the leaf's machine address."""
        table = pgd
        for level in range(levels, leaf_level, -1):
            slot = table + 8 * ((daddr >> (12 + 9 * (level - 1))) & 511)
            raw = self.mem.read_u64(slot)
            if not raw & 3:
                nxt = self.page()
                self.w(slot, nxt | 3)
                table = nxt
            else:
                table = raw & ~0xFFF & ((1 << 52) - 1)
        slot = table + 8 * ((daddr >> (12 + 9 * (leaf_level - 1))) & 511)
        sp = 0x80 if leaf_level > 1 else 0
        self.w(slot, maddr | int(perms) | sp | extra)
        return slot

    def slot_of(self, pgd: int, daddr: int, level: int, *, levels: int = 4) -> int:
        table = pgd
        for lv in range(levels, level, -1):
            raw = self.mem.read_u64(table + 8 * ((daddr >> (12 + 9 * (lv - 1))) & 511))
            table = raw & ~0xFFF & ((1 << 52) - 1)
        return table + 8 * ((daddr >> (12 + 9 * (level - 1))) & 511)

    # -- invalidation queue ------------------------------------------------------------------------------
    def enable_qi(self, qs: int = 0) -> int:
        self.queue = self.page()
        self.tail = 0
        self.qs = qs
        self.regs.write(Reg.IQA, self.queue | qs, 8)
        self.regs.write(Reg.IQT, 0, 8)
        self.gcmd(GCMD.QIE)
        return self.queue

    def submit(self, *descs: tuple[int, int]) -> None:
        for lo, hi in descs:
            slot = self.queue + 16 * self.tail
            self.w(slot, lo)
            self.w(slot + 8, hi)
            self.tail = (self.tail + 1) % (256 << self.qs)
        self.regs.write(Reg.IQT, self.tail << 4, 8)

    def frcd(self, i: int) -> tuple[int, int]:
        return self.regs.read(FRO + 16 * i, 8), self.regs.read(FRO + 16 * i + 8, 8)
