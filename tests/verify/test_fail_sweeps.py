"""Fail the 1st, 2nd, ... Nth hypervisor allocation of every IOMMU operation, on every vendor.

Each sweep rebuilds the same situation for every N, makes the N-th allocation fail and holds the outcome
to Xen's policy: the right error (ENOMEM, or EFAULT where Xen's AMD code turns a failed table allocation
into one), the domain crashed exactly where Xen crashes it, everything mapped before still mapped (read
back from the tables in memory and through device DMA), the isolation check clean, and once the domain
is gone not one page of it left in the allocator's accounting.  Each sweep also asserts which kinds of
structure it made fail, so that a change that adds, moves or removes an allocation point shows here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest
from sweep_helpers import DISK, GPU, NIC, VENDORS, Rig, booted, owners_of, platform, sample_view

from iommusim.errors import BadAddress, HypervisorBug, IommuError, NoDevice, OutOfMemory
from iommusim.frames import Dfn
from iommusim.iommu.config import IommuConfig
from iommusim.machine.domain import Domain
from iommusim.perms import Perm
from iommusim.tools.check import check
from iommusim.verify.sweep import Attempt, SweepReport, each_kind, every_point, sweep

#: What a failed table allocation raises from a guest's map or unmap.  AMD's map turns a failed walk or
#: paging-mode update into EFAULT (facts 7.5); its root allocation and everything else is ENOMEM.
MAP_ERRORS: dict[str, tuple[type[IommuError], ...]] = {
    "vtd": (OutOfMemory,),
    "amd": (OutOfMemory, BadAddress),
    "smmu": (OutOfMemory,),
}
#: Does a failed map/unmap of a guest crash it?  On x86 the p2m sync goes through the generic wrappers,
#: which crash every domain but the hardware domain (facts 5.5), and AMD's driver crashes it itself too.
#: On ARM the SMMU walks the p2m itself and a failed p2m_set_entry is only returned to the caller.
CRASHES_ON_MAP = {"vtd": True, "amd": True, "smmu": False}

FAR = 0x40000  # a guest frame 1 GiB up, where no tables exist yet
BIG = 0x80000  # 2 GiB up: a 2 MiB-aligned region without tables
SAMPLE = (
    0,
    1,
    2,
    0x1FF,
    0x200,
    0x204,
    0x7FF,
    FAR,
    BIG,
    BIG + 3,
    BIG + 4,
    BIG + 5,
    BIG + 0x1FF,
    BIG + 0x3EA,
    BIG + 0x5FF,
)
MARKED = (1, 2, 0x1FF, 0x200, 0x204, 0x205, 0x3EA)

Select = Callable[[Sequence[str]], Iterable[int]]


def marker(gfn: int) -> bytes:
    return f"g{gfn:07x}".encode()


def run(
    vendor: str,
    name: str,
    setup: Callable[[], Rig],
    op: Callable[[Rig], object],
    check_fn: Callable[[Attempt[Rig]], None],
    select: Select = every_point,
) -> SweepReport[Rig]:
    return sweep(setup, op, check_fn, allocator=lambda r: r.alloc, name=f"{vendor}/{name}", select=select)


def assert_clean(rig: Rig, what: str) -> None:
    report = check(rig.p)
    assert report.ok, f"{what}: {report.violations}"


# -- a guest's map and unmap ---------------------------------------------------------------------------------


def guest_rig(vendor: str, prepare: Callable[[Rig], None] | None = None, config: IommuConfig | None = None) -> Rig:
    """A guest with the NIC, recognisable bytes in some of its frames, and a record of what it looks like."""
    rig = booted(vendor, config=config)
    for gfn in MARKED:
        rig.p.machine.memory.write_bytes(rig.mfn(rig.g, gfn).value << 12, marker(gfn))
    if prepare is not None:
        prepare(rig)
    rig.notes["tables"] = rig.mappings(rig.g)
    rig.notes["view"] = sample_view(rig, NIC, SAMPLE)
    rig.notes["in_use"] = dict(rig.alloc.in_use)
    return rig


def guest_check(
    vendor: str, after_success: Callable[[Rig], None], *, all_or_nothing: bool = True
) -> Callable[[Attempt[Rig]], None]:
    """What every guest map/unmap sweep holds each outcome to.

    ``all_or_nothing=False`` allows a failed operation to keep the tables it allocated (still reachable,
    freed with the domain), as the seed's AMD unmap does.
    """
    reference: dict[str, Any] = {}

    def check_attempt(a: Attempt[Rig]) -> None:
        rig, g = a.state, a.state.g
        what = f"{vendor} N={a.nth} ({a.owner})"
        if a.failed:
            assert isinstance(a.error, MAP_ERRORS[vendor]), f"{what}: {a.error!r}"
            assert g.crashed == CRASHES_ON_MAP[vendor], what
            # all or nothing: the tables, what the device reaches and the accounting are as before
            assert rig.mappings(g) == rig.notes["tables"], what
            assert sample_view(rig, NIC, SAMPLE) == rig.notes["view"], what
            if all_or_nothing:
                assert dict(rig.alloc.in_use) == rig.notes["in_use"], what
        else:
            assert a.error is None, f"{what}: {a.error!r}"
            assert not g.crashed, what
            after_success(rig)
        assert_clean(rig, what)
        rig.p.destroy(g)
        assert owners_of(rig.alloc, 1) == {}, what
        assert rig.p.iommu.pending_frees == 0, what
        if a.nth == 0:
            reference["in_use"] = dict(rig.alloc.in_use)
        assert dict(rig.alloc.in_use) == reference["in_use"], what

    return check_attempt


def maps(rig: Rig, dfn: int, gfn: int) -> None:
    """``dfn`` translates to the guest's frame ``gfn``, in the tables and for the NIC."""
    got = rig.lookup(rig.g, dfn)
    assert got is not None and got[0] == rig.mfn(rig.g, gfn).value and got[1] == Perm.RW, (dfn, got)
    want = marker(gfn) if gfn in MARKED else bytes(8)
    assert rig.dma_read(NIC, dfn) == want


