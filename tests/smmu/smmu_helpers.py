"""Shared set-up for the SMMU tests: an ARM platform, its SMMU and driver, and a tap on fault interrupts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from iommusim.drivers.smmu import SmmuDriver
from iommusim.drivers.smmu.platform import SmmuPlatform
from iommusim.frames import Daddr, Gfn
from iommusim.hw.smmu import GLOBAL_IRQ, SmmuV2, context_irq, regs
from iommusim.iommu import IommuConfig
from iommusim.machine import Domain, PciDevice, Sbdf
from iommusim.platform import HardwareSpec, build_platform

DEV_A = "0000:03:00.0"  # requester id 0x300
DEV_B = "0000:04:00.0"  # requester id 0x400


def make_platform(
    *devices: PciDevice | str,
    ram: int = 512 << 20,
    quirks: tuple[str, ...] = (),
    iotlb_entries: int = 64,
    superpages: tuple[int, ...] = (21, 30),
    **extra: Any,
) -> SmmuPlatform:
    devs = [d if isinstance(d, PciDevice) else PciDevice(Sbdf.parse(d)) for d in (devices or (DEV_A, DEV_B))]
    spec = HardwareSpec("smmu", ram_bytes=ram, iotlb_entries=iotlb_entries, superpages=superpages, extra=dict(extra))
    p = build_platform(spec, config=IommuConfig(quirks=frozenset(quirks)), devices=devs)
    assert isinstance(p, SmmuPlatform)
    return p


def unit_of(p: SmmuPlatform, n: int = 0) -> SmmuV2:
    u = p.units[n]
    assert isinstance(u, SmmuV2)
    return u


def driver_of(p: SmmuPlatform) -> SmmuDriver:
    assert isinstance(p.ops, SmmuDriver)
    return p.ops


def page_addr(gfn: int) -> Daddr:
    return Daddr(gfn << 12)


def mfn_of(d: Domain, gfn: int) -> int:
    assert d.p2m is not None
    e = d.p2m.lookup(Gfn(gfn))
    assert e is not None
    return e.mfn.value


def guest_with(p: SmmuPlatform, dev: str = DEV_A, *, domid: int = 1, memory: int = 16 << 20) -> Domain:
    """A guest with ``dev`` assigned (the hardware domain is created first if needed)."""
    if p.machine.hardware_domain is None:
        p.create_hardware_domain(64 << 20)
    g = p.create_guest(domid, memory)
    p.iommu.assign_device(g, p.device(dev))
    return g


@dataclass
class Snapshot:
    """Fault registers as the interrupt handler finds them (before it clears them)."""

    fsr: int = 0
    far: int = 0
    fsynr0: int = 0
    cbfrsynra: int = 0
    gfsr: int = 0
    gfar: int = 0
    gfsynr0: int = 0
    gfsynr1: int = 0


@dataclass
class IrqTap:
    unit: SmmuV2
    seen: list[Snapshot] = field(default_factory=list)

    def context(self, bank: int) -> Snapshot:
        mmio = self.unit.mmio
        cb = mmio.size // 2 + bank * regs.CB_SIZE
        return Snapshot(
            fsr=mmio.read(cb + regs.CB_FSR),
            far=mmio.read(cb + regs.CB_FAR, 8),
            fsynr0=mmio.read(cb + regs.CB_FSYNR0),
            cbfrsynra=mmio.read(regs.PAGE_SIZE + regs.gr1_cbfrsynra(bank)),
        )

    def global_(self) -> Snapshot:
        mmio = self.unit.mmio
        return Snapshot(
            gfsr=mmio.read(regs.GR0_SGFSR),
            gfar=mmio.read(regs.GR0_SGFAR, 8),
            gfsynr0=mmio.read(regs.GR0_SGFSYNR0),
            gfsynr1=mmio.read(regs.GR0_SGFSYNR1),
        )


@contextmanager
def tap_irqs(unit: SmmuV2, banks: range = range(8)) -> Iterator[IrqTap]:
    """Snapshot the fault registers whenever a fault interrupt fires, then run the driver's handler."""
    tap = IrqTap(unit)
    saved: dict[int, Any] = {}

    def wrap(line: int, snap: Any) -> None:
        original = unit.irq_handler(line)
        saved[line] = original

        def handler() -> None:
            tap.seen.append(snap())
            if original is not None:
                original()

        unit.connect_irq(line, handler)

    wrap(GLOBAL_IRQ, tap.global_)
    for b in banks:
        wrap(context_irq(b), lambda b=b: tap.context(b))
    try:
        yield tap
    finally:
        for line, original in saved.items():
            unit.connect_irq(line, original)
