"""A whole toy platform for the benchmark tests: the toy driver of tests/doubles.py plus a toy hardware unit.

``ToyUnit`` is a minimal ``DmaRemapper``: a context per source id (root frame and tag, which the toy
driver programs on add/assign as a real driver writes a context entry), an LRU IOTLB, and walks of the
toy format from machine memory.  ``BenchToyDriver`` is the toy driver whose flushes reach that IOTLB.
``build_toy_platform`` has the shape of a vendor builder, so the benchmark suite runs end to end on it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from doubles import ToyDriver, ToyFormat
from iommusim.errors import AlreadyExists, DmaFault
from iommusim.frames import Dfn
from iommusim.hw.base import Translation
from iommusim.hw.iotlb import Iotlb, IotlbEntry
from iommusim.iommu import Iommu
from iommusim.iommu.config import IommuConfig
from iommusim.machine import Domain, Machine, PciDevice
from iommusim.machine.memory import MachineMemory
from iommusim.pagetable.walk import walk
from iommusim.perms import FlushFlags, Perm
from iommusim.platform import HardwareSpec, Platform

REASON_NO_CONTEXT = 1
REASON_NOT_PRESENT = 2
REASON_PERMISSION = 3


@dataclass(frozen=True)
class ToyFaultRecord:
    source_id: int
    daddr: int
    reason: int


class ToyUnit:
    """Walks toy-format tables from memory for each source id, caching translations in an IOTLB."""

    def __init__(self, memory: MachineMemory, *, iotlb_entries: int = 1024, page_shifts: tuple[int, ...] = (12,)):
        self.name = "toy0"
        self.memory = memory
        self.fmt = ToyFormat()
        self._counters: Counter[str] = Counter()
        self.iotlb = Iotlb(iotlb_entries, page_shifts=(12, 21, 30), counters=self._counters)
        self.contexts: dict[int, tuple[int, int]] = {}  # source id -> (root frame, tag)
        self.faults: list[ToyFaultRecord] = []

    def _fault(self, source_id: int, daddr: int, reason: int) -> DmaFault:
        rec = ToyFaultRecord(source_id, daddr, reason)
        self.faults.append(rec)
        self._counters["faults"] += 1
        return DmaFault(f"toy fault {reason} at {daddr:#x} from {source_id:#x}", record=rec)

    def translate(self, source_id: int, daddr: int, access: Perm) -> Translation:
        ctx = self.contexts.get(source_id)
        if ctx is None:
            raise self._fault(source_id, daddr, REASON_NO_CONTEXT)
        root, tag = ctx
        hit = self.iotlb.lookup(tag, daddr)
        if hit is not None:
            if not hit.perms & access:
                raise self._fault(source_id, daddr, REASON_PERMISSION)
            return Translation(hit.translate(daddr), hit.page_shift, hit.perms, True)
        self._counters["walks"] += 1
        r = walk(self.memory, self.fmt, root, 4, daddr)
        if not r.ok:
            raise self._fault(source_id, daddr, REASON_NOT_PRESENT)
        if not r.perms & access:
            raise self._fault(source_id, daddr, REASON_PERMISSION)
        shift = r.entry.page_shift
        base = r.maddr & ~((1 << shift) - 1)
        self.iotlb.insert(IotlbEntry(tag, daddr >> shift, shift, base, r.perms))
        return Translation(r.maddr, shift, r.perms, False)

    def counters(self) -> Mapping[str, int]:
        return dict(self._counters)


@dataclass
class BenchToyDriver(ToyDriver):
    """The toy driver with a unit behind it: contexts programmed on add/assign, flushes reach the IOTLB."""

    unit: ToyUnit | None = None
    sids: dict[int, int] = field(default_factory=dict)  # devfn -> source id

    def _program(self, d: Domain | None, dev: PciDevice) -> None:
        assert self.unit is not None
        sid = dev.sbdf.bdf
        if d is None:
            self.unit.contexts.pop(sid, None)
            return
        root = self.table(d).ensure_root()
        self.unit.contexts[sid] = (root.value, d.domid)
        self.unit.iotlb.invalidate_tag(d.domid)

    def add_device(self, devfn: int, dev: PciDevice) -> None:
        super().add_device(devfn, dev)
        if devfn == dev.sbdf.devfn:
            self._program(dev.owner, dev)

    def assign_device(self, d: Domain, devfn: int, dev: PciDevice, flag: int) -> None:
        assert self.unit is not None
        root = self.table(d).root
        if root is not None and self.unit.contexts.get(dev.sbdf.bdf) == (root.value, d.domid):
            raise AlreadyExists(f"{dev.sbdf} is already attached to {d}")  # as the SMMU driver says
        super().assign_device(d, devfn, dev, flag)
        if devfn == dev.sbdf.devfn:
            self._program(d, dev)

    def reassign_device(self, source: Domain, target: Domain | None, devfn: int, dev: PciDevice) -> None:
        super().reassign_device(source, target, devfn, dev)
        if devfn == dev.sbdf.devfn:
            self._program(target, dev)

    def _implicit_flush(self, d: Domain, dfn: Dfn, flags: FlushFlags) -> None:
        super()._implicit_flush(d, dfn, flags)
        assert self.iommu is not None and self.unit is not None
        if flags and not self.iommu.dont_flush_iotlb:
            self.unit.iotlb.invalidate_range(d.domid, dfn.value << 12, 1 << 12)

    def iotlb_flush(self, d: Domain, dfn: Dfn, count: int, flags: FlushFlags) -> None:
        super().iotlb_flush(d, dfn, count, flags)
        assert self.unit is not None
        self.unit.iotlb.invalidate_range(d.domid, dfn.value << 12, count << 12)

    def iotlb_flush_all(self, d: Domain) -> None:
        super().iotlb_flush_all(d)
        assert self.unit is not None
        self.unit.iotlb.invalidate_tag(d.domid)


def build_toy_platform(
    spec: HardwareSpec,
    config: IommuConfig,
    devices: Sequence[PciDevice],
    *,
    direct_mapped: bool = False,
    add_device: bool = True,
) -> Platform:
    """A vendor builder's shape: machine, devices, unit, routes, driver, generic layer set up.

    ``direct_mapped`` gives the ARM shape (a direct-mapped hardware domain); without ``add_device`` the
    hardware domain's devices are not attached until assigned, as on ARM, where there is no such op.
    """
    machine = Machine(ram_bytes=spec.ram_bytes, address_width=spec.address_width)
    unit = ToyUnit(machine.memory, iotlb_entries=spec.iotlb_entries)
    driver = BenchToyDriver(unit=unit)
    if not add_device:
        driver.provided = driver.provided - {"add_device"}
    for dev in devices:
        machine.add_pci_device(dev)
        machine.dma.route(dev, unit, dev.sbdf.bdf)
    iommu = Iommu(machine, driver, config)
    iommu.setup()
    p = Platform("toy", machine, iommu, driver, [unit], spec)
    if direct_mapped:
        from iommusim.machine import DomainKind

        p.hwdom_kind = DomainKind.HVM
        p.hwdom_direct_mapped = True
    return p


def build_direct_mapped_toy(spec: HardwareSpec, config: IommuConfig, devices: Sequence[PciDevice]) -> Platform:
    """The ARM shape: a direct-mapped hardware domain, devices attached only when assigned."""
    return build_toy_platform(spec, config, devices, direct_mapped=True, add_device=False)


def build_direct_mapped_toy_attached(spec: HardwareSpec, config: IommuConfig, devices: Sequence[PciDevice]) -> Platform:
    """The ARM shape with a driver that attaches the hardware domain's devices when they are added."""
    return build_toy_platform(spec, config, devices, direct_mapped=True)
