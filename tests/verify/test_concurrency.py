"""Several threads changing one domain's DMA view while its device does DMA.

Workers map and unmap disjoint ranges of one guest that share their page tables; a DMA thread reads
from the same region all the while.  With the mapping lock (the p2m lock on ARM, where the SMMU walks the
p2m) the final tables equal those of the same work done sequentially, nothing raises, the isolation
check is clean and no table page is lost.  Without it, a test-only hook that holds two threads between
"this table is missing" and "here is the new table" (a barrier in the allocator) makes the lost update
certain: one thread's new table overwrites the other's, and the other's mapping is gone.
"""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import pytest
from sweep_helpers import DISK, NIC, VENDORS, Rig, booted, owners_of

from iommusim.frames import Dfn, Gfn, Mfn
from iommusim.iommu.config import IommuConfig
from iommusim.machine.allocator import PageAllocator
from iommusim.machine.p2m import P2mType
from iommusim.perms import Perm
from iommusim.tools.check import check

BASE = 0x80000  # 2 GiB up: no tables yet, so the workers race to create them
SPAN = 128  # dfns per worker; four workers share one leaf table

Op = Callable[[Rig], object]


# -- what the workers do --------------------------------------------------------------------------------------


def _map(rig: Rig, dfn: int, gfn: int, count: int = 1) -> None:
    mfn = rig.mfn(rig.g, gfn)
    if rig.vendor == "smmu":  # the SMMU walks the p2m: change it as Xen's ARM code does
        p2m = rig.g.p2m
        assert p2m is not None
        if count == 1:
            p2m.set_entry(Gfn(dfn), mfn, 0, P2mType.RAM_RW)
        else:
            rig.map_guest_range(dfn, mfn, count)
    elif count == 1:
        rig.p.iommu.map_page(rig.g, Dfn(dfn), mfn, Perm.RW)
    else:
        rig.p.iommu.map(rig.g, Dfn(dfn), mfn, count, Perm.RW)


def _unmap(rig: Rig, dfn: int, count: int = 1) -> None:
    if rig.vendor == "smmu":
        from iommusim.arm.p2m import ArmP2m

        p2m = rig.g.p2m
        assert isinstance(p2m, ArmP2m)
        p2m.remove_mapping(Gfn(dfn), count)
    elif count == 1:
        rig.p.iommu.unmap_page(rig.g, Dfn(dfn))
    else:
        rig.p.iommu.unmap(rig.g, Dfn(dfn), count)


def worker_ops(k: int) -> list[Op]:
    """Worker k's work on its own dfns [BASE + k*SPAN, +SPAN), mapping guest frames k*SPAN onwards."""
    lo, g = BASE + k * SPAN, k * SPAN
    ops: list[Op] = [lambda r, i=i: _map(r, lo + i, g + i) for i in range(48)]
    ops.append(lambda r: _map(r, lo + 48, g + 48, 64))
    ops += [lambda r, i=i: _unmap(r, lo + i) for i in range(0, 48, 3)]
    ops.append(lambda r: _unmap(r, lo + 100, 10))
    ops += [lambda r, i=i: _map(r, lo + i, g + SPAN - 1 - i) for i in range(0, 12, 3)]  # remapped elsewhere
    ops.append(lambda r: _map(r, lo + 112, g + 112, 16))
    return ops


def _run_sequential(rig: Rig, workers: int) -> None:
    for k in range(workers):
        for op in worker_ops(k):
            op(rig)


def _run_concurrent(rig: Rig, workers: int, *, dma: bool) -> list[BaseException]:
    """Every worker in its own thread (released together), plus a DMA thread; the exceptions they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(workers + (1 if dma else 0))
    done = threading.Event()

    def work(k: int) -> None:
        try:
            start.wait()
            for op in worker_ops(k):
                op(rig)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    def device() -> None:
        rng = random.Random(7)
        disk = rig.p.device(DISK)
        try:
            start.wait()
            while not done.is_set():
                dfn = BASE + rng.randrange(workers * SPAN)
                if rig.dma_write(DISK, dfn, b"disk") is False:  # a fault is fine, an exception is not
                    disk.bus_master = True  # Xen turns it off after repeated faults; the driver insists
                rig.dma_read(DISK, dfn)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
    dev = threading.Thread(target=device) if dma else None
    for t in threads + ([dev] if dev else []):
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    if dev is not None:
        dev.join(60)
    assert not any(t.is_alive() for t in threads), "a worker hangs"
    return errors


def _result(rig: Rig) -> tuple[list[tuple[int, int, int, int]], dict[str, int], dict[int, bytes | None]]:
    """The tables read back from memory, the domain's table pages, and what the NIC reads."""
    region = range(BASE - 1, BASE + 4 * SPAN + 1)
    tables = [m for m in rig.mappings(rig.g) if m[0] + m[1] > region.start and m[0] < region.stop]
    seen = {dfn: rig.dma_read(NIC, dfn, 4, offset=8) for dfn in region}
    return tables, owners_of(rig.alloc, 1), seen


