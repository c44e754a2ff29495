"""Test doubles: a toy page-table format and a driver built on the shared radix engine.

The double is a real ``IommuOps`` (it allocates its tables from the machine's allocator, so failure
injection reaches it) but has no hardware behind it: it records the flushes it is asked for, which is what
the generic-layer tests observe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from iommusim.errors import AddressNotAvailable, InvalidArgument, IommuError, NoSuchEntry
from iommusim.frames import PAGE_SHIFT, Dfn, Mfn
from iommusim.iommu import Iommu, move_device
from iommusim.iommu.ops import OPTIONAL_OPS, ReservedMemoryCallback
from iommusim.machine import Domain, PciDevice
from iommusim.pagetable.format import Decoded, EntryKind, PageTableFormat, U64Array, level_shift
from iommusim.pagetable.radix import RadixTable
from iommusim.pagetable.walk import Mapping, mappings
from iommusim.perms import FlushFlags, Perm

P, R, W, PS = 1, 2, 4, 0x80
RESERVED = ((1 << 63) - 1) & ~((1 << 52) - 1)


class ToyFormat(PageTableFormat):
    """Present bit 0, read 1, write 2, leaf-at-upper-level 7, address 51:12, bits 62:52 reserved."""

    name = "toy"
    present_mask = P
    leaf_levels = frozenset({1, 2, 3})

    def table_entry(self, table_maddr: int, level: int) -> int:
        return table_maddr | P | R | W

    def leaf_bits(self, perms: Perm, level: int, attrs: object | None = None) -> int:
        return P | (R if perms & Perm.R else 0) | (W if perms & Perm.W else 0) | (PS if level > 1 else 0)

    def decode(self, raw: int, level: int) -> Decoded:
        if not raw & P:
            return Decoded(EntryKind.EMPTY, raw, level)
        if raw & RESERVED or (level == 1 and raw & PS):
            return Decoded(EntryKind.MALFORMED, raw, level, problem="reserved bits set")
        perms = Perm((Perm.R if raw & R else 0) | (Perm.W if raw & W else 0))
        addr = raw & self.addr_mask
        if level > 1 and not raw & PS:
            return Decoded(EntryKind.TABLE, raw, level, addr, perms, next_level=level - 1)
        return Decoded(EntryKind.LEAF, raw, level, addr, perms, page_shift=level_shift(level))

    def is_table(self, raw: int, level: int) -> bool:
        return level > 1 and not raw & PS and not raw & RESERVED

    def table_array(self, words: U64Array, level: int) -> npt.NDArray[np.bool_]:
        if level == 1:
            return np.zeros(words.shape, dtype=bool)
        out: npt.NDArray[np.bool_] = ((words & np.uint64(P)) != 0) & ((words & np.uint64(PS)) == 0)
        return out

    def perms_array(self, words: U64Array, level: int) -> npt.NDArray[np.uint8]:
        return ((words >> np.uint64(1)) & np.uint64(3)).astype(np.uint8)

    def malformed_array(self, words: U64Array, level: int) -> npt.NDArray[np.bool_]:
        bad = (words & np.uint64(RESERVED)) != 0
        if level == 1:
            bad |= (words & np.uint64(PS)) != 0
        out: npt.NDArray[np.bool_] = bad & ((words & np.uint64(P)) != 0)
        return out


@dataclass
class FlushRecord:
    domain: int
    dfn: int | None  # None: everything
    count: int
    flags: FlushFlags


@dataclass
class ToyDriver:
    """A vendor driver double on the radix engine, 4 levels (48-bit DFNs), with every optional op."""

    name: str = "toy"
    provided: frozenset[str] = OPTIONAL_OPS
    page_sizes: int = 1 << 12
    levels: int = 4
    shared: bool = False
    fail_with: dict[str, IommuError] = field(default_factory=dict)  # op name -> error to raise
    flushes: list[FlushRecord] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    iommu: Iommu | None = None
    fmt: ToyFormat = field(default_factory=ToyFormat)

    def _maybe_fail(self, op: str) -> None:
        self.calls.append(op)
        if op in self.fail_with:
            raise self.fail_with[op]

    def table(self, d: Domain) -> RadixTable:
        assert d.iommu is not None
        if d.iommu.arch is None:
            assert self.iommu is not None
            m = self.iommu.machine
            d.iommu.arch = RadixTable(m.memory, m.allocator, self.fmt, owner=f"d{d.domid}:iommu-pt", levels=self.levels)
        table: RadixTable = d.iommu.arch
        return table

    # -- IommuOps -----------------------------------------------------------------------------
    def hardware_setup(self, iommu: Iommu) -> None:
        self._maybe_fail("hardware_setup")
        self.iommu = iommu

    def uses_shared_tables(self, d: Domain) -> bool:
        return self.shared

    def init(self, d: Domain) -> None:
        self._maybe_fail("init")

    def hwdom_init(self, d: Domain) -> None:
        self._maybe_fail("hwdom_init")
        assert self.iommu is not None
        self.iommu.arch_hwdom_init(d)

    def add_device(self, devfn: int, dev: PciDevice) -> None:
        self._maybe_fail("add_device")

    def enable_device(self, dev: PciDevice) -> None:
        self._maybe_fail("enable_device")

    def remove_device(self, devfn: int, dev: PciDevice) -> None:
        self._maybe_fail("remove_device")

    def assign_device(self, d: Domain, devfn: int, dev: PciDevice, flag: int) -> None:
        self._maybe_fail("assign_device")
        if devfn == dev.sbdf.devfn:
            move_device(dev, d)

    def reassign_device(self, source: Domain, target: Domain | None, devfn: int, dev: PciDevice) -> None:
        self._maybe_fail("reassign_device")
        if devfn == dev.sbdf.devfn:
            move_device(dev, target)

    def get_device_group_id(self, seg: int, bus: int, devfn: int) -> int:
        return (bus << 8) | devfn

    def teardown(self, d: Domain) -> None:
        self._maybe_fail("teardown")
        if d.iommu is not None and d.iommu.arch is not None:
            d.iommu.arch.free_all()

    def _check(self, d: Domain, dfn: Dfn) -> None:
        if dfn.value >= 1 << (9 * self.levels):
            raise AddressNotAvailable(f"dfn beyond {9 * self.levels + 12}-bit width", frame=dfn)

    def _implicit_flush(self, d: Domain, dfn: Dfn, flags: FlushFlags) -> None:
        assert self.iommu is not None
        if flags and not self.iommu.dont_flush_iotlb:
            self.flushes.append(FlushRecord(d.domid, dfn.value, 1, flags))

    def map_page(self, d: Domain, dfn: Dfn, mfn: Mfn, perms: Perm) -> FlushFlags:
        self._maybe_fail("map_page")
        self._check(d, dfn)
        with d.iommu.mapping_lock:
            ch = self.table(d).set_leaf(dfn.value, (mfn.value << PAGE_SHIFT) | self.fmt.leaf_bits(perms, 1))
        flags = FlushFlags(ch.flush & 3)
        self._implicit_flush(d, dfn, flags)
        return flags

    def unmap_page(self, d: Domain, dfn: Dfn) -> FlushFlags:
        self._maybe_fail("unmap_page")
        self._check(d, dfn)
        with d.iommu.mapping_lock:
            ch = self.table(d).clear_leaf(dfn.value)
        flags = FlushFlags(ch.flush & 3)
        self._implicit_flush(d, dfn, flags)
        return flags

    def lookup_page(self, d: Domain, dfn: Dfn) -> tuple[Mfn, Perm]:
        self._maybe_fail("lookup_page")
        leaf = self.table(d).lookup(dfn.value)
        if leaf is None:
            raise NoSuchEntry("not mapped", frame=dfn)
        return Mfn((leaf.address >> PAGE_SHIFT) + (dfn.value & ((1 << (leaf.page_shift - 12)) - 1))), leaf.perms

    def map_range(self, d: Domain, dfn: Dfn, mfn: Mfn, count: int, perms: Perm) -> FlushFlags:
        self._maybe_fail("map_range")
        self._check(d, dfn + (count - 1))
        bits = {1: self.fmt.leaf_bits(perms, 1)}
        with d.iommu.mapping_lock:
            ch = self.table(d).map_range(dfn.value, mfn.value << PAGE_SHIFT, count, bits)
        return FlushFlags(ch.flush)

    def unmap_range(self, d: Domain, dfn: Dfn, count: int) -> FlushFlags:
        self._maybe_fail("unmap_range")
        with d.iommu.mapping_lock:
            ch = self.table(d).unmap_range(dfn.value, count)
        return FlushFlags(ch.flush)

    def free_page_table(self, mfn: Mfn, level: int) -> None:
        assert self.iommu is not None
        self.iommu.machine.allocator.free(mfn)

    def suspend(self) -> None:
        self._maybe_fail("suspend")

    def resume(self) -> None:
        self._maybe_fail("resume")

    def crash_shutdown(self) -> None:
        self._maybe_fail("crash_shutdown")

    def share_p2m(self, d: Domain) -> None:
        self._maybe_fail("share_p2m")

    def iotlb_flush(self, d: Domain, dfn: Dfn, count: int, flags: FlushFlags) -> None:
        self._maybe_fail("iotlb_flush")
        self.flushes.append(FlushRecord(d.domid, dfn.value, count, flags))

    def iotlb_flush_all(self, d: Domain) -> None:
        self._maybe_fail("iotlb_flush_all")
        self.flushes.append(FlushRecord(d.domid, None, 0, FlushFlags.ALL))

    def get_reserved_device_memory(self, fn: ReservedMemoryCallback, ctxt: object) -> int:
        return 0

    def dump_page_tables(self, d: Domain) -> list[Mapping]:
        t = self.table(d)
        if t.root is None:
            return []
        assert self.iommu is not None
        return mappings(self.iommu.machine.memory, self.fmt, t.root.value, t.levels)


def bad_request(msg: str = "refused") -> IommuError:
    return InvalidArgument(msg)
