"""Helpers shared by the AMD tests: small machines, a minimal hand-driven IOMMU set-up, DMA probes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from iommusim.errors import DmaFault
from iommusim.frames import PAGE_SHIFT, Daddr, Mfn
from iommusim.hw.amd import regs
from iommusim.hw.amd.structs import CMD_SIZE, DTE_SIZE, EVENT_SIZE, Command, Dte, Event
from iommusim.hw.amd.unit import AmdIommu
from iommusim.iommu.config import IommuConfig
from iommusim.machine import Machine, PciDevice, Sbdf
from iommusim.platform import HardwareSpec, Platform, build_platform

NIC = "0000:03:00.0"
DISK = "0000:04:00.0"


def devices(*, ats: bool = False, phantom: int = 0) -> list[PciDevice]:
    return [
        PciDevice(Sbdf.parse(NIC), ats=ats),
        PciDevice(Sbdf.parse(DISK), phantom_stride=phantom),
    ]


def amd_platform(
    *,
    ram: int = 1 << 30,
    quirks: tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
    devs: list[PciDevice] | None = None,
    units: int = 1,
    superpages: tuple[int, ...] = (21, 30),
    iotlb_entries: int = 1024,
    **cfg: Any,
) -> Platform:
    spec = HardwareSpec(
        "amd", ram_bytes=ram, units=units, superpages=superpages, iotlb_entries=iotlb_entries, extra=extra or {}
    )
    config = IommuConfig(quirks=frozenset(quirks), **cfg)
    return build_platform(spec, config=config, devices=devs if devs is not None else devices())


def can_read(p: Platform, dev: PciDevice, daddr: int, length: int = 8) -> bytes | None:
    try:
        return p.machine.dma.read(dev, Daddr(daddr), length)
    except DmaFault:
        return None


def can_write(p: Platform, dev: PciDevice, daddr: int, data: bytes = b"\xa5" * 8) -> bool:
    try:
        p.machine.dma.write(dev, Daddr(daddr), data)
        return True
    except DmaFault:
        return False


def frame_bytes(p: Platform, mfn: int, offset: int = 0, length: int = 8) -> bytes:
    return p.machine.memory.read_bytes((mfn << PAGE_SHIFT) + offset, length)


def stamp(p: Platform, mfn: int, tag: bytes) -> None:
    """Write a recognisable pattern at the start of a machine frame."""
    p.machine.memory.write_bytes(mfn << PAGE_SHIFT, tag)


def unit_of(p: Platform, index: int = 0) -> AmdIommu:
    u = p.units[index]
    assert isinstance(u, AmdIommu)
    return u


@contextmanager
def allocations(machine: Machine) -> Iterator[dict[str, int]]:
    """Count hypervisor pages allocated and freed inside the block, by owner."""
    before = dict(machine.allocator.in_use)
    out: dict[str, int] = {}
    yield out
    after = dict(machine.allocator.in_use)
    for k in set(before) | set(after):
        delta = after.get(k, 0) - before.get(k, 0)
        if delta:
            out[k] = delta


# -- a bare unit driven by hand (no driver): the tests write every structure themselves ---------------------


@dataclass
class BareUnit:
    """An AMD IOMMU with its device table, command buffer and event log set up by the test."""

    machine: Machine
    unit: AmdIommu
    devtab: int
    cmd: int
    evt: int
    cmd_entries: int
    evt_entries: int
    tail: int = 0
    head: int = 0
    irqs: list[int] = field(default_factory=list)

    @property
    def mem(self) -> Any:
        return self.machine.memory

    def table(self, owner: str = "test:pt") -> int:
        """A fresh zeroed table page; returns its frame."""
        return self.machine.allocator.alloc(owner).value

    def put(self, table: int, index: int, raw: int) -> None:
        self.mem.store_word(table, index, raw)

    def set_dte(self, devid: int, dte: Dte) -> None:
        for i, q in enumerate(dte.qwords()):
            self.mem.write_u64(self.devtab + devid * DTE_SIZE + 8 * i, q)

    def send(self, *cmds: Command) -> None:
        for cmd in cmds:
            w = cmd.words()
            slot = self.cmd + self.tail * CMD_SIZE
            self.mem.write_u64(slot, w[0] | (w[1] << 32))
            self.mem.write_u64(slot + 8, w[2] | (w[3] << 32))
            self.tail = (self.tail + 1) % self.cmd_entries
        self.unit.mmio.write(regs.CMD_BUF_TAIL, regs.ring_ptr_value(self.tail), 8)

    def send_raw(self, words: tuple[int, int, int, int]) -> int:
        """Queue four words as a command; returns the slot's machine address."""
        slot = self.cmd + self.tail * CMD_SIZE
        self.mem.write_u64(slot, words[0] | (words[1] << 32))
        self.mem.write_u64(slot + 8, words[2] | (words[3] << 32))
        self.tail = (self.tail + 1) % self.cmd_entries
        self.unit.mmio.write(regs.CMD_BUF_TAIL, regs.ring_ptr_value(self.tail), 8)
        return slot

    def event_words(self, index: int) -> tuple[int, int, int, int]:
        slot = self.evt + index * EVENT_SIZE
        q0, q1 = self.mem.read_u64(slot), self.mem.read_u64(slot + 8)
        return q0 & 0xFFFF_FFFF, q0 >> 32, q1 & 0xFFFF_FFFF, q1 >> 32

    def events(self) -> list[Event]:
        """Entries between the software head and the hardware tail (consumed: the head moves on)."""
        tail = regs.ring_ptr(self.unit.mmio.read(regs.EVT_LOG_TAIL))
        out = []
        while self.head != tail:
            ev = Event.from_words(self.event_words(self.head))
            assert ev is not None
            out.append(ev)
            self.head = (self.head + 1) % self.evt_entries
        self.unit.mmio.write(regs.EVT_LOG_HEAD, regs.ring_ptr_value(self.head), 8)
        return out

    def status(self) -> int:
        return self.unit.mmio.read(regs.STATUS)