def _fresh(vendor: str, *, lock: bool = True) -> Rig:
    """The guest has the NIC, whose view the tests compare, and the disk, which does DMA during the run."""
    rig = booted(vendor, config=IommuConfig(mapping_lock=lock))
    rig.p.iommu.assign_device(rig.g, DISK)
    for gfn in range(4 * SPAN):
        rig.p.machine.memory.write_bytes((rig.mfn(rig.g, gfn).value << 12) + 8, gfn.to_bytes(4, "little"))
    if not lock and vendor == "smmu":
        _unlock_p2m(rig)
    return rig


def _unlock_p2m(rig: Rig) -> None:
    """On ARM the p2m lock is what serialises changes to the table the SMMU walks: take it away."""
    from iommusim.arm.p2m import ArmP2m

    p2m = rig.g.p2m
    assert isinstance(p2m, ArmP2m)
    p2m._lock = nullcontext()  # type: ignore[assignment]  # test-only: show that the lock is needed


@contextmanager
def switch_often() -> Iterator[None]:
    """Let the interpreter switch threads every few microseconds: races get many chances to show."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


@contextmanager
def meet_at_first_table(alloc: PageAllocator, owner_prefix: str, timeout: float) -> Iterator[dict[str, Any]]:
    """Hold each of two threads right after its first table allocation until the other has made one too.

    A thread allocates a table only after it found the entry empty, and writes the entry after the
    allocation returns, so two threads meeting here are both between the two: without a lock both hook
    their own table into the same entry.  With the lock the second cannot get there, the first waits
    ``timeout`` seconds, and both go on.
    """
    barrier = threading.Barrier(2, timeout=timeout)
    local = threading.local()
    original = alloc.alloc
    info: dict[str, Any] = {"met": 0, "alone": 0}

    def alloc_and_meet(owner: str, count: int = 1, *, align_order: int = 0) -> Mfn:
        mfn = original(owner, count, align_order=align_order)
        if owner.startswith(owner_prefix) and not getattr(local, "done", False):
            local.done = True
            try:
                barrier.wait()
                info["met"] += 1
            except threading.BrokenBarrierError:
                info["alone"] += 1
        return mfn

    alloc.alloc = alloc_and_meet  # type: ignore[method-assign]
    try:
        yield info
    finally:
        alloc.alloc = original  # type: ignore[method-assign]


# -- the tests ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_concurrent_workers_and_dma_equal_the_sequential_result(vendor: str) -> None:
    sequential = _fresh(vendor)
    _run_sequential(sequential, 4)
    want = _result(sequential)
    assert want[0], "the workers mapped nothing"

    rig = _fresh(vendor)
    with switch_often():
        errors = _run_concurrent(rig, 4, dma=True)
    assert errors == []
    got = _result(rig)
    assert got[0] == want[0]  # the same translations, read from the tables in memory
    assert got[1] == want[1]  # the same number of table pages: none lost, none leaked
    assert got[2] == want[2]  # and the NIC sees exactly that
    report = check(rig.p)
    assert report.ok, report.violations
    rig.p.destroy(rig.g)
    assert owners_of(rig.alloc, 1) == {}


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("lock", [True, False], ids=["locked", "unlocked"])
def test_two_threads_creating_one_table(vendor: str, lock: bool) -> None:
    """The lock is needed: without it the race this hook forces loses one thread's mapping, every time."""
    sequential = _fresh(vendor)
    _run_sequential(sequential, 2)
    want = _result(sequential)

    rig = _fresh(vendor, lock=lock)
    with meet_at_first_table(rig.alloc, "d1:", timeout=0.2 if lock else 10.0) as met:
        errors = _run_concurrent(rig, 2, dma=False)
    assert errors == []
    got = _result(rig)
    report = check(rig.p)
    if lock:
        # the second thread never got in while the first held the lock (and then found the table made)
        assert met["met"] == 0 and met["alone"] >= 1
        assert got == want
        assert report.ok, report.violations
    else:
        assert met == {"met": 2, "alone": 0}  # both threads were between "missing" and "hooked in"
        assert got[0] != want[0]  # a mapping is lost ...
        assert not report.ok  # ... and the check finds the orphaned table that holds it
        assert "orphan" in " ".join(report.kinds()), report.violations


def _cache_of(rig: Rig) -> Any:
    """The unit's translation cache (IOTLB, or the SMMU's TLB) that the NIC's walks fill."""
    unit = rig.p.units[0]
    return unit.iotlb if hasattr(unit, "iotlb") else unit.tlb  # type: ignore[attr-defined]


