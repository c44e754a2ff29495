"""One random story told to every vendor and to the reference model, checked after every step.

``Differential`` builds one machine per vendor (the same devices, guests and memory sizes), applies each
operation to all of them and to a ``ReferenceModel`` per machine (its frames are that machine's), and
``verify()`` then asks the hardware what each device can really do: for the Dfns touched recently and a
few sampled ones, every device's read and write go through the DMA engine and its IOMMU unit (walks,
IOTLBs, device TLBs, as a real access would), and the outcome must be one the reference allows: the
current translation, or a stale one only inside a window whose flush was skipped on purpose, until an
invalidation covers it.  ``iommusim.tools.check.check`` then runs on each machine and must find no
violation.  The hardware domain's view is not modelled (it differs by architecture and mode): what each
device sees there must not change while it stays, and the isolation check says whether it may.

``differential_machine()`` wraps it in a Hypothesis ``RuleBasedStateMachine``: random maps and unmaps
(single pages and 2 MiB blocks, ranges aligned or not), flushes made, skipped and deferred, explicit
flushes, DMA reads and writes, device assignment, deassignment and moves between guests, lookups, and
domain crash, destruction and re-creation.  ``quirks=`` switches seed-era defects on, so a user can
point it at one and watch it fail; ``replay()`` plays a fixed story instead.  Translated guests change
through their p2m (x86 syncs the IOMMU from it, ARM's SMMU walks it); on x86 a PV guest also changes
through the generic layer's ``map_page``/``unmap_page`` and range form.

Vendors differ on purpose in one place: the generic deassign is Xen's PCI path (back to the hardware
domain), and the SMMU driver then attaches the device to dom0's context, where it stays (a later
assignment is EEXIST); the machine expects exactly that there (``DEASSIGN_ATTACHES_TO_HWDOM``).

Each guest keeps an *anchor* device for life (the roaming devices come and go): on x86 a domain that
loses its last device loses its IOMMU tables and gets new ones from the M2P when a device returns, as
Xen does, and that view legitimately differs from the p2m's (every page read-write, one gfn per frame),
which the reference does not model.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from iommusim.errors import AlreadyExists, DmaFault, NoSuchEntry
from iommusim.frames import PAGE_SHIFT, Daddr, Dfn, Gfn, Mfn
from iommusim.iommu.config import IommuConfig
from iommusim.machine.domain import Domain, DomainKind
from iommusim.machine.p2m import P2mType
from iommusim.machine.pages import PageType
from iommusim.machine.pci import PciDevice, Sbdf
from iommusim.perms import Perm
from iommusim.platform import HardwareSpec, Platform, available_vendors, build_platform
from iommusim.tools.check import check
from iommusim.verify.reference import RefEntry, ReferenceModel

__all__ = [
    "ACCEL",
    "ANCHORS",
    "APPLIED_COUNTS",
    "DEASSIGN_ATTACHES_TO_HWDOM",
    "DEVICES",
    "DISK",
    "GFN_SPACE",
    "GUEST_PAGES",
    "NIC",
    "PVDEV",
    "PV_SLOTS",
    "ROAMING",
    "SLOTS",
    "SPARE",
    "STEP_COUNTS",
    "Differential",
    "Divergence",
    "FlushMode",
    "Lane",
    "Story",
    "differential_machine",
    "replay",
]

NIC, DISK, ACCEL, SPARE, PVDEV = "0000:03:00.0", "0000:04:00.0", "0000:05:00.0", "0000:06:00.0", "0000:07:00.0"
#: Every device on the bus; ACCEL has ATS (a device TLB of its own where the vendor models one).
DEVICES = (NIC, DISK, ACCEL, SPARE, PVDEV)
#: The guests (by domain id) and the device each keeps for life.  Guests 1 and 2 are translated (HVM, and
#: every ARM guest): their DMA view follows their p2m.  Guest 3 is PV, on x86 only: the story changes its
#: DMA view through the generic layer's map/unmap (single pages and the range form), as PV Xen does.
SLOTS = (1, 2, 3)
PV_SLOTS = frozenset({3})
ANCHORS = {1: NIC, 2: DISK, 3: PVDEV}
#: Devices that the story moves between the hardware domain and the guests.
ROAMING = (ACCEL, SPARE)
GUEST_PAGES = 1024  # 4 MiB per guest, in one 2 MiB-aligned extent
GFN_SPACE = 2 * GUEST_PAGES  # the Dfns the story uses: the guest's memory and as much above it
HWDOM_BYTES = 16 << 20
_STAMP = 0x5EED_F00D_0000_0000  # the first 8 bytes of a guest page say which frame it is: _STAMP ^ mfn
_FAULT_SPACING_NS = 20_000_000  # probes this far apart never add up to the fault threshold
_RECENT = 16  # Dfns remembered for probing after the step that touched them
_SAMPLED = 4  # more Dfns probed each step, drawn from the whole space
_HWDOM_PROBES = 4  # Dfns probed each step for devices the hardware domain holds
_HISTORY = 16
#: Vendors whose generic deassign (Xen's PCI path, reassign to the hardware domain) attaches the device to
#: the hardware domain's context, after which attaching it elsewhere is EEXIST (the SMMU driver's rule).
DEASSIGN_ATTACHES_TO_HWDOM = frozenset({"smmu"})

#: Steps played so far, by vendor (every step of every ``Differential`` counts, checked by ``verify``).
STEP_COUNTS: Counter[str] = Counter()
#: Of those, the operations that did something on that vendor's machine (a PV guest exists on x86 only).
APPLIED_COUNTS: Counter[str] = Counter()


class Divergence(AssertionError):
    """A vendor did something the reference model does not allow, or the isolation check complained."""


class FlushMode(Enum):
    FLUSH = "flush"  # the change flushes as it goes
    SKIP = "skip"  # flush=False: the flush is owed, a stale window opens
    DEFERRED = "deferred"  # inside dont_flush, then one iotlb_flush of exactly the range (a batching caller)


@dataclass
class Lane:
    """One vendor's machine and the reference model in that machine's frame numbers."""

    vendor: str
    platform: Platform
    ref: ReferenceModel
    devices: dict[str, PciDevice]
    #: the hardware domain's view as each device first saw it: (device, dfn, access) -> frame (None: fault)
    hwdom_view: dict[tuple[str, int, int], int | None] = field(default_factory=dict)
    #: devices deassigned on a vendor whose deassign attaches them to the hardware domain's context for good
    stuck: set[str] = field(default_factory=set)
    probes: int = 0
    #: the guests this machine has (PV guests exist on x86 only)
    slots: frozenset[int] = frozenset(SLOTS)
    #: operations that did something on this machine (a step may not apply to every machine)
    applied: int = 0

    def forget_hwdom_view(self, device: str) -> None:
        """The device is back with the hardware domain: learn its view there afresh."""
        for key in [k for k in self.hwdom_view if k[0] == device]:
            del self.hwdom_view[key]


def _chunks(gfn: int, mfn: int, count: int) -> list[tuple[int, int, int]]:
    """A run as naturally aligned power-of-two pieces (gfn, mfn, order), as a guest hands them over."""
    out = []
    done = 0
    while done < count:
        g, m = gfn + done, mfn + done
        order = 0
        while order < 9 and not ((g | m) & ((2 << order) - 1)) and done + (2 << order) <= count:
            order += 1
        out.append((g, m, order))
        done += 1 << order
    return out


class Differential:
    """The same operations on every vendor's machine, each checked against its reference model."""

    def __init__(
        self,
        vendors: Sequence[str] | None = None,
        *,
        quirks: Sequence[str] = (),
        ram_bytes: int = 64 << 20,
        iotlb_entries: int = 64,
        units: int = 1,
        caching_mode: bool = False,
        queued_invalidation: bool = True,
        check_isolation: bool = True,
        hwdom_strict: bool = True,
    ) -> None:
        """Machines of ``ram_bytes`` with ``units`` IOMMUs (devices spread over them by each vendor's rule).

        ``caching_mode`` is VT-d's (the unit caches "not present" too, so additions need flushing); the other
        vendors ignore it.  ``hwdom_strict`` keeps the hardware domain's map to its own pages: relaxed and
        inclusive x86 map every frame below 4 GiB, a million pages one by one under a quirk that takes the
        bulk ops away.
        """
        chosen = list(vendors) if vendors is not None else available_vendors()
        if not chosen:
            raise ValueError("no vendor to run on")
        self.config = IommuConfig(
            quirks=frozenset(quirks), hwdom_strict=hwdom_strict, hwdom_inclusive=False if hwdom_strict else None
        )
        self.check_isolation = check_isolation
        self.steps = 0
        self.history: deque[str] = deque(maxlen=_HISTORY)
        self.recent: deque[int] = deque(maxlen=_RECENT)
        self.alive = set(SLOTS)
        self.crashed: set[int] = set()
        self._tag = 0
        self.spec = HardwareSpec(
            vendor="",
            ram_bytes=ram_bytes,
            iotlb_entries=iotlb_entries,
            units=units,
            caching_mode=caching_mode,
            queued_invalidation=queued_invalidation,
        )
        self.lanes = [self._boot(v) for v in chosen]

    # -- set-up ----------------------------------------------------------------------------------------

    def _boot(self, vendor: str) -> Lane:
        devs = [PciDevice(Sbdf.parse(n), ats=n == ACCEL) for n in DEVICES]
        p = build_platform(replace(self.spec, vendor=vendor), config=self.config, devices=devs)
        p.create_hardware_domain(HWDOM_BYTES)
        negative = vendor == "vtd" and self.spec.caching_mode
        lane = Lane(vendor, p, ReferenceModel(negative_caching=negative), {n: p.device(n) for n in DEVICES})
        if p.hwdom_kind is not DomainKind.PV:
            lane.slots = frozenset(SLOTS) - PV_SLOTS
        for n in DEVICES:
            lane.ref.add_device(n)
        for slot in sorted(lane.slots):
            self._create_on(lane, slot)
        return lane

    def _create_on(self, lane: Lane, slot: int) -> None:
        p = lane.platform
        pv = slot in PV_SLOTS
        d = p.create_guest(slot, 0, kind=DomainKind.PV if pv else DomainKind.HVM)
        ext = p.machine.populate(d, GUEST_PAGES, align_order=9)
        if pv:  # ordinary data pages, which devices may write (and which Xen maps when the first device comes)
            p.machine.pages.set_type(ext.mfn.value, PageType.WRITABLE, count=ext.count)
        view = {}
        for i in range(ext.count):
            mfn = ext.mfn + i
            p.machine.memory.write_bytes(mfn.value << PAGE_SHIFT, (_STAMP ^ mfn.value).to_bytes(8, "little"))
            view[Dfn(ext.gfn.value + i)] = RefEntry(mfn, Perm.RW)
        lane.ref.create(slot, view)
        anchor = ANCHORS[slot]
        p.iommu.assign_device(d, anchor)
        lane.ref.assign(anchor, slot)

    # -- bookkeeping -------------------------------------------------------------------------------------

    def _step(self, text: str) -> None:
        self.steps += 1
        self.history.append(f"#{self.steps} {text}")
        for lane in self.lanes:
            STEP_COUNTS[lane.vendor] += 1

    def _touch(self, gfn: int, count: int = 1) -> None:
        picks = {gfn, gfn + count - 1}
        if count > 2:
            rnd = random.Random(gfn * 7919 + count)
            picks |= {gfn + rnd.randrange(count) for _ in range(3)}
        for x in sorted(picks):
            if 0 <= x < GFN_SPACE and x not in self.recent:
                self.recent.append(x)

    def _lanes(self, slot: int | None = None) -> Iterator[Lane]:
        """The machines an operation applies to (those that have the guest), counting it for each."""
        for lane in self.lanes:
            if slot is None or slot in lane.slots:
                lane.applied += 1
                APPLIED_COUNTS[lane.vendor] += 1
                yield lane

    def usable_slot(self, slot: int) -> int:
        """``slot`` if its guest can be changed, else the next one that can (random stories waste no steps)."""
        for i in range(len(SLOTS)):
            other = SLOTS[(SLOTS.index(slot) + i) % len(SLOTS)]
            if self._usable(other):
                return other
        return slot

    def _usable(self, slot: int) -> bool:
        return slot in self.alive and slot not in self.crashed

    def _fail(self, lane: Lane, what: str) -> Divergence:
        story = "\n  ".join(self.history)
        return Divergence(f"[{lane.vendor}] after step {self.steps}: {what}\n  last steps:\n  {story}")

    @staticmethod
    def _domain(lane: Lane, slot: int) -> Domain:
        return lane.platform.machine.domain(slot)

    @staticmethod
    def _frame(d: Domain, page: int) -> Mfn:
        ext = d.extents[0]
        return ext.mfn + page

    # -- changes of a guest's memory (through its p2m; on x86 the IOMMU follows, on ARM it is the p2m) ---

    @contextmanager
    def _batch(self, lane: Lane, mode: FlushMode, slot: int, gfn: int, count: int) -> Iterator[bool]:
        """Run the changes the way ``mode`` says; yields whether each change flushes by itself."""
        p = lane.platform
        if mode is FlushMode.DEFERRED:
            with p.iommu.dont_flush():
                yield False
            p.iommu.iotlb_flush(self._domain(lane, slot), Dfn(gfn), count)
            lane.ref.flush(slot, Dfn(gfn), count)
        else:
            yield mode is FlushMode.FLUSH

    def _set(self, lane: Lane, slot: int, gfn: int, mfn: Mfn, order: int, perms: Perm, flushed: bool) -> None:
        """One change (one call of the generic layer) and its meaning in the reference.

        A translated guest changes its p2m; a PV guest calls the layer: ``map_page`` for one page (its
        driver flushes unless inside ``dont_flush``), the range form ``map(..., flush=)`` for a block.
        """
        d = self._domain(lane, slot)
        p = lane.platform
        if slot in PV_SLOTS:
            if order:
                p.iommu.map(d, Dfn(gfn), mfn, 1 << order, perms, flush=flushed)
            else:
                with nullcontext() if flushed else p.iommu.dont_flush():
                    p.iommu.map_page(d, Dfn(gfn), mfn, perms)
        else:
            kind = P2mType.RAM_RW if perms & Perm.W else P2mType.RAM_RO
            p.guest_map(d, Gfn(gfn), mfn, order=order, type=kind, flush=flushed)
        new = [RefEntry(mfn + i, perms) for i in range(1 << order)]
        lane.ref.update(slot, Dfn(gfn), list(new), flushed=flushed)

    def _clear(self, lane: Lane, slot: int, gfn: int, order: int, flushed: bool) -> None:
        d = self._domain(lane, slot)
        p = lane.platform
        if slot in PV_SLOTS:
            if order:
                p.iommu.unmap(d, Dfn(gfn), 1 << order, flush=flushed)
            else:
                with nullcontext() if flushed else p.iommu.dont_flush():
                    p.iommu.unmap_page(d, Dfn(gfn))
        else:
            p.guest_unmap(d, Gfn(gfn), order=order, flush=flushed)
        lane.ref.update(slot, Dfn(gfn), [None] * (1 << order), flushed=flushed)

    def map(
        self,
        slot: int,
        gfn: int,
        page: int,
        *,
        order: int = 0,
        writable: bool = True,
        mode: FlushMode = FlushMode.FLUSH,
    ) -> None:
        """Map guest page ``page`` (its index in the guest's memory) at ``gfn``; order 9 aligns both down."""
        n = 1 << order
        gfn, page = (gfn % GFN_SPACE) & ~(n - 1), (page % GUEST_PAGES) & ~(n - 1)
        self._step(
            f"map d{slot} gfn {gfn:#x} -> page {page:#x} order {order} {'rw' if writable else 'r-'} {mode.value}"
        )
        if not self._usable(slot):
            return
        perms = Perm.RW if writable else Perm.R
        for lane in self._lanes(slot):
            with self._batch(lane, mode, slot, gfn, n) as flushed:
                self._set(lane, slot, gfn, self._frame(self._domain(lane, slot), page), order, perms, flushed)
        self._touch(gfn, n)

    def unmap(self, slot: int, gfn: int, *, order: int = 0, mode: FlushMode = FlushMode.FLUSH) -> None:
        n = 1 << order
        gfn = (gfn % GFN_SPACE) & ~(n - 1)
        self._step(f"unmap d{slot} gfn {gfn:#x} order {order} {mode.value}")
        if not self._usable(slot):
            return
        for lane in self._lanes(slot):
            with self._batch(lane, mode, slot, gfn, n) as flushed:
                self._clear(lane, slot, gfn, order, flushed)
        self._touch(gfn, n)

    def map_range(
        self, slot: int, gfn: int, count: int, page: int, *, writable: bool = True, mode: FlushMode = FlushMode.FLUSH
    ) -> None:
        """Map ``count`` consecutive pages from ``page`` at ``gfn``, in naturally aligned pieces."""
        count = max(1, min(count, GFN_SPACE - gfn, GUEST_PAGES - page))
        self._step(
            f"map_range d{slot} gfn {gfn:#x} x{count} -> page {page:#x} {'rw' if writable else 'r-'} {mode.value}"
        )
        if not self._usable(slot):
            return
        perms = Perm.RW if writable else Perm.R
        for lane in self._lanes(slot):
            base = self._frame(self._domain(lane, slot), page)
            with self._batch(lane, mode, slot, gfn, count) as flushed:
                for g, m, order in _chunks(gfn, base.value, count):
                    self._set(lane, slot, g, Mfn(m), order, perms, flushed)
        self._touch(gfn, count)

    def unmap_range(self, slot: int, gfn: int, count: int, *, mode: FlushMode = FlushMode.FLUSH) -> None:
        count = max(1, min(count, GFN_SPACE - gfn))
        self._step(f"unmap_range d{slot} gfn {gfn:#x} x{count} {mode.value}")
        if not self._usable(slot):
            return
        for lane in self._lanes(slot):
            with self._batch(lane, mode, slot, gfn, count) as flushed:
                for g, _m, order in _chunks(gfn, gfn, count):
                    self._clear(lane, slot, g, order, flushed)
        self._touch(gfn, count)

    def retype(self, slot: int, gfn: int, *, mode: FlushMode = FlushMode.FLUSH) -> None:
        """Flip a mapped page between read-write and read-only, keeping its frame (e.g. log-dirty)."""
        self._step(f"retype d{slot} gfn {gfn:#x} {mode.value}")
        if not self._usable(slot):
            return
        for lane in self._lanes(slot):
            entry = lane.ref.lookup(slot, Dfn(gfn))
            if entry is None:
                continue
            perms = Perm.R if entry.perms & Perm.W else Perm.RW
            with self._batch(lane, mode, slot, gfn, 1) as flushed:
                self._set(lane, slot, gfn, entry.mfn, 0, perms, flushed)
        self._touch(gfn)

    def flush(self, slot: int, gfn: int, count: int) -> None:
        """An explicit ``iotlb_flush`` of a range (it closes the windows it covers)."""
        count = max(1, count)
        self._step(f"iotlb_flush d{slot} gfn {gfn:#x} x{count}")
        if slot not in self.alive:
            return
        for lane in self._lanes(slot):
            lane.platform.iommu.iotlb_flush(self._domain(lane, slot), Dfn(gfn), count)
            lane.ref.flush(slot, Dfn(gfn), count)
        self._touch(gfn, count)

    def flush_all(self, slot: int) -> None:
        self._step(f"iotlb_flush_all d{slot}")
        if slot not in self.alive:
            return
        for lane in self._lanes(slot):
            lane.platform.iommu.iotlb_flush_all(self._domain(lane, slot))
            lane.ref.flush_all(slot)

    def lookup(self, slot: int, gfn: int) -> None:
        """``lookup_page`` must say what the reference's view says now (where the vendor has the op)."""
        self._step(f"lookup_page d{slot} gfn {gfn:#x}")
        if slot not in self.alive:
            return
        for lane in self._lanes(slot):
            p = lane.platform
            if not p.iommu.has_op("lookup_page"):
                continue
            try:
                mfn, perms = p.iommu.lookup_page(self._domain(lane, slot), Dfn(gfn))
                got: RefEntry | None = RefEntry(mfn, perms)
            except NoSuchEntry:
                got = None
            want = lane.ref.lookup(slot, Dfn(gfn))
            if got != want:
                raise self._fail(lane, f"lookup_page(d{slot}, dfn {gfn:#x}) gave {got}, the reference says {want}")
        self._touch(gfn)

    # -- devices and domains -------------------------------------------------------------------------------

    def assign(self, device: str, slot: int) -> None:
        """Give a roaming device the hardware domain holds to a guest."""
        self._step(f"assign {device} to d{slot}")
        if device not in ROAMING or not self._usable(slot):
            return
        for lane in self._lanes(slot):
            if lane.ref.owner[device] is None:
                self._assign_on(lane, device, slot)

    def _assign_on(self, lane: Lane, device: str, slot: int) -> None:
        d = self._domain(lane, slot)
        if device in lane.stuck:
            try:
                lane.platform.iommu.assign_device(d, device)
            except AlreadyExists:
                return
            raise self._fail(lane, f"{device} is attached to the hardware domain, yet it was assigned to d{slot}")
        lane.platform.iommu.assign_device(d, device)
        lane.ref.assign(device, slot)

    def _deassign_on(self, lane: Lane, device: str) -> None:
        slot = lane.ref.owner[device]
        assert slot is not None
        lane.platform.iommu.deassign_device(self._domain(lane, slot), device)
        lane.ref.deassign(device)
        lane.forget_hwdom_view(device)
        if lane.vendor in DEASSIGN_ATTACHES_TO_HWDOM:
            lane.stuck.add(device)

    def deassign(self, device: str) -> None:
        """Give a roaming device back to the hardware domain."""
        self._step(f"deassign {device}")
        if device not in ROAMING:
            return
        for lane in self._lanes():
            if lane.ref.owner[device] is not None:
                self._deassign_on(lane, device)

    def move(self, device: str, slot: int) -> None:
        """Reassign a roaming device from one guest to another (through the hardware domain, as Xen does)."""
        self._step(f"move {device} to d{slot}")
        if device not in ROAMING or not self._usable(slot):
            return
        for lane in self._lanes(slot):
            old = lane.ref.owner[device]
            if old is None or old == slot:
                continue
            self._deassign_on(lane, device)
            self._assign_on(lane, device, slot)

    def crash(self, slot: int) -> None:
        self._step(f"crash d{slot}")
        if not self._usable(slot):
            return
        for lane in self._lanes(slot):
            self._domain(lane, slot).crash("differential state machine")
            lane.ref.crash(slot)
        self.crashed.add(slot)

    def destroy(self, slot: int) -> None:
        self._step(f"destroy d{slot}")
        if slot not in self.alive:
            return
        for lane in self._lanes(slot):
            returned = lane.ref.devices_of(slot)
            lane.platform.destroy(self._domain(lane, slot))
            lane.ref.destroy(slot)
            for device in returned:
                lane.forget_hwdom_view(device)
        self.alive.discard(slot)
        self.crashed.discard(slot)

    def create(self, slot: int) -> None:
        """A new guest in a slot that was destroyed (same domain id, fresh memory, its anchor device)."""
        self._step(f"create d{slot}")
        if slot in self.alive:
            return
        for lane in self._lanes(slot):
            self._create_on(lane, slot)
        self.alive.add(slot)

    # -- device DMA ------------------------------------------------------------------------------------

    def dma_read(self, device: str, gfn: int) -> None:
        """A real read of the page's first bytes: a guest page's stamp names the frame it came from."""
        self._step(f"dma read {device} gfn {gfn:#x}")
        for lane in self._lanes():
            p = lane.platform
            p.machine.clock.advance(_FAULT_SPACING_NS)
            owner = lane.ref.owner[device]
            frame = self._probe(lane, device, gfn, Perm.R) if owner is None else None
            try:
                data = p.machine.dma.read(lane.devices[device], Daddr(gfn << PAGE_SHIFT), 16)
            except DmaFault:
                got = None
            else:
                got = Mfn(int.from_bytes(data[:8], "little") ^ _STAMP)
                if owner is None:  # no stamps in the hardware domain's pages: compare with the frame itself
                    if frame is None or data != p.machine.memory.read_bytes(frame.value << PAGE_SHIFT, 16):
                        raise self._fail(lane, f"{device} (hardware domain) read other bytes than {frame!r} holds")
                    got = frame
            self._expect(lane, device, gfn, Perm.R, got, "DMA read")
        self._touch(gfn)

    def dma_write(self, device: str, gfn: int, offset: int) -> None:
        """A real write of a fresh tag: it must land in one frame the reference allows, and only there."""
        self._step(f"dma write {device} gfn {gfn:#x} +{offset:#x}")
        offset = 8 + (offset % 510) * 8
        self._tag += 1
        tag = (0xD1A0_0000_0000_0000 | self._tag).to_bytes(8, "little")
        for lane in self._lanes():
            p = lane.platform
            p.machine.clock.advance(_FAULT_SPACING_NS)
            slot = lane.ref.owner[device]
            if slot is None:
                continue  # the hardware domain may reach hypervisor memory in relaxed mode: never write there
            try:
                p.machine.dma.write(lane.devices[device], Daddr((gfn << PAGE_SHIFT) + offset), tag)
            except DmaFault:
                self._expect(lane, device, gfn, Perm.W, None, "DMA write")
                continue
            allowed = {m for m in lane.ref.outcomes(slot, Dfn(gfn), Perm.W) if m is not None}
            landed = [m for m in allowed if p.machine.memory.read_bytes((m.value << PAGE_SHIFT) + offset, 8) == tag]
            if len(landed) != 1:
                where = ", ".join(repr(m) for m in sorted(allowed, key=lambda m: m.value)) or "nowhere (a fault)"
                raise self._fail(
                    lane, f"{device} wrote dfn {gfn:#x}: the tag is in {len(landed)} of the allowed frames ({where})"
                )
        self._touch(gfn)

    # -- the check ---------------------------------------------------------------------------------------

    def _probe(self, lane: Lane, device: str, dfn: int, access: Perm) -> Mfn | None:
        m = lane.platform.machine
        m.clock.advance(_FAULT_SPACING_NS)
        lane.probes += 1
        try:
            return Mfn(m.dma.translate(lane.devices[device], dfn << PAGE_SHIFT, access) >> PAGE_SHIFT)
        except DmaFault:
            return None

    def _expect(self, lane: Lane, device: str, dfn: int, access: Perm, got: Mfn | None, what: str) -> None:
        owner = lane.ref.owner[device]
        name = "write" if access & Perm.W else "read"
        if owner is None:
            key = (device, dfn, int(access))
            first = lane.hwdom_view.setdefault(key, None if got is None else got.value)
            if first != (None if got is None else got.value):
                raise self._fail(lane, f"{what}: the hardware domain's view of dfn {dfn:#x} ({name}) changed")
            return
        allowed = lane.ref.outcomes(owner, Dfn(dfn), access)
        if got not in allowed:
            said = ", ".join("fault" if m is None else repr(m) for m in allowed)
            seen = "a fault" if got is None else repr(got)
            pending = " (a flush is owed)" if lane.ref.domain(owner).stale.get(Dfn(dfn)) else ""
            raise self._fail(
                lane, f"{what}: {device} in d{owner} {name} of dfn {dfn:#x} gave {seen}; allowed: {said}{pending}"
            )

    def probe_dfns(self) -> list[int]:
        """The Dfns ``verify`` probes now: those touched recently and a few drawn for this step."""
        rnd = random.Random(self.steps)
        return sorted(set(self.recent) | {rnd.randrange(GFN_SPACE) for _ in range(_SAMPLED)})

    def verify(self) -> None:
        """Every device's view of the probed Dfns is allowed by the reference; the isolation check passes."""
        dfns = self.probe_dfns()
        # the hardware domain's devices only need watching for a change: the newest Dfns are enough
        few = sorted(set(list(self.recent)[-_HWDOM_PROBES:]) | set(dfns[:1]))
        for lane in self.lanes:
            for device in DEVICES:
                for dfn in dfns if lane.ref.owner[device] is not None else few:
                    for access in (Perm.R, Perm.W):
                        self._expect(lane, device, dfn, access, self._probe(lane, device, dfn, access), "probe")
            if self.check_isolation:
                report = check(lane.platform)
                if report.violations:
                    said = "; ".join(v.message for v in report.violations[:3])
                    raise self._fail(lane, f"isolation check: {len(report.violations)} violation(s): {said}")


