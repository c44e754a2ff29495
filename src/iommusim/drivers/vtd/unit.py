"""The driver's view of one remapping unit: capabilities, root table, invalidation queue, flushes, DIDs.

Everything here goes through the unit's registers (MMIO) and structures in machine memory, the way Xen's
``struct vtd_iommu`` code does: the global command register with a poll of the status register, the
context and IOTLB command registers when queued invalidation is not in use, and otherwise descriptors
written at the queue tail followed by a wait descriptor whose status write the driver polls for.  Polls
run on the simulated clock and give up with ETIMEDOUT, as Xen's do.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from iommusim.console import LogLevel
from iommusim.drivers.serialise import serialised
from iommusim.errors import BadAddress, NoDevice, OutOfMemory, TimedOut
from iommusim.frames import PAGE_SHIFT, Mfn
from iommusim.hw.vtd.regs import (
    CCMD,
    FECTL_IM,
    FSTS,
    GCMD,
    GSTS,
    IOTLB_REG,
    IQ_INDEX_SHIFT,
    Cap,
    Ecap,
    Reg,
    agaw_to_levels,
)
from iommusim.hw.vtd.structs import (
    ContextInvDesc,
    DevIotlbInvDesc,
    FaultRecord,
    IotlbInvDesc,
    WaitDesc,
)
from iommusim.machine.pci import PciDevice

if TYPE_CHECKING:
    from iommusim.drivers.vtd.dmar import DrhdDesc
    from iommusim.iommu.layer import Iommu

__all__ = ["Granularity", "IommuUnit"]

_POLL_STEP_NS = 20_000  # simulated time one poll of a status bit or slot takes
_QI_TIMEOUT_MS = 1  # Xen's timeout for an ordinary invalidation wait
_STATUS_DONE = 1
_QS = 2  # queue of 2**2 = 4 pages (1024 descriptors), as Xen sets it up


class Granularity:
    GLOBAL = 1
    DOMAIN = 2
    DEVICE_OR_PAGE = 3


@dataclass
class QueueState:
    base: Mfn  # first page of the queue
    pages: int
    status: Mfn  # page holding the wait descriptors' status slot
    tail: int = 0

    @property
    def slots(self) -> int:
        return self.pages * 256


@dataclass
class IommuUnit:
    """Driver state for one DRHD (Xen's struct vtd_iommu + acpi_drhd_unit)."""

    index: int
    desc: DrhdDesc
    iommu: Iommu
    cap: Cap = field(init=False)
    ecap: Ecap = field(init=False)
    agaw: int = 0
    root: Mfn | None = None
    queue: QueueState | None = None
    use_qi: bool = False
    #: Xen's domid_map: domain id -> this unit's DID, and the reverse
    did_of: dict[int, int] = field(default_factory=dict)
    domain_of_did: dict[int, int] = field(default_factory=dict)
    ats_devices: list[PciDevice] = field(default_factory=list)
    #: context table of each bus that has one (the root entries point to them)
    context_tables: dict[int, Mfn] = field(default_factory=dict)
    saved_fault_regs: tuple[int, int, int, int] | None = None
    #: Xen's iommu->register_lock: the queue tail, the wait status slot and the register-based
    #: invalidation commands are shared by every CPU that flushes through this unit.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.cap = Cap.decode(self.read64(Reg.CAP))
        self.ecap = Ecap.decode(self.read64(Reg.ECAP))

    @property
    def name(self) -> str:
        return self.desc.name

    @property
    def levels(self) -> int:
        return agaw_to_levels(self.agaw)

    # -- MMIO ------------------------------------------------------------------------------------------

    def read32(self, off: int) -> int:
        return self.desc.regs.read(off, 4)

    def read64(self, off: int) -> int:
        return self.desc.regs.read(off, 8)

    def write32(self, off: int, value: int) -> None:
        self.desc.regs.write(off, value, 4)

    def write64(self, off: int, value: int) -> None:
        self.desc.regs.write(off, value, 8)

    def _poll(self, what: str, done: object, timeout_ms: int = _QI_TIMEOUT_MS) -> None:
        """Spin on the simulated clock until ``done()`` is true; ETIMEDOUT after ``timeout_ms``."""
        assert callable(done)
        clock = self.iommu.machine.clock
        deadline = clock.ns + timeout_ms * 1_000_000
        while not done():
            if clock.ns >= deadline:
                raise TimedOut(f"{self.name}: {what} did not complete within {timeout_ms} ms")
            clock.advance(_POLL_STEP_NS)

    # -- set-up --------------------------------------------------------------------------------------

    def pick_agaw(self, domain_agaw: int) -> None:
        """The largest AGAW the unit supports that is not above the domain's (Xen's nr_pt_levels)."""
        for agaw in range(domain_agaw, -1, -1):
            if self.cap.supports_agaw(agaw):
                self.agaw = agaw
                return
        raise NoDevice(f"{self.name}: SAGAW {self.cap.sagaw:#07b} offers no width up to AGAW {domain_agaw}")

    def allocate(self, use_qi: bool) -> None:
        """Root table, and queue pages when queued invalidation is used; nothing is kept on failure."""
        alloc = self.iommu.machine.allocator
        got: list[tuple[Mfn, int]] = []
        try:
            root = alloc.alloc(f"{self.name}:root")
            got.append((root, 1))
            queue = None
            if use_qi:
                base = alloc.alloc(f"{self.name}:qi", 1 << _QS, align_order=_QS)
                got.append((base, 1 << _QS))
                status = alloc.alloc(f"{self.name}:qi-status")
                got.append((status, 1))
                queue = QueueState(base, 1 << _QS, status)
        except OutOfMemory:
            for mfn, n in reversed(got):
                alloc.free(mfn, n)
            raise
        self.root, self.queue, self.use_qi = root, queue, use_qi

    def release(self) -> None:
        alloc = self.iommu.machine.allocator
        if self.queue is not None:
            alloc.free(self.queue.base, self.queue.pages)
            alloc.free(self.queue.status)
            self.queue = None
        for mfn in self.context_tables.values():
            alloc.free(mfn)
        self.context_tables.clear()
        if self.root is not None:
            alloc.free(self.root)
            self.root = None

    def init_hw(self) -> None:
        """Xen's init_vtd_hw for one unit: fault event, queued invalidation, root pointer, global flush."""
        self.clear_faults()
        self.write32(Reg.FEDATA, 0x40 + self.index)  # an MSI vector of our choosing
        self.write32(Reg.FEADDR, 0xFEE0_0000)
        self.write32(Reg.FEUADDR, 0)
        self.write32(Reg.FECTL, 0)  # unmask the fault event
        if self.use_qi:
            self.enable_qi()
        assert self.root is not None
        self.write64(Reg.RTADDR, self.root.value << PAGE_SHIFT)
        self.gcmd(GCMD.SRTP, GSTS.RTPS, True, one_shot=True)
        self.flush_all()

    def clear_faults(self) -> None:
        for i in range(self.cap.nfr):
            self.write32(self.cap.fro + 16 * i + 12, 1 << 31)
        self.write32(Reg.FSTS, FSTS.W1C)

    def gcmd(self, cmd: int, status: int, on: bool, *, one_shot: bool = False) -> None:
        """Issue one global command with the persistent enables preserved, and wait for its status."""
        current = self.read32(Reg.GSTS) & GSTS.PERSISTENT
        value = current | cmd if on else current & ~cmd
        self.write32(Reg.GCMD, value)
        if one_shot:
            self._poll(f"global command {cmd:#x}", lambda: bool(self.read32(Reg.GSTS) & status))
        else:
            self._poll(f"global command {cmd:#x}", lambda: bool(self.read32(Reg.GSTS) & status) == on)

    def enable_qi(self) -> None:
        assert self.queue is not None
        q = self.queue
        self.write64(Reg.IQA, (q.base.value << PAGE_SHIFT) | _QS)
        self.write64(Reg.IQT, 0)
        q.tail = 0
        self.gcmd(GCMD.QIE, GSTS.QIES, True)

    def disable_qi(self) -> None:
        if self.read32(Reg.GSTS) & GSTS.QIES:
            self.gcmd(GCMD.QIE, GSTS.QIES, False)

    def enable_translation(self) -> None:
        self.gcmd(GCMD.TE, GSTS.TES, True)
        self.write32(Reg.PMEN, 0)  # protected memory regions are not used once translation is on

    def disable_translation(self) -> None:
        self.gcmd(GCMD.TE, GSTS.TES, False)

    def flush_write_buffer(self) -> None:
        """Only units reporting RWBF need it; WBFS reads 1 until the flush is done."""
        if not self.cap.rwbf:
            return
        self.gcmd(GCMD.WBF, GSTS.WBFS, False)

    # -- queued invalidation -----------------------------------------------------------------------------

    def _qi_put(self, lo: int, hi: int) -> None:
        q = self.queue
        assert q is not None
        mem = self.iommu.machine.memory
        nxt = (q.tail + 1) % q.slots
        self._poll("invalidation queue space", lambda: nxt != self.read64(Reg.IQH) >> IQ_INDEX_SHIFT)
        addr = (q.base.value << PAGE_SHIFT) + 16 * q.tail
        mem.write_u64(addr, lo)
        mem.write_u64(addr + 8, hi)
        q.tail = nxt
        self.write64(Reg.IQT, q.tail << IQ_INDEX_SHIFT)

    @serialised
    def qi_submit(self, lo: int, hi: int, *, timeout_ms: int = _QI_TIMEOUT_MS) -> None:
        """Queue one descriptor and a wait descriptor behind it, and poll the wait's status slot."""
        self._qi_put(lo, hi)
        self.qi_wait(timeout_ms)

    @serialised
    def qi_wait(self, timeout_ms: int = _QI_TIMEOUT_MS) -> None:
        q = self.queue
        assert q is not None
        mem = self.iommu.machine.memory
        slot = q.status.value << PAGE_SHIFT
        mem.write_u32(slot, 0)
        self._qi_put(*WaitDesc(slot, _STATUS_DONE, sw=True, if_=False, fn=True).encode())
        try:
            self._poll("invalidation wait descriptor", lambda: mem.read_u32(slot) == _STATUS_DONE, timeout_ms)
        except TimedOut:
            self.iommu.console.printk(
                LogLevel.ERR,
                f"{self.name}: queued invalidation timed out: IQH {self.read64(Reg.IQH):#x} "
                f"IQT {self.read64(Reg.IQT):#x} IQA {self.read64(Reg.IQA):#x} FSTS {self.read32(Reg.FSTS):#x}",
            )
            raise

    # -- flushes (Xen's flush_context / flush_iotlb with both backends) ----------------------------------

    @serialised
    def flush_context(self, did: int, sid: int, fm: int, gran: int, flush_non_present: bool) -> int:
        """Invalidate context-cache entries; 1 means "nothing cached, flush the write buffer instead"."""
        if flush_non_present:
            if not self.cap.cm:
                return 1
            did = 0
        if self.use_qi:
            self.qi_submit(*ContextInvDesc(gran, did, sid, fm).encode())
            return 0
        value = CCMD.ICC | gran << CCMD.CIRG_SHIFT | (fm & 3) << CCMD.FM_SHIFT | sid << CCMD.SID_SHIFT | did
        self.write64(Reg.CCMD, value)
        self._poll("context invalidation", lambda: not self.read64(Reg.CCMD) & CCMD.ICC)
        return 0

    @serialised
    def flush_iotlb(
        self,
        did: int,
        addr: int,
        order: int,
        gran: int,
        flush_non_present: bool,
        flush_dev_iotlb: bool = False,
        dev_timeout_ms: int = 1000,
    ) -> int:
        """Invalidate IOTLB entries (PSI falls back to DSI without PSI or beyond MAMV); 1 as above."""
        if gran == Granularity.DEVICE_OR_PAGE:
            if addr & 0xFFF:
                raise BadAddress(f"page-selective invalidation of unaligned address {addr:#x}")
            if not self.cap.psi or order > self.cap.mamv:
                gran, addr, order = Granularity.DOMAIN, 0, 0
            else:
                addr &= ~((1 << (PAGE_SHIFT + order)) - 1)
        if flush_non_present:
            if not self.cap.cm:
                return 1
            did = 0
        if self.use_qi:
            desc = IotlbInvDesc(gran, did, addr, order, ih=False, dw=self.cap.dwd, dr=self.cap.drd)
            self.qi_submit(*desc.encode())
            if flush_dev_iotlb:
                self._flush_dev_iotlbs(did, addr, order, gran, dev_timeout_ms)
            return 0
        if gran == Granularity.DEVICE_OR_PAGE:
            self.write64(self.ecap.iro, addr | order)
        value = IOTLB_REG.IVT | gran << IOTLB_REG.IIRG_SHIFT | did << IOTLB_REG.DID_SHIFT
        if self.cap.drd:
            value |= IOTLB_REG.DR
        if self.cap.dwd:
            value |= IOTLB_REG.DW
        reg = self.ecap.iro + 8
        self.write64(reg, value)
        self._poll("IOTLB invalidation", lambda: not self.read64(reg) & IOTLB_REG.IVT)
        if not self.read64(reg) >> IOTLB_REG.IAIG_SHIFT & 3:
            self.iommu.console.printk(LogLevel.ERR, f"{self.name}: IOTLB invalidation was not performed")
        return 0

    def _flush_dev_iotlbs(self, did: int, addr: int, order: int, gran: int, timeout_ms: int) -> None:
        for dev in self.ats_devices:
            owner = dev.owner
            if gran != Granularity.GLOBAL and (owner is None or self.did_of.get(owner.domid) != did):
                continue
            if gran == Granularity.DEVICE_OR_PAGE:
                size = order > 0
                a = addr
                if size:
                    a = (addr | ((1 << (PAGE_SHIFT + order - 1)) - 1)) & ~(1 << (PAGE_SHIFT + order - 1))
                    a &= ~0xFFF
                desc = DevIotlbInvDesc(dev.sbdf.bdf, a, size, dev.ats_queue_depth & 0x1F)
            else:
                desc = DevIotlbInvDesc(dev.sbdf.bdf, ((1 << 63) - 1) & ~0xFFF, True, dev.ats_queue_depth & 0x1F)
            self.qi_submit(*desc.encode(), timeout_ms=timeout_ms)

    def flush_all(self) -> None:
        """Global context and IOTLB invalidation (Xen's iommu_flush_all for one unit)."""
        self.flush_context(0, 0, 0, Granularity.GLOBAL, False)
        self.flush_iotlb(0, 0, 0, Granularity.GLOBAL, False, bool(self.ats_devices))
        self.flush_write_buffer()

    # -- domain ids --------------------------------------------------------------------------------------

    def did_for(self, domid: int, *, alloc: bool) -> int | None:
        did = self.did_of.get(domid)
        if did is not None or not alloc:
            return did
        first = 1 if self.cap.cm else 0  # with caching mode, DID 0 tags not-present entries
        for candidate in range(first, self.cap.domains):
            if candidate not in self.domain_of_did:
                self.did_of[domid] = candidate
                self.domain_of_did[candidate] = domid
                return candidate
        return None

    def free_did(self, domid: int) -> None:
        did = self.did_of.pop(domid, None)
        if did is not None:
            self.domain_of_did.pop(did, None)

    # -- faults --------------------------------------------------------------------------------------

    def read_fault(self, index: int) -> FaultRecord:
        base = self.cap.fro + 16 * index
        return FaultRecord.decode(self.read64(base), self.read64(base + 8))

    def clear_fault(self, index: int) -> None:
        self.write32(self.cap.fro + 16 * index + 12, 1 << 31)

    def save_fault_regs(self) -> None:
        self.saved_fault_regs = (
            self.read32(Reg.FECTL),
            self.read32(Reg.FEDATA),
            self.read32(Reg.FEADDR),
            self.read32(Reg.FEUADDR),
        )

    def restore_fault_regs(self) -> None:
        if self.saved_fault_regs is None:
            return
        fectl, data, addr, uaddr = self.saved_fault_regs
        self.write32(Reg.FEDATA, data)
        self.write32(Reg.FEADDR, addr)
        self.write32(Reg.FEUADDR, uaddr)
        self.write32(Reg.FECTL, fectl & FECTL_IM)