def unmapped(rig: Rig, dfn: int) -> None:
    assert rig.lookup(rig.g, dfn) is None
    assert rig.dma_read(NIC, dfn) is None


def report_reaches(report: SweepReport[Rig], kinds: set[str], minimum: int) -> None:
    """The sweep made every kind of structure fail, and tried at least ``minimum`` values of N."""
    assert report.failed_kinds == kinds, report.points
    assert len(report.tried) >= minimum, report.points


#: Kinds of table a guest's map allocates, per vendor.
GUEST_TABLES = {"vtd": {"iommu-pt"}, "amd": {"amd-pt"}, "smmu": {"p2m"}}


@pytest.mark.parametrize("vendor", VENDORS)
def test_map_one_page_where_no_tables_exist(vendor: str) -> None:
    report = run(
        vendor,
        "map-page",
        lambda: guest_rig(vendor),
        lambda r: r.map_guest(FAR, r.mfn(r.g, 1)),
        guest_check(vendor, lambda r: maps(r, FAR, 1)),
    )
    report_reaches(report, GUEST_TABLES[vendor], 2)  # at least a directory and a leaf table


@pytest.mark.parametrize("vendor", VENDORS)
def test_map_a_superpage(vendor: str) -> None:
    def after(r: Rig) -> None:
        maps(r, BIG, 0x200)
        maps(r, BIG + 0x1FF, 0x3FF)
        assert r.lookup(r.g, BIG + 4) == (r.mfn(r.g, 0x204).value, Perm.RW, 21)  # one 2 MiB leaf

    report = run(
        vendor,
        "map-2M",
        lambda: guest_rig(vendor),
        lambda r: r.map_guest(BIG, r.mfn(r.g, 0x200), 9),
        guest_check(vendor, after),
    )
    report_reaches(report, GUEST_TABLES[vendor], 1)


@pytest.mark.parametrize("vendor", VENDORS)
def test_map_an_unaligned_range(vendor: str) -> None:
    """509 small pages then two superpages: the range form, undone as a whole when it fails.

    The range ends 2 MiB-aligned because ARM's p2m_set_entry only writes a block where the remaining
    count is aligned too.
    """

    def after(r: Rig) -> None:
        for gfn in (3, 0x1FF, 0x200, 0x3EA, 0x5FF):
            maps(r, BIG + gfn, gfn)
        unmapped(r, BIG + 0x600)
        unmapped(r, BIG + 2)
        assert r.lookup(r.g, BIG + 0x204) == (r.mfn(r.g, 0x204).value, Perm.RW, 21)
        assert r.lookup(r.g, BIG + 0x404) == (r.mfn(r.g, 0x404).value, Perm.RW, 21)

    report = run(
        vendor,
        "map-range",
        lambda: guest_rig(vendor),
        lambda r: r.map_guest_range(BIG + 3, r.mfn(r.g, 3), 0x5FD),
        guest_check(vendor, after),
    )
    report_reaches(report, GUEST_TABLES[vendor], 2)