@pytest.mark.parametrize("vendor", VENDORS)
def test_a_walk_in_flight_does_not_outlive_the_invalidation(vendor: str) -> None:
    """Hardware finishes a walk that started before an invalidation, or drops it; it never caches it after.

    The device's walk reads the old entry; before it stores the translation, another CPU unmaps the
    page and flushes.  If the flush could complete in between, the walk would cache a translation
    nobody will ever flush again: the device keeps reaching a page its domain no longer maps.  The hook
    holds the walk between reading and caching until the unmap is done (or a short while, if the unit
    makes the unmap wait for the walk, as it must).
    """
    rig = _fresh(vendor)
    target = BASE + 7
    _map(rig, target, 7)
    cache = _cache_of(rig)
    insert = cache.insert
    walked, changed = threading.Event(), threading.Event()
    hold = threading.local()

    def slow_insert(entry: Any) -> None:
        if getattr(hold, "on", False):
            walked.set()
            changed.wait(0.3)
        insert(entry)

    def dma() -> None:
        hold.on = True
        rig.dma_read(NIC, target)

    def unmap() -> None:
        walked.wait(10)
        _unmap(rig, target)
        changed.set()

    cache.insert = slow_insert
    threads = [threading.Thread(target=dma), threading.Thread(target=unmap)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    cache.insert = insert
    assert walked.is_set() and changed.is_set()
    assert rig.lookup(rig.g, target) is None
    report = check(rig.p)
    assert report.ok, report.violations
    assert rig.dma_read(NIC, target) is None  # the device lost the page with the unmap


def _two_waiters(first: Callable[[], object], second: Callable[[], object]) -> list[BaseException]:
    """Run ``first`` and, once it has signalled (through the hooks), ``second``; what each raised."""
    errors: list[BaseException] = []

    def guard(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # reported by the test
                errors.append(exc)

        return run

    a, b = threading.Thread(target=guard(first), name="A"), threading.Thread(target=guard(second), name="B")
    a.start()
    b.start()
    a.join(20)
    b.join(20)
    return errors


@pytest.mark.skipif("vtd" not in VENDORS, reason="VT-d is not installed")
def test_vtd_invalidation_waits_do_not_share_a_completion() -> None:
    """Regression: two CPUs waiting on one unit used one status slot; the second's reset hid the first's done.

    A's wait descriptor has completed (status 1) when B, starting its own wait, resets the slot to 0 and
    has not queued its descriptor yet; A then polls 0 until it times out.  The hooks hold A before its
    poll and B before it queues, so that this happens whenever nothing keeps B out of A's wait.
    """
    rig = _fresh("vtd")
    unit = rig.p.ops.units[0]  # type: ignore[attr-defined]
    poll, put = unit._poll, unit._qi_put
    a_polling, b_reset, a_done = threading.Event(), threading.Event(), threading.Event()

    def held_poll(what: str, done: object, timeout_ms: int = 1) -> None:
        if threading.current_thread().name == "A" and what.startswith("invalidation wait"):
            a_polling.set()
            b_reset.wait(0.3)
        poll(what, done, timeout_ms)

    def held_put(lo: int, hi: int) -> None:
        if threading.current_thread().name == "B" and not b_reset.is_set():
            b_reset.set()  # B has reset the status slot (qi_wait does that first) and queues now
            a_done.wait(0.3)
        put(lo, hi)

    def first() -> None:
        try:
            unit.qi_wait()
        finally:
            a_done.set()

    def second() -> None:
        a_polling.wait(5)
        unit.qi_wait()

    unit._poll, unit._qi_put = held_poll, held_put
    errors = _two_waiters(first, second)
    assert errors == []


@pytest.mark.skipif("amd" not in VENDORS, reason="AMD-Vi is not installed")
def test_amd_completion_waits_do_not_share_a_semaphore() -> None:
    """Regression: B's completion wait reset the semaphore A was polling for, so A's wait timed out."""
    rig = _fresh("amd")
    unit = rig.p.ops.units[0]  # type: ignore[attr-defined]
    send = unit.send
    a_sent, b_reset, a_done = threading.Event(), threading.Event(), threading.Event()

    def held_send(cmd: Any) -> bool:
        me = threading.current_thread().name
        if me == "B" and not b_reset.is_set():
            b_reset.set()  # B has bumped the sequence and cleared the semaphore, and sends now
            a_done.wait(0.3)
        ok = bool(send(cmd))
        if me == "A" and not a_sent.is_set():
            a_sent.set()
            b_reset.wait(0.3)  # A's completion has been stored; hold A before it polls
        return ok

    results: list[bool] = []

    def first() -> None:
        try:
            results.append(unit.completion_wait())
        finally:
            a_done.set()

    def second() -> None:
        a_sent.wait(5)
        results.append(unit.completion_wait())

    unit.send = held_send
    timeouts = unit.stats.get("completion_wait_timeouts", 0)
    errors = _two_waiters(first, second)
    assert errors == []
    assert results == [True, True]
    assert unit.stats.get("completion_wait_timeouts", 0) == timeouts


@pytest.mark.slow
@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("round_", range(10))
def test_concurrent_workers_repeatedly(vendor: str, round_: int) -> None:
    """More rounds of the concurrent run, each with different thread timings."""
    test_concurrent_workers_and_dma_equal_the_sequential_result(vendor)
