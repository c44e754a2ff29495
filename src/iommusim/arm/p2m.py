"""Xen's ARM p2m (arch/arm/p2m.c): a domain's stage-2 table in machine memory, shared by the CPU and the SMMU.

``guest_physmap_add_entry`` / ``guest_physmap_remove_page`` change it the way ``p2m_set_entry`` does:

* the range is cut into 1 GiB, 2 MiB and 4 KiB pieces, a piece being as large as the alignment of the guest
  frame, the machine frame and the remaining count allow (and as the hardware's block sizes allow);
* an entry is built from the p2m type (memory type, shareability, execute-never, write permission) with the
  type itself kept in the descriptor's software bits;
* a block that is only partly changed is split first (break-before-make: the CPU TLB is flushed before the
  table replaces the block), and a valid entry is replaced only after a CPU TLB flush; a removal defers its
  CPU TLB flush to the unlock;
* a table that a block replaces, or that a removal unhooks, is freed once nothing can walk it;
* the SMMU walks this same table, so after a change that touched a valid entry Xen flushes the IOMMU
  (``iommu_iotlb_flush``) for domains that have IOMMU tables.

Differences from Xen, on purpose:

* all or nothing: Xen stops at the first failing piece and leaves the earlier pieces (and any tables it
  allocated) in place; here an allocation failure anywhere leaves the p2m exactly as it was and frees
  every table the change allocated (the radix engine journals the whole change);
* the IOMMU flush is skipped while ``Iommu.dont_flush_iotlb`` is set: a model affordance that lets
  batching callers (and ``Platform.guest_map(flush=False)``) open the stale window and flush themselves;
* one IOMMU flush covers a whole call rather than one per piece (the SMMU flushes everything of the
  domain's VMIDs either way), and tables are freed after that flush rather than before it;
* a removal that covers a whole table but starts misaligned reclaims that table where Xen, working
  4 KiB piece by piece, would leave it empty; translations are identical;
* guest frames beyond the IPA size are refused with EINVAL (Xen only checks the concatenated root).

The seed-era regression of 9ed527dc95 (the flush tested ``need_iommu_pt_sync``, never true with shared
tables, so the SMMU was never flushed) comes back with the quirk ``arm-p2m-no-smmu-flush``.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

import numpy as np

from iommusim.arm.vtcr import P2mLayout, VmidAllocator
from iommusim.errors import InvalidArgument
from iommusim.frames import PAGE_SHIFT, Dfn, Gfn, Mfn, expect_kind
from iommusim.iommu.ops import DomainIommu
from iommusim.machine.p2m import P2mEntry, P2mType, check_order
from iommusim.pagetable.arm_s2 import (
    MATTR_DEV,
    MATTR_MEM,
    MATTR_MEM_NC,
    OA_MASK,
    SW_SHIFT,
    ArmS2Format,
    S2Attrs,
    Shareability,
    XenP2mType,
)
from iommusim.pagetable.format import EntryKind
from iommusim.pagetable.radix import Change, RadixTable
from iommusim.pagetable.walk import walk_tables
from iommusim.perms import FlushFlags, Perm

if TYPE_CHECKING:
    from iommusim.iommu.layer import Iommu
    from iommusim.machine.domain import Domain
    from iommusim.machine.machine import Machine

__all__ = ["FORMAT", "ArmP2m", "p2m_entry_for_type"]

FORMAT: Final = ArmS2Format()

_TO_XEN: dict[P2mType, XenP2mType] = {
    P2mType.INVALID: XenP2mType.INVALID,
    P2mType.RAM_RW: XenP2mType.RAM_RW,
    P2mType.RAM_RO: XenP2mType.RAM_RO,
    P2mType.MMIO_DIRECT_DEV: XenP2mType.MMIO_DIRECT_DEV,
    P2mType.MMIO_DIRECT_NC: XenP2mType.MMIO_DIRECT_NC,
    P2mType.MMIO_DIRECT_C: XenP2mType.MMIO_DIRECT_C,
    P2mType.MAP_FOREIGN: XenP2mType.MAP_FOREIGN,
    P2mType.GRANT_MAP_RW: XenP2mType.GRANT_MAP_RW,
    P2mType.GRANT_MAP_RO: XenP2mType.GRANT_MAP_RO,
    P2mType.IOMMU_MAP_RW: XenP2mType.IOMMU_MAP_RW,
    P2mType.IOMMU_MAP_RO: XenP2mType.IOMMU_MAP_RO,
}
_FROM_XEN: dict[int, P2mType] = {int(x): t for t, x in _TO_XEN.items()}

# p2m_set_permission: (execute-never, writable) by type, before the (default rwx) access restrictions
_TYPE_XN_W: dict[P2mType, tuple[bool, bool]] = {
    P2mType.RAM_RW: (False, True),
    P2mType.RAM_RO: (False, False),
    P2mType.IOMMU_MAP_RW: (True, True),
    P2mType.MAP_FOREIGN: (True, True),
    P2mType.GRANT_MAP_RW: (True, True),
    P2mType.MMIO_DIRECT_DEV: (True, True),
    P2mType.MMIO_DIRECT_NC: (True, True),
    P2mType.MMIO_DIRECT_C: (True, True),
    P2mType.IOMMU_MAP_RO: (True, False),
    P2mType.GRANT_MAP_RO: (True, False),
    P2mType.INVALID: (True, False),
}

# page shift of a block -> our level that holds it
_BLOCK_LEVELS: dict[int, int] = {21: 2, 30: 3}


def p2m_entry_for_type(t: P2mType) -> tuple[Perm, S2Attrs]:
    """Xen's mfn_to_p2m_entry for a type (worked out once per type: it is on every page's path)."""
    got = _ENTRY_FOR_TYPE.get(t)
    if got is None:
        got = _ENTRY_FOR_TYPE[t] = _p2m_entry_for_type(t)
    return got


_ENTRY_FOR_TYPE: dict[P2mType, tuple[Perm, S2Attrs]] = {}
_FLAGS = tuple(FlushFlags(i) for i in range(8))  # by value: building IntFlags per page is slow
_LEAF_BITS: dict[tuple[Perm, S2Attrs, int], int] = {}


def _leaf_bits(perms: Perm, level: int, attrs: S2Attrs) -> int:
    key = (perms, attrs, level)
    bits = _LEAF_BITS.get(key)
    if bits is None:
        bits = _LEAF_BITS[key] = FORMAT.leaf_bits(perms, level, attrs)
    return bits


def _p2m_entry_for_type(t: P2mType) -> tuple[Perm, S2Attrs]:
    """Xen's mfn_to_p2m_entry for a type: read always, write/XN by type, memory type and shareability.

    Device MMIO is Device-nGnRE, cacheable MMIO Normal write-back and non-cacheable MMIO Normal
    non-cacheable, all outer shareable; everything else (RAM, grants, foreign and IOMMU mappings) is
    Normal write-back, inner shareable.
    """
    if t not in _TO_XEN:
        raise InvalidArgument(f"p2m type {t.value} does not exist on ARM")
    if t == P2mType.MMIO_DIRECT_DEV:
        mattr, sh = MATTR_DEV, Shareability.OUTER
    elif t == P2mType.MMIO_DIRECT_C:
        mattr, sh = MATTR_MEM, Shareability.OUTER
    elif t == P2mType.MMIO_DIRECT_NC:
        mattr, sh = MATTR_MEM_NC, Shareability.OUTER
    else:
        mattr, sh = MATTR_MEM, Shareability.INNER
    xn, writable = _TYPE_XN_W[t]
    perms = Perm.R | (Perm.W if writable else Perm.NONE)
    return perms, S2Attrs(mattr=mattr, sh=sh, af=True, xn=xn, sw=int(_TO_XEN[t]))


class ArmP2m:
    """One domain's stage-2 p2m, rooted in machine memory (Xen's struct p2m_domain)."""

    def __init__(
        self,
        machine: Machine,
        d: Domain,
        layout: P2mLayout,
        vmids: VmidAllocator,
        *,
        block_shifts: tuple[int, ...] = (21, 30),
        iommu: Iommu | None = None,
        clean_pte: bool = False,
    ) -> None:
        self.machine = machine
        self.domain = d
        self.layout = layout
        self.iommu = iommu
        #: Clean each PTE write to memory for an SMMU that cannot walk coherently (fixed at p2m_init in Xen).
        self.clean_pte = clean_pte
        self.block_levels = tuple(sorted(_BLOCK_LEVELS[s] for s in block_shifts if s in _BLOCK_LEVELS))
        self.counters: Counter[str] = Counter()
        self._vmids = vmids
        self._lock = threading.RLock()
        self._need_flush = False
        self._dead = False
        self.vmid = vmids.alloc()  # p2m_alloc_vmid (EBUSY when exhausted)
        geometry = layout.geometry
        self.table = RadixTable(
            machine.memory,
            machine.allocator,
            FORMAT,
            owner=f"d{d.domid}:p2m",
            levels=geometry.levels,
            root_pages=geometry.root_pages,
        )
        try:
            self.table.ensure_root()  # p2m_alloc_table: the concatenated root, zeroed
        except BaseException:
            vmids.free(self.vmid)
            raise
        self._cpu_tlb_flush()  # a fresh VMID may still have stale CPU TLB entries

    # -- identity ---------------------------------------------------------------------------------------

    @property
    def root(self) -> Mfn:
        root = self.table.root
        assert root is not None, "the p2m has been torn down"
        return root

    @property
    def root_maddr(self) -> int:
        return self.root.value << PAGE_SHIFT

    @property
    def vttbr(self) -> int:
        """VTTBR_EL2 for this p2m: the root address with the VMID in bits 55:48."""
        return self.root_maddr | (self.vmid << 48)

    # -- locking and CPU TLB maintenance ----------------------------------------------------------------

    def _cpu_tlb_flush(self) -> None:
        """TLBI VMALLS12E1IS for this p2m's VMID (Xen's p2m_force_tlb_flush_sync), counted."""
        self.counters["cpu_tlb_flush_vmid"] += 1
        self._need_flush = False

    def _tlb_flush_sync(self) -> None:
        if self._need_flush:
            self._cpu_tlb_flush()

    @contextmanager
    def _write_locked(self) -> Iterator[None]:
        """p2m_write_lock ... p2m_write_unlock: a deferred CPU TLB flush happens before the unlock."""
        with self._lock:
            if self._dead:
                raise InvalidArgument(f"the p2m of {self.domain} has been torn down")
            try:
                yield
            finally:
                self._tlb_flush_sync()

    # -- the P2m protocol ------------------------------------------------------------------------------

    def set_entry(self, gfn: Gfn, mfn: Mfn, order: int, type: P2mType) -> None:
        self.guest_physmap_add_entry(gfn, mfn, order, type)

    def remove(self, gfn: Gfn, order: int) -> None:
        self.guest_physmap_remove_page(gfn, order)

    def lookup(self, gfn: Gfn) -> P2mEntry | None:
        found = self.get_entry(gfn)
        return None if found is None else found[0]

    def leaves(self) -> list[tuple[int, int, int]]:
        """Every block and page descriptor as (first guest frame, frames covered, raw descriptor), ascending."""
        out: list[tuple[int, int, int]] = []
        with self._lock:
            if self.table.root is None:
                return out
            for _frame, level, base, words, _ in walk_tables(
                self.machine.memory, FORMAT, self.root.value, self.table.levels, root_pages=self.table.root_pages
            ):
                present = FORMAT.present_array(words) & ~FORMAT.malformed_array(words, level)
                if level > 1:
                    present &= ~FORMAT.table_array(words, level)
                span = 9 * (level - 1)
                for i in np.nonzero(present)[0].tolist():
                    out.append((base + (i << span), 1 << span, int(words[i])))
        out.sort()
        return out

    def items(self) -> Iterator[tuple[Gfn, P2mEntry]]:
        """Every mapped 4 KiB guest frame in ascending order, read back from the table in memory."""
        for g0, pages, raw in self.leaves():
            m0 = (raw & OA_MASK) >> PAGE_SHIFT
            t = _FROM_XEN.get((raw >> SW_SHIFT) & 0xF, P2mType.INVALID)
            for k in range(pages):
                yield Gfn(g0 + k), P2mEntry(Mfn(m0 + k), t)

    def teardown(self) -> None:
        """p2m_teardown: free every table of the tree and give the VMID back."""
        with self._lock:
            if self._dead:
                return
            self.counters["tables_freed"] += self.table.free_all()
            self._vmids.free(self.vmid)
            self._dead = True

    # -- Xen's entry points ------------------------------------------------------------------------------

    def get_entry(self, gfn: Gfn) -> tuple[P2mEntry, int] | None:
        """p2m_get_entry: the entry translating ``gfn`` and the order of the mapping it belongs to."""
        g = expect_kind(Gfn, gfn, "gfn").value
        with self._lock:
            if self._dead or g >= self.layout.gfn_limit:
                return None
            leaf = self.table.lookup(g)
        if leaf is None or leaf.kind != EntryKind.LEAF:
            return None
        order = leaf.page_shift - PAGE_SHIFT
        mfn = Mfn((leaf.address >> PAGE_SHIFT) + (g & ((1 << order) - 1)))
        t = _FROM_XEN.get((leaf.raw >> SW_SHIFT) & 0xF, P2mType.INVALID)
        return P2mEntry(mfn, t), order

    def guest_physmap_add_entry(self, gfn: Gfn, mfn: Mfn, order: int, type: P2mType) -> FlushFlags:
        """Map ``2**order`` frames (replacing whatever was there); returns what the change did."""
        return self.insert_mapping(gfn, 1 << check_order(order), mfn, type)

    def guest_physmap_remove_page(self, gfn: Gfn, order: int, mfn: Mfn | None = None) -> FlushFlags:
        """Unmap ``2**order`` frames (Xen ignores the machine frame it is given)."""
        return self.remove_mapping(gfn, 1 << check_order(order))

    def insert_mapping(self, gfn: Gfn, nr: int, mfn: Mfn, type: P2mType) -> FlushFlags:
        """p2m_insert_mapping (map_regions_p2mt and friends): ``nr`` frames from ``gfn`` to ``mfn``."""
        g = expect_kind(Gfn, gfn, "gfn").value
        m = expect_kind(Mfn, mfn, "mfn").value
        perms, attrs = p2m_entry_for_type(type)  # EINVAL for the x86-only types
        self._check_range(g, nr)
        if (m + nr) << PAGE_SHIFT > OA_MASK + (1 << PAGE_SHIFT):
            raise InvalidArgument(f"machine frames {m:#x}+{nr:#x} are beyond a 48-bit physical address")
        with self._write_locked():
            return self._insert(g, nr, m, perms, attrs)

    def remove_mapping(self, gfn: Gfn, nr: int) -> FlushFlags:
        """p2m_remove_mapping: unmap ``nr`` frames from ``gfn``."""
        g = expect_kind(Gfn, gfn, "gfn").value
        self._check_range(g, nr)
        with self._write_locked():
            return self._remove(g, nr)

    # -- the change itself -------------------------------------------------------------------------------

    def _check_range(self, g: int, nr: int) -> None:
        if nr < 1:
            raise InvalidArgument("a p2m change covers at least one frame")
        if g + nr > self.layout.gfn_limit:
            raise InvalidArgument(
                f"guest frames {g:#x}+{nr:#x} are beyond the {self.layout.ipa_bits}-bit IPA space of {self.domain}"
            )

    def _levels_for(self, g: int, nr: int) -> list[int]:
        """Our levels a piece may be written at: 4 KiB always, blocks where Xen's alignment rule allows.

        Xen takes a piece of 2**k frames when 2**k divides the guest frame, the machine frame and the
        remaining count; as the count shrinks by whole pieces, that is the same as 2**k dividing
        ``gfn + nr`` of the original request (the engine checks the frames themselves at each step).
        """
        out = [1]
        for level in self.block_levels:
            size = 1 << (9 * (level - 1))
            if not (g + nr) & (size - 1):
                out.append(level)
        return out

    def _insert(self, g: int, nr: int, m: int, perms: Perm, attrs: S2Attrs) -> FlushFlags:
        single: int | None
        if nr == 1:  # one 4 KiB page (the per-page path): the only piece is a level-1 entry
            levels, single = [1], 1
        else:
            levels = self._levels_for(g, nr)
            single = next((lv for lv in levels if nr == 1 << (9 * (lv - 1)) and not ((g | m) & (nr - 1))), None)
        bits = {lv: _leaf_bits(perms, lv, attrs) for lv in levels}
        if single is not None:
            raw = (m << PAGE_SHIFT) | bits[single]
            change = self.table.set_leaf(g, raw, single)
            old_valid = bool(change.flush & FlushFlags.MODIFIED) or change.old == raw
        else:
            change = self.table.map_range(g, m << PAGE_SHIFT, nr, bits)
            old_valid = bool(change.flush & FlushFlags.MODIFIED) or not change.flush
        self._account(change)
        if old_valid:
            self._cpu_tlb_flush()  # break-before-make: flush before the new entry is written
        flags = _FLAGS[3 if old_valid else 1]
        self._after_change(g, nr, flags, change)
        return flags

    def _remove(self, g: int, nr: int) -> FlushFlags:
        change = self.table.unmap_range(g, nr, reclaim=True)
        self._account(change)
        flags = FlushFlags.MODIFIED if change.flush & FlushFlags.MODIFIED else FlushFlags.NONE
        if flags:
            self._need_flush = True  # a removal's CPU TLB flush can wait for the unlock
        self._after_change(g, nr, flags, change)
        return flags

    def _account(self, change: Change) -> None:
        self.counters["changes"] += 1
        self.counters["tables_allocated"] += change.tables_allocated
        for _first, level in change.split:
            self.counters[f"shattered_l{level}"] += 1
            self._cpu_tlb_flush()  # break-before-make around the block being replaced by a table
        if self.clean_pte:
            self.counters["dcache_clean"] += 1

    def _after_change(self, g: int, nr: int, flags: FlushFlags, change: Change) -> None:
        if flags:
            self._iommu_flush(g, nr, flags)
        if change.freed_tables:
            self._tlb_flush_sync()  # no CPU may still walk a table that is about to be freed
            self.table.free_frames(change.freed_tables)
            self.counters["tables_freed"] += len(change.freed_tables)

    def _iommu_flush(self, g: int, nr: int, flags: FlushFlags) -> None:
        """The hook at the end of __p2m_set_entry: the SMMU walks this table, so flush it."""
        iommu = self.iommu
        st = self.domain.iommu
        if iommu is None or not isinstance(st, DomainIommu):
            return
        if iommu.config.quirk("arm-p2m-no-smmu-flush"):
            wanted = st.need_sync  # need_iommu_pt_sync(d): never true when the tables are shared
        else:
            wanted = st.has_pt  # has_iommu_pt(d), as restored by 9ed527dc95
        if not wanted:
            return
        if iommu.dont_flush_iotlb:
            self.counters["iommu_flush_deferred"] += 1
            iommu.note_unflushed(self.domain, Dfn(g), nr)  # the batching caller owes this flush
            return
        self.counters["iommu_flush"] += 1
        iommu.iotlb_flush(self.domain, Dfn(g), nr, flags)

    # -- inspection ---------------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Leaves by size (Xen's p2m_dump_info) plus the change counters."""
        out: dict[str, int] = {"1G mappings": 0, "2M mappings": 0, "4K mappings": 0}
        names = {3: "1G mappings", 2: "2M mappings", 1: "4K mappings"}
        with self._lock:
            if self.table.root is not None:
                for _frame, level, _base, words, _ in walk_tables(
                    self.machine.memory, FORMAT, self.root.value, self.table.levels, root_pages=self.table.root_pages
                ):
                    present = FORMAT.present_array(words)
                    if level > 1:
                        present &= ~FORMAT.table_array(words, level)
                    if level in names:
                        out[names[level]] += int(present.sum())
        out.update(self.counters)
        return out