@pytest.mark.parametrize("vendor", VENDORS)
def test_unmap_inside_a_superpage(vendor: str) -> None:
    """Unmapping 4 KiB of a 2 MiB leaf needs a new table: if it cannot have one, the superpage stays whole."""

    def prepare(r: Rig) -> None:
        r.map_guest(BIG, r.mfn(r.g, 0x200), 9)
        assert r.lookup(r.g, BIG + 5) == (r.mfn(r.g, 0x205).value, Perm.RW, 21)

    def after(r: Rig) -> None:
        unmapped(r, BIG + 5)
        maps(r, BIG + 4, 0x204)
        assert r.lookup(r.g, BIG + 4) == (r.mfn(r.g, 0x204).value, Perm.RW, 12)  # split

    report = run(
        vendor,
        "unmap-split",
        lambda: guest_rig(vendor, prepare),
        lambda r: r.unmap_guest(BIG + 5),
        guest_check(vendor, after),
    )
    report_reaches(report, GUEST_TABLES[vendor], 1)


@pytest.mark.parametrize("vendor", [v for v in VENDORS if v == "amd"])
def test_seed_amd_unmap_grows_the_tree(vendor: str) -> None:
    """With the seed's unmap (quirk amd-unmap-grows-tree) an unmap of a never-mapped frame allocates.

    (A pass-through hardware domain: with any AMD quirk on, the driver maps page by page as the seed did,
    and a 4 GiB identity map would take minutes.)
    """
    cfg = IommuConfig(hwdom_passthrough=True, quirks=frozenset({"amd-unmap-grows-tree"}))
    report = run(
        vendor,
        "unmap-seed",
        lambda: guest_rig(vendor, config=cfg),
        lambda r: r.p.iommu.unmap_page(r.g, Dfn(FAR)),
        guest_check(vendor, lambda r: unmapped(r, FAR), all_or_nothing=False),
    )
    report_reaches(report, {"amd-pt"}, 1)


# -- device assignment and deassignment ----------------------------------------------------------------------


#: What assigning the NIC to a guest without tables allocates: its tables (populated from its memory) on
#: x86; on ARM, where the p2m is the table, a context bank and the SMMU's stream-match record.
ASSIGN_KINDS = {"vtd": {"iommu-pt"}, "amd": {"amd-pt"}, "smmu": {"smmu-ctx", "smrs"}}
#: Assignment builds the tables through the vendor's map directly (facts 5.3/5.4): VT-d's does not crash,
#: AMD's crashes the domain itself (facts 7.5), the SMMU's context set-up only returns the error.
CRASHES_ON_ASSIGN = {"vtd": False, "amd": True, "smmu": False}


def _nic_is_hwdoms(rig: Rig, before: dict[int, bytes | None]) -> None:
    assert rig.p.device(NIC).owner is rig.hwdom
    assert sample_view(rig, NIC, before) == before


@pytest.mark.parametrize("vendor", VENDORS)
def test_assign_a_device(vendor: str) -> None:
    probe = (0x120, 0x121, 0x300)  # hardware-domain frames, then (after assignment) guest frames

    def setup() -> Rig:
        rig = booted(vendor, assign=False)
        rig.notes["view"] = sample_view(rig, NIC, probe)
        rig.notes["in_use"] = dict(rig.alloc.in_use)
        return rig

    reference: dict[str, Any] = {}

    def check_attempt(a: Attempt[Rig]) -> None:
        rig, what = a.state, f"{vendor} N={a.nth} ({a.owner})"
        if a.failed:
            assert isinstance(a.error, MAP_ERRORS[vendor]), f"{what}: {a.error!r}"
            assert rig.g.crashed == CRASHES_ON_ASSIGN[vendor], what
            _nic_is_hwdoms(rig, rig.notes["view"])
            assert rig.g.pci_devices == [], what
            # nothing new is left behind (ARM's generic code even tears the domain's IOMMU state down)
            before = rig.notes["in_use"]
            assert all(n <= before.get(o, 0) for o, n in owners_of(rig.alloc, 1).items()), what
            assert_clean(rig, what)
            if not rig.g.crashed:  # the domctl can be tried again
                rig.p.iommu.assign_device(rig.g, NIC)
                assert rig.p.device(NIC).owner is rig.g, what
        else:
            assert a.error is None and not rig.g.crashed, what
        if not rig.g.crashed:
            assert rig.p.device(NIC).owner is rig.g
            rig.p.machine.memory.write_bytes(rig.mfn(rig.g, 0x121).value << 12, b"guest!!!")
            assert rig.dma_read(NIC, 0x121) == b"guest!!!"
        assert_clean(rig, what)
        rig.p.destroy(rig.g)
        assert owners_of(rig.alloc, 1) == {}, what
        if a.nth == 0:
            reference["in_use"] = dict(rig.alloc.in_use)
        assert dict(rig.alloc.in_use) == reference["in_use"], what

    report = run(vendor, "assign", setup, lambda r: r.p.iommu.assign_device(r.g, NIC), check_attempt)
    report_reaches(report, ASSIGN_KINDS[vendor], 2)