# -- the Hypothesis state machine ------------------------------------------------------------------------

_HOT = (0, 1, 2, 7, 0x1FF, 0x200, 0x201, 0x3FF, 0x400, 0x401, 0x5FF, 0x600, 0x7FF)
GFNS = st.one_of(st.sampled_from(_HOT), st.integers(0, GFN_SPACE - 1))
PAGES = st.one_of(st.sampled_from((0, 1, 0x1FF, 0x200, 0x3FF)), st.integers(0, GUEST_PAGES - 1))
MODES = st.sampled_from(list(FlushMode))
SLOT = st.sampled_from(SLOTS)
ROAMER = st.sampled_from(ROAMING)
ANY_DEVICE = st.sampled_from(DEVICES)
COUNTS = st.one_of(st.integers(1, 8), st.integers(9, 600))


def differential_machine(
    vendors: Sequence[str] | None = None, *, quirks: Sequence[str] = (), **options: Any
) -> type[RuleBasedStateMachine]:
    """A state machine class running ``Differential(vendors, quirks=quirks, **options)``.

    Run it with ``hypothesis.stateful.run_state_machine_as_test(cls, settings=...)`` or expose its
    ``TestCase`` to pytest.
    """

    class DifferentialMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.diff = Differential(vendors, quirks=quirks, **options)

        @rule(slot=SLOT, gfn=GFNS, page=PAGES, order=st.sampled_from((0, 0, 0, 9)), writable=st.booleans(), mode=MODES)
        def map(self, slot: int, gfn: int, page: int, order: int, writable: bool, mode: FlushMode) -> None:
            self.diff.map(self.diff.usable_slot(slot), gfn, page, order=order, writable=writable, mode=mode)

        @rule(slot=SLOT, gfn=GFNS, order=st.sampled_from((0, 0, 0, 9)), mode=MODES)
        def unmap(self, slot: int, gfn: int, order: int, mode: FlushMode) -> None:
            self.diff.unmap(self.diff.usable_slot(slot), gfn, order=order, mode=mode)

        @rule(slot=SLOT, gfn=GFNS, count=COUNTS, page=PAGES, writable=st.booleans(), mode=MODES)
        def map_range(self, slot: int, gfn: int, count: int, page: int, writable: bool, mode: FlushMode) -> None:
            self.diff.map_range(self.diff.usable_slot(slot), gfn, count, page, writable=writable, mode=mode)

        @rule(slot=SLOT, gfn=GFNS, count=COUNTS, mode=MODES)
        def unmap_range(self, slot: int, gfn: int, count: int, mode: FlushMode) -> None:
            self.diff.unmap_range(self.diff.usable_slot(slot), gfn, count, mode=mode)

        @rule(slot=SLOT, gfn=GFNS, mode=MODES)
        def retype(self, slot: int, gfn: int, mode: FlushMode) -> None:
            self.diff.retype(self.diff.usable_slot(slot), gfn, mode=mode)

        @rule(slot=SLOT, gfn=GFNS, count=COUNTS)
        def flush(self, slot: int, gfn: int, count: int) -> None:
            self.diff.flush(slot, gfn, count)

        @rule(slot=SLOT)
        def flush_all(self, slot: int) -> None:
            self.diff.flush_all(slot)

        @rule(slot=SLOT, gfn=GFNS)
        def lookup(self, slot: int, gfn: int) -> None:
            self.diff.lookup(slot, gfn)

        @rule(device=ANY_DEVICE, gfn=GFNS)
        def dma_read(self, device: str, gfn: int) -> None:
            self.diff.dma_read(device, gfn)

        @rule(device=ANY_DEVICE, gfn=GFNS, offset=st.integers(0, 509))
        def dma_write(self, device: str, gfn: int, offset: int) -> None:
            self.diff.dma_write(device, gfn, offset)

        @rule(device=ROAMER, slot=SLOT)
        def assign(self, device: str, slot: int) -> None:
            self.diff.assign(device, self.diff.usable_slot(slot))

        @rule(device=ROAMER)
        def deassign(self, device: str) -> None:
            self.diff.deassign(device)

        @rule(device=ROAMER, slot=SLOT)
        def move(self, device: str, slot: int) -> None:
            self.diff.move(device, self.diff.usable_slot(slot))

        @rule(slot=SLOT)
        def crash(self, slot: int) -> None:
            self.diff.crash(slot)

        @rule(slot=SLOT)
        def destroy(self, slot: int) -> None:
            self.diff.destroy(slot)

        @precondition(lambda self: len(self.diff.alive) < len(SLOTS))
        @rule(slot=SLOT)
        def create(self, slot: int) -> None:
            self.diff.create(slot)

        @invariant()
        def every_view_is_allowed(self) -> None:
            self.diff.verify()

    DifferentialMachine.__name__ = "DifferentialMachine_" + "_".join(vendors or ["all"])
    return DifferentialMachine


#: What a test passes to replay a fixed story: (method name, positional args, keyword args).
Story = Sequence[tuple[str, tuple[Any, ...], dict[str, Any]]]


def replay(diff: Differential, story: Story, *, verify: Callable[[Differential], None] | None = None) -> None:
    """Apply a fixed list of operations, verifying after each (deterministic, for regression tests)."""
    check_step = verify or Differential.verify
    check_step(diff)
    for name, args, kwargs in story:
        getattr(diff, name)(*args, **kwargs)
        check_step(diff)