def bare_unit(
    *,
    cmd_entries: int = 256,
    evt_entries: int = 256,
    ram: int = 256 << 20,
    event_irq: bool = True,
    **unit_kw: Any,
) -> BareUnit:
    m = Machine(ram_bytes=ram, address_width=46)
    u = AmdIommu("amd0", m.memory, **unit_kw)
    devtab = m.allocator.alloc("test:devtab", 512).value << PAGE_SHIFT  # 64 Ki entries
    cmd = m.allocator.alloc("test:cmd", cmd_entries * CMD_SIZE >> PAGE_SHIFT).value << PAGE_SHIFT
    evt = m.allocator.alloc("test:evt", evt_entries * EVENT_SIZE >> PAGE_SHIFT).value << PAGE_SHIFT
    b = BareUnit(m, u, devtab, cmd, evt, cmd_entries, evt_entries)
    u.irq_handler = lambda: b.irqs.append(b.status())
    mm = u.mmio
    mm.write(regs.DEV_TAB_BASE, regs.dev_table_base_value(devtab, 512), 8)
    mm.write(regs.CMD_BUF_BASE, regs.ring_base_value(cmd, cmd_entries), 8)
    mm.write(regs.EVT_LOG_BASE, regs.ring_base_value(evt, evt_entries), 8)
    ctrl = regs.CTRL_IOMMU_EN | regs.CTRL_CMD_BUF_EN | regs.CTRL_EVENT_LOG_EN
    if event_irq:
        ctrl |= regs.CTRL_EVENT_INT_EN
    mm.write(regs.CONTROL, ctrl, 8)
    return b


def mfn_of(maddr: int) -> Mfn:
    return Mfn(maddr >> PAGE_SHIFT)


@dataclass
class Scenario:
    p: Platform
    hwdom: Any
    guest: Any
    nic: PciDevice
    disk: PciDevice

    @property
    def driver(self) -> Any:
        return self.p.ops

    @property
    def unit(self) -> AmdIommu:
        return unit_of(self.p)

    def rid(self, dev: PciDevice | None = None) -> int:
        dev = dev or self.nic
        return int(self.driver.requestor_id(dev.sbdf.bdf))

    def dte(self, dev: PciDevice | None = None) -> Dte:
        return self.driver.devtab.read(self.rid(dev))  # type: ignore[no-any-return]

    def guest_mfn(self, gfn: int) -> int:
        from iommusim.frames import Gfn

        entry = self.guest.p2m.lookup(Gfn(gfn))
        assert entry is not None
        return int(entry.mfn.value)

    def translate(self, daddr: int, access: Any = None, dev: PciDevice | None = None) -> Any:
        """The unit's answer for a device access, as the DMA engine would get it (a Translation)."""
        from iommusim.perms import Perm

        return self.unit.translate(self.rid(dev), daddr, access or Perm.R)


def scenario(*, guest_bytes: int = 16 << 20, assign: bool = True, hwdom_bytes: int = 64 << 20, **kw: Any) -> Scenario:
    """A hardware domain, an HVM guest d1 and (by default) the NIC assigned to it."""
    p = amd_platform(**kw)
    d0 = p.create_hardware_domain(hwdom_bytes)
    g = p.create_guest(1, guest_bytes)
    nic, disk = p.device(NIC), p.device(DISK)
    if assign:
        p.iommu.assign_device(g, nic)
    return Scenario(p, d0, g, nic, disk)