#: Giving a device back to the hardware domain allocates only on ARM, where it needs a context bank and
#: stream-match record of the hardware domain again; VT-d and AMD reuse structures that exist.
DEASSIGN_KINDS: dict[str, set[str]] = {"vtd": set(), "amd": set(), "smmu": {"smmu-ctx", "smrs"}}


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("how", ["deassign", "destroy"])
def test_deassign_and_destroy(vendor: str, how: str) -> None:
    """A failure while the device goes back is an error of the domctl; a second try finishes the job."""

    def setup() -> Rig:
        rig = booted(vendor)
        rig.map_guest(FAR, rig.mfn(rig.g, 1))
        return rig

    def op(r: Rig) -> None:
        if how == "deassign":
            r.p.iommu.deassign_device(r.g, NIC)
        else:
            r.p.destroy(r.g)

    def check_attempt(a: Attempt[Rig]) -> None:
        rig, g, what = a.state, a.state.g, f"{vendor}/{how} N={a.nth} ({a.owner})"
        if a.failed:
            assert isinstance(a.error, OutOfMemory), f"{what}: {a.error!r}"
            assert not g.crashed, what
            assert rig.p.device(NIC).owner in (g, rig.hwdom), what
            assert_clean(rig, what)
        else:
            assert a.error is None, f"{what}: {a.error!r}"
        if g.domid in rig.p.machine.domains:
            rig.p.destroy(g)  # the retry
        assert rig.p.device(NIC).owner is rig.hwdom, what
        assert owners_of(rig.alloc, 1) == {}, what
        assert rig.p.iommu.pending_frees == 0, what
        assert_clean(rig, what)
        assert rig.hwdom is not None
        back = rig.dma_read(NIC, rig.hwdom.extents[0].mfn.value + 0x21)
        if vendor == "smmu" and (a.failed or how == "destroy"):
            # the SMMU detached the NIC from d1 and could not attach it to d0: it stays detached, and
            # its DMA faults (unmatched streams fault), which is safe; Xen's arm_smmu_reassign_dev does so.
            # Destroying an ARM guest releases its devices the device-tree way (iommu_release_dt_devices):
            # detached, not given to dom0's context, so their DMA faults too.
            assert back is None, what
        else:
            assert back is not None, what  # dom0's view again

    report = run(vendor, how, setup, op, check_attempt)
    # an ARM guest's destroy detaches its devices without attaching them anywhere: nothing to allocate
    expected = set() if (vendor, how) == ("smmu", "destroy") else DEASSIGN_KINDS[vendor]
    assert report.failed_kinds == expected, report.points


# -- a domain's IOMMU state ----------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", [v for v in VENDORS if v == "smmu"])
def test_create_a_guest(vendor: str) -> None:
    """On ARM a new domain needs its stage-2 root and the SMMU's per-domain record: no half-made domain."""

    def check_attempt(a: Attempt[Rig]) -> None:
        rig, what = a.state, f"N={a.nth} ({a.owner})"
        if a.failed:
            assert isinstance(a.error, OutOfMemory), f"{what}: {a.error!r}"
            assert 1 not in rig.p.machine.domains, what
            assert owners_of(rig.alloc, 1) == {}, what
        else:
            assert a.error is None, what
            assert rig.guest is not None
            rig.p.destroy(rig.guest)
        assert_clean(rig, what)

    def op(r: Rig) -> None:
        r.guest = r.p.create_guest(1, 8 << 20)

    report = run(vendor, "create", lambda: booted(vendor, guest=False), op, check_attempt)
    report_reaches(report, {"p2m", "smmu-domain"}, 2)


def _hwdom_view(rig: Rig, d: Domain) -> dict[int, tuple[int, Perm] | None]:
    """What the hardware domain's tables say for a sample of its own frames, by Dfn and by Mfn.

    The translation only: after a failure a run may be mapped with small pages where the clean run
    used superpages.
    """
    frames: set[int] = set()
    for ext in d.extents:
        for i in range(0, ext.count, 61):
            frames.update((ext.gfn.value + i, ext.mfn.value + i))
    out: dict[int, tuple[int, Perm] | None] = {}
    for f in sorted(frames):
        got = rig.lookup(d, f)
        out[f] = None if got is None else got[:2]
    return out


#: What a failed allocation during the hardware domain's IOMMU set-up does.  The set-up loops only log
#: failures and go on (facts 5.3, 6.1); the model retries a failed run page by page, so a failure that
#: does not repeat leaves the map complete.  VT-d logs it and the hardware domain runs on; AMD's map
#: crashes the domain itself (facts 7.5), and a failed root in AMD's own hwdom_init is a BUG; on ARM the
#: domain cannot be built at all.
HWDOM_KINDS = {"vtd": {"ctx", "iommu-pt"}, "amd": {"amd-pt"}, "smmu": {"p2m", "smmu-domain"}}


def hwdom_sweep(vendor: str, strict: bool, ram: int, hwdom_mem: int, select: Select) -> SweepReport[Rig]:
    cfg = IommuConfig(hwdom_strict=strict)
    reference: dict[str, Any] = {}

    def op(r: Rig) -> None:
        r.hwdom = r.p.create_hardware_domain(hwdom_mem)

    def check_attempt(a: Attempt[Rig]) -> None:
        rig, what = a.state, f"{vendor} N={a.nth} ({a.owner})"
        d0 = rig.p.machine.domains.get(0)
        if vendor == "smmu" and a.failed:
            assert isinstance(a.error, OutOfMemory), f"{what}: {a.error!r}"
            assert d0 is None and owners_of(rig.alloc, 0) == {}, what
            return
        if vendor == "amd" and a.failed and a.nth == 1 and not strict:  # the root, in amd's hwdom_init
            assert isinstance(a.error, HypervisorBug), f"{what}: {a.error!r}"
            return
        assert a.error is None, f"{what}: {a.error!r}"
        assert d0 is not None and rig.p.iommu.enabled, what
        assert d0.crashed == (a.failed and vendor == "amd"), what
        if a.failed and vendor == "vtd":
            lines = [ln.text for ln in rig.p.machine.console.lines]
            assert any("fail" in t for t in lines), f"{what}: nothing logged"
        view = _hwdom_view(rig, d0)
        if a.nth == 0:
            reference["view"] = view
        assert view == reference["view"], what  # the set-up completed: every frame of d0 as in the clean run
        for sbdf in (GPU, NIC, DISK) if vendor != "smmu" else ():  # ARM dom0 has no devices unless told
            assert rig.dma_read(sbdf, d0.extents[0].gfn.value + 0x20) is not None, f"{what}: {sbdf}"
        assert_clean(rig, what)
        rig.p.iommu.domain_destroy(d0)
        rig.p.machine.destroy_domain(d0)
        assert owners_of(rig.alloc, 0) == {} and rig.p.iommu.pending_frees == 0, what

    return run(vendor, "hwdom", lambda: Rig(vendor, platform(vendor, config=cfg, ram=ram)), op, check_attempt, select)


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("strict", [False, True], ids=["relaxed", "strict"])
def test_hardware_domain_setup(vendor: str, strict: bool) -> None:
    report = hwdom_sweep(vendor, strict, 64 << 20, 16 << 20, each_kind)
    report_reaches(report, HWDOM_KINDS[vendor], 3)


@pytest.mark.slow
@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("strict", [False, True], ids=["relaxed", "strict"])
def test_hardware_domain_setup_large(vendor: str, strict: bool) -> None:
    """A bigger machine and hardware domain: many more tables, every one of them made to fail."""
    report = hwdom_sweep(vendor, strict, 1 << 30, 256 << 20, every_point)
    report_reaches(report, HWDOM_KINDS[vendor], 3)


# -- IOMMU and queue set-up ------------------------------------------------------------------------------------


#: What bringing the IOMMU up allocates: VT-d's root table and invalidation queue (with its status
#: page), AMD's device table, command buffer, event log and completion-wait semaphore.  An SMMUv2 keeps
#: its stream mapping and context banks in registers: nothing to allocate (its per-master records and
#: context-bank pages are swept with assignment).
SETUP_KINDS = {"vtd": {"root", "qi", "qi-status"}, "amd": {"device-table", "cmd-buffer", "event-log", "cwait-sem"}}
SETUP_ERRORS: dict[str, type[IommuError]] = {"vtd": OutOfMemory, "amd": NoDevice}


@pytest.mark.parametrize("vendor", VENDORS)
def test_iommu_setup(vendor: str) -> None:
    def setup() -> Rig:
        return Rig(vendor, platform(vendor, config=IommuConfig(enable=False)))

    def op(r: Rig) -> None:
        r.p.iommu.config = IommuConfig()
        r.p.iommu.setup()  # Xen's iommu_setup reports a failure by leaving the IOMMU off

    def check_attempt(a: Attempt[Rig]) -> None:
        rig, what = a.state, f"{vendor} N={a.nth} ({a.owner})"
        assert a.error is None, f"{what}: {a.error!r}"
        if a.failed:
            assert not rig.p.iommu.enabled, what
            assert isinstance(rig.p.iommu.setup_error, SETUP_ERRORS[vendor]), f"{what}: {rig.p.iommu.setup_error!r}"
            assert rig.alloc.total_in_use == 0, f"{what}: {dict(rig.alloc.in_use)}"
            d0 = rig.p.create_hardware_domain(16 << 20)  # the machine still boots, without an IOMMU
            assert rig.dma_read(NIC, d0.extents[0].mfn.value) is not None, what
        else:
            assert rig.p.iommu.enabled and rig.p.iommu.setup_error is None, what
            rig.p.create_hardware_domain(16 << 20)
            assert_clean(rig, what)

    report = run(vendor, "setup", setup, op, check_attempt)
    assert report.failed_kinds == SETUP_KINDS.get(vendor, set()), report.points
    assert len(report.tried) == len(SETUP_KINDS.get(vendor, ()))


# -- the sweep driver itself -----------------------------------------------------------------------------------


def test_each_kind_picks_the_ends_of_every_owner() -> None:
    points = ["a:x", "a:x", "b:y", "a:x", "a:x", "c:z", "c:z", "c:z", "c:z"]
    assert each_kind(points) == [1, 2, 3, 5, 6, 7, 9]
    assert each_kind([]) == []


def test_the_sweep_notices_an_operation_that_is_not_reproducible() -> None:
    from iommusim.verify.sweep import SweepError

    calls = {"n": 0}

    def setup() -> Rig:
        return booted("vtd" if "vtd" in VENDORS else VENDORS[0])

    def op(r: Rig) -> None:
        calls["n"] += 1
        if calls["n"] > 1:  # the second run allocates less than the first
            return
        r.map_guest(FAR, r.mfn(r.g, 1))

    with pytest.raises(SweepError, match="never happened"):
        sweep(setup, op, lambda a: None, allocator=lambda r: r.alloc)


def test_the_sweep_stops_one_past_the_last_allocation() -> None:
    seen: list[int] = []
    vendor = VENDORS[0]
    report = sweep(
        lambda: booted(vendor),
        lambda r: r.map_guest(FAR, r.mfn(r.g, 1)),
        lambda a: seen.append(a.nth),
        allocator=lambda r: r.alloc,
    )
    assert seen == [0, *range(1, len(report.points) + 1), len(report.points) + 1]
    assert len(report.points) >= 1


def test_the_sweep_counts_only_the_owner_it_is_told() -> None:
    vendor = VENDORS[0]
    owners: list[str | None] = []
    sweep(
        lambda: booted(vendor, assign=False),
        lambda r: r.p.iommu.assign_device(r.g, NIC),
        lambda a: owners.append(a.owner),
        allocator=lambda r: r.alloc,
        owner_prefix="d1:",
        select=each_kind,
    )
    assert all(o is None or o.startswith("d1:") for o in owners)
    assert any(o is not None for o in owners)
