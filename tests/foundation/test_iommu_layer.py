"""The generic IOMMU layer with a driver test double: no-ops, error policy, flushes, range form."""

from __future__ import annotations

import errno
from dataclasses import dataclass

import pytest

from doubles import ToyDriver
from iommusim.console import LogLevel
from iommusim.errors import (
    AddressNotAvailable,
    BadAddress,
    HypervisorBug,
    InvalidArgument,
    NotSupported,
    OutOfMemory,
)
from iommusim.frames import Dfn, Gfn, Mfn
from iommusim.iommu import Iommu, IommuConfig, IommuStatus
from iommusim.iommu.ops import OPTIONAL_OPS
from iommusim.machine import Domain, DomainKind, Machine
from iommusim.perms import FlushFlags, Perm


@dataclass
class Env:
    m: Machine
    drv: ToyDriver
    io: Iommu
    hwdom: Domain
    guest: Domain

    def errors(self) -> list[str]:
        return [line.text for line in self.m.console.lines if line.level == LogLevel.ERR]


def make_env(config: IommuConfig | None = None, **driver_kw: object) -> Env:
    m = Machine(ram_bytes=256 << 20)
    drv = ToyDriver(**driver_kw)  # type: ignore[arg-type]
    io = Iommu(m, drv, config or IommuConfig())
    io.setup()
    hwdom = m.create_domain(0, DomainKind.PV, hardware=True, memory_bytes=16 << 20)
    guest = m.create_domain(1, DomainKind.HVM, memory_bytes=16 << 20)
    for d in (hwdom, guest):
        io.domain_init(d)
        d.iommu.status = IommuStatus.INITIALIZED
    drv.calls.clear()
    return Env(m, drv, io, hwdom, guest)


@pytest.fixture
def env() -> Env:
    return make_env()


# -- no-op cases ---------------------------------------------------------------------------------------


def test_disabled_iommu_is_a_no_op_everywhere() -> None:
    e = make_env(IommuConfig(enable=False))
    assert not e.io.enabled
    assert e.io.map_page(e.guest, Dfn(1), Mfn(2), Perm.RW) == FlushFlags.NONE
    assert e.io.unmap_page(e.guest, Dfn(1)) == FlushFlags.NONE
    assert e.io.map(e.guest, Dfn(1), Mfn(2), 10, Perm.RW) == FlushFlags.NONE
    e.io.iotlb_flush(e.guest, Dfn(1), 1)
    e.io.iotlb_flush_all(e.guest)
    assert e.drv.calls == [] and e.m.allocator.total_in_use == 0
    with pytest.raises(NotSupported) as info:
        e.io.lookup_page(e.guest, Dfn(1))
    assert info.value.errno == errno.EOPNOTSUPP
    assert e.io.debug_key_dump() == ["IOMMU not enabled!"]


def test_failed_hardware_setup_leaves_the_iommu_disabled() -> None:
    m = Machine(ram_bytes=64 << 20)
    drv = ToyDriver(fail_with={"hardware_setup": InvalidArgument("no units")})
    io = Iommu(m, drv)
    io.setup()
    assert not io.enabled and io.setup_error is not None
    with pytest.raises(HypervisorBug):
        Iommu(m, drv, IommuConfig(force=True)).setup()


def test_domain_without_iommu_state_is_a_no_op(env: Env) -> None:
    other = env.m.create_domain(7, DomainKind.PV)
    before = list(env.drv.calls)
    assert env.io.map_page(other, Dfn(1), Mfn(2), Perm.RW) == FlushFlags.NONE
    assert env.drv.calls == before


# -- kinds and flags are checked before anything happens ------------------------------------------------


def test_wrong_kinds_are_type_errors_and_crash_nothing(env: Env) -> None:
    with pytest.raises(TypeError, match="dfn must be a Dfn, got Mfn"):
        env.io.map_page(env.guest, Mfn(1), Mfn(2), Perm.RW)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mfn must be a Mfn, got Gfn"):
        env.io.map_page(env.guest, Dfn(1), Gfn(2), Perm.RW)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got int"):
        env.io.unmap_page(env.guest, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        env.io.iotlb_flush(env.guest, Gfn(1), 1)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="bad mapping flags"):
        env.io.map_page(env.guest, Dfn(1), Mfn(2), Perm(8))
    assert not env.guest.crashed and env.drv.calls == []


# -- error policy ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "call"),
    [
        ("map_page", lambda e, d: e.io.map_page(d, Dfn(0x10), Mfn(0x20), Perm.RW)),
        ("unmap_page", lambda e, d: e.io.unmap_page(d, Dfn(0x10))),
        ("iotlb_flush", lambda e, d: e.io.iotlb_flush(d, Dfn(0x10), 4)),
        ("iotlb_flush_all", lambda e, d: e.io.iotlb_flush_all(d)),
    ],
)
def test_driver_error_is_logged_crashes_domu_and_is_reraised(op, call) -> None:  # type: ignore[no-untyped-def]
    e = make_env(fail_with={op: BadAddress("walk failed")})
    with pytest.raises(BadAddress) as info:
        call(e, e.guest)
    assert info.value.rc == -errno.EFAULT and info.value.op == op and info.value.domain is e.guest
    assert e.guest.crashed and e.guest.is_shutting_down
    assert len(e.errors()) == 1 and e.errors()[0].startswith("d1: IOMMU") and "rc -14" in e.errors()[0]


@pytest.mark.parametrize("op", ["map_page", "unmap_page", "iotlb_flush", "iotlb_flush_all"])
def test_hardware_domain_is_exempt_from_the_crash(op: str) -> None:
    e = make_env(fail_with={op: OutOfMemory("no memory")})
    calls = {
        "map_page": lambda: e.io.map_page(e.hwdom, Dfn(1), Mfn(1), Perm.RW),
        "unmap_page": lambda: e.io.unmap_page(e.hwdom, Dfn(1)),
        "iotlb_flush": lambda: e.io.iotlb_flush(e.hwdom, Dfn(1), 1),
        "iotlb_flush_all": lambda: e.io.iotlb_flush_all(e.hwdom),
    }
    with pytest.raises(OutOfMemory):
        calls[op]()
    assert not e.hwdom.crashed and len(e.errors()) == 1 and e.errors()[0].startswith("d0:")


def test_no_log_for_a_domain_that_is_shutting_down_but_still_crash() -> None:
    e = make_env(fail_with={"map_page": AddressNotAvailable("too wide")})
    e.guest.shutdown()
    with pytest.raises(AddressNotAvailable):
        e.io.map_page(e.guest, Dfn(1), Mfn(1), Perm.RW)
    assert e.errors() == [] and e.guest.crashed
    assert e.io.log_suppressed_while_shutting_down == 1


def test_log_is_rate_limited() -> None:
    e = make_env(fail_with={"unmap_page": BadAddress("x")})
    for _ in range(25):
        with pytest.raises(BadAddress):
            e.io.unmap_page(e.hwdom, Dfn(1))  # the hardware domain keeps running, so it keeps logging
    assert len(e.errors()) == 10
    e.m.clock.advance_ms(5000)
    with pytest.raises(BadAddress):
        e.io.unmap_page(e.hwdom, Dfn(1))
    assert e.m.console.grep("15 messages suppressed")
    assert len(e.errors()) == 11


def test_vendor_errors_beyond_width_keep_their_errno(env: Env) -> None:
    with pytest.raises(AddressNotAvailable) as info:
        env.io.map_page(env.guest, Dfn(1 << 40), Mfn(1), Perm.RW)
    assert info.value.errno == errno.EADDRNOTAVAIL and env.guest.crashed


# -- lookup -----------------------------------------------------------------------------------------------


def test_lookup_present_absent_and_missing_op(env: Env) -> None:
    env.io.map_page(env.guest, Dfn(5), Mfn(0x77), Perm.R)
    assert env.io.lookup_page(env.guest, Dfn(5)) == (Mfn(0x77), Perm.R)
    with pytest.raises(Exception, match="not mapped") as info:
        env.io.lookup_page(env.guest, Dfn(6))
    assert info.value.errno == errno.ENOENT  # type: ignore[attr-defined]
    assert not env.guest.crashed  # lookup failures do not crash
    e = make_env(provided=OPTIONAL_OPS - {"lookup_page"})
    with pytest.raises(NotSupported):
        e.io.lookup_page(e.guest, Dfn(5))
    q = make_env(IommuConfig(quirks=frozenset({"lookup-null-deref"})), provided=OPTIONAL_OPS - {"lookup_page"})
    with pytest.raises(HypervisorBug, match="NULL"):
        q.io.lookup_page(q.guest, Dfn(5))


# -- flushes ------------------------------------------------------------------------------------------------


def test_single_page_ops_flush_implicitly_unless_batching(env: Env) -> None:
    env.io.map_page(env.guest, Dfn(1), Mfn(1), Perm.RW)
    assert [(f.dfn, f.flags) for f in env.drv.flushes] == [(1, FlushFlags.ADDED)]
    with env.io.dont_flush():
        assert env.io.dont_flush_iotlb
        env.io.map_page(env.guest, Dfn(1), Mfn(2), Perm.RW)
    assert not env.io.dont_flush_iotlb and len(env.drv.flushes) == 1
    env.io.iotlb_flush(env.guest, Dfn(1), 1, FlushFlags.ADDED | FlushFlags.MODIFIED)
    assert env.drv.flushes[-1].flags == FlushFlags.ADDED | FlushFlags.MODIFIED


def test_flush_wrappers_are_no_ops_without_the_op_or_without_work() -> None:
    e = make_env(provided=OPTIONAL_OPS - {"iotlb_flush", "iotlb_flush_all"})
    e.io.iotlb_flush(e.guest, Dfn(1), 1)
    e.io.iotlb_flush_all(e.guest)
    assert e.drv.flushes == []
    f = make_env()
    f.io.iotlb_flush(f.guest, Dfn(1), 0)
    f.io.iotlb_flush(f.guest, Dfn(1), 5, FlushFlags.NONE)
    assert f.drv.flushes == []


# -- the range form ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bulk", [True, False])
def test_range_map_accumulates_flags_and_flushes_once(bulk: bool) -> None:
    provided = OPTIONAL_OPS if bulk else OPTIONAL_OPS - {"map_range", "unmap_range"}
    e = make_env(provided=provided)
    flags = e.io.map(e.guest, Dfn(0x100), Mfn(0x400), 700, Perm.RW)
    assert flags == FlushFlags.ADDED
    assert [(f.dfn, f.count, f.flags) for f in e.drv.flushes] == [(0x100, 700, FlushFlags.ADDED)]
    flags = e.io.map(e.guest, Dfn(0x300), Mfn(0x900), 10, Perm.R)  # 0x300..0x309 were mapped: modified too
    assert flags == FlushFlags.ADDED | FlushFlags.MODIFIED and len(e.drv.flushes) == 2
    flags = e.io.unmap(e.guest, Dfn(0x100), 1000)
    assert flags == FlushFlags.MODIFIED and e.drv.flushes[-1].count == 1000
    assert e.io.dump_page_tables(e.guest) == []
    with e.io.dont_flush():
        e.io.map(e.guest, Dfn(0), Mfn(1), 3, Perm.RW)
    assert len(e.drv.flushes) == 3  # the caller batches: the range form leaves the flush to it


@pytest.mark.parametrize("bulk", [True, False])
def test_range_map_failure_loses_nothing(bulk: bool) -> None:
    provided = OPTIONAL_OPS if bulk else OPTIONAL_OPS - {"map_range", "unmap_range"}
    e = make_env(provided=provided)
    e.io.map(e.guest, Dfn(0x1F0), Mfn(0x500), 0x20, Perm.R)  # straddles a level-1 table boundary at 0x200
    before = e.io.dump_page_tables(e.guest)
    pages_before = dict(e.m.allocator.in_use)
    # mapping 0x1E0.. onwards needs one new level-1 table at 0x400: fail it
    e.m.allocator.fail_nth(1)
    with pytest.raises(OutOfMemory):
        e.io.map(e.guest, Dfn(0x1E0), Mfn(0x9000), 0x300, Perm.RW)
    assert e.io.dump_page_tables(e.guest) == before
    assert dict(e.m.allocator.in_use) == pages_before
    assert e.guest.crashed


def test_hwdom_range_failure_is_not_a_crash() -> None:
    e = make_env()
    e.m.allocator.fail_nth(1)
    with pytest.raises(OutOfMemory):
        e.io.map(e.hwdom, Dfn(0), Mfn(0x300), 5, Perm.RW)
    assert not e.hwdom.crashed and e.m.allocator.total_in_use == 0


def test_range_bad_input(env: Env) -> None:
    with pytest.raises(InvalidArgument):
        env.io.map(env.guest, Dfn(0), Mfn(0), -1, Perm.RW)
    with pytest.raises(InvalidArgument):
        env.io.unmap(env.guest, Dfn(0), -1)
    assert env.io.map(env.guest, Dfn(0), Mfn(0), 0, Perm.RW) == FlushFlags.NONE
    with pytest.raises(TypeError):
        env.io.map(env.guest, Dfn(0), Dfn(0), 1, Perm.RW)  # type: ignore[arg-type]


# -- teardown and deferred frees ------------------------------------------------------------------------------


def test_teardown_frees_every_table_page(env: Env) -> None:
    env.io.map(env.guest, Dfn(0), Mfn(0x400), 5000, Perm.RW)
    assert env.m.allocator.owned("d1:") > 0
    env.io.teardown(env.guest)
    assert env.m.allocator.owned("d1:") == 0 and env.guest.iommu.status == IommuStatus.DISABLED


def test_deferred_frees_run_through_the_vendor(env: Env) -> None:
    mfn = env.m.allocator.alloc("d1:iommu-pt")
    env.io.defer_free(mfn, 1)
    assert env.io.pending_frees == 1 and env.m.allocator.total_in_use == 1
    assert env.io.run_cleanup() == 1 and env.m.allocator.total_in_use == 0


def test_config_cmdline() -> None:
    c = IommuConfig.from_cmdline("console=com1 iommu=force,no-snoop,verbose dom0-iommu=strict,no-map-reserved")
    assert c.force and not c.snoop and c.verbose and c.hwdom_strict and c.hwdom_reserved is False
    assert not IommuConfig.from_cmdline("iommu=0").enable
    with pytest.raises(InvalidArgument):
        IommuConfig.from_cmdline("iommu=frobnicate")
    with pytest.raises(InvalidArgument, match="unknown quirk"):
        IommuConfig(quirks=frozenset({"no-such-quirk"}))


def test_strict_and_passthrough_resolve_at_setup() -> None:
    m = Machine(ram_bytes=64 << 20)
    io = Iommu(m, ToyDriver(), IommuConfig(hwdom_strict=True, hwdom_passthrough=True))
    io.setup()
    assert io.config.hwdom_strict and not io.config.hwdom_passthrough
    assert m.console.grep("Dom0 mode: Strict")


@pytest.mark.parametrize("who", ["guest", "hwdom"])
def test_map_page_allocation_failure_at_each_point(who: str) -> None:
    e = make_env()
    d = e.guest if who == "guest" else e.hwdom
    e.io.map_page(d, Dfn(0x10), Mfn(0x20), Perm.RW)
    before_map = e.io.dump_page_tables(d)
    before_pages = dict(e.m.allocator.in_use)
    # dfn 1 << 27 needs a new level-3, level-2 and level-1 table: three allocation points
    for n in (1, 2, 3):
        e.m.allocator.fail_nth(n)
        with pytest.raises(OutOfMemory):
            e.io.map_page(d, Dfn(1 << 27), Mfn(0x30), Perm.RW)
        assert e.io.dump_page_tables(d) == before_map
        assert dict(e.m.allocator.in_use) == before_pages
        assert d.crashed == (who == "guest")
    e.m.allocator.fail_nth(4)
    e.io.map_page(d, Dfn(1 << 27), Mfn(0x30), Perm.RW)
    e.m.allocator.clear_failures()
    assert e.io.lookup_page(d, Dfn(1 << 27)) == (Mfn(0x30), Perm.RW)


def test_ledger_remembers_unflushed_changes_until_a_flush_covers_them(env: Env) -> None:
    led = env.io.ledger
    env.io.map_page(env.guest, Dfn(1), Mfn(1), Perm.RW)
    assert led.pending(1) == []  # flushed implicitly
    with env.io.dont_flush():
        env.io.map_page(env.guest, Dfn(5), Mfn(5), Perm.RW)
        env.io.unmap_page(env.guest, Dfn(6))  # nothing was there: no flags, nothing owed
        env.io.map(env.guest, Dfn(10), Mfn(10), 20, Perm.R)
    env.io.unmap(env.guest, Dfn(40), 5)  # nothing mapped there: nothing owed
    env.io.map(env.guest, Dfn(100), Mfn(100), 4, Perm.RW, flush=False)
    assert led.pending(1) == [(5, 1), (10, 20), (100, 4)]
    assert led.covers(1, 29) and not led.covers(1, 30)
    env.io.iotlb_flush(env.guest, Dfn(12), 3)
    assert led.pending(1) == [(5, 1), (10, 2), (15, 15), (100, 4)]
    env.io.iotlb_flush(env.guest, Dfn(0), 5, FlushFlags.NONE)  # a flush of nothing is not a flush
    assert led.covers(1, 5)
    env.io.iotlb_flush_all(env.guest)
    assert led.pending(1) == [] and led.domains() == []
    env.io.note_unflushed(env.guest, Dfn(7), 2)
    assert led.pending(1) == [(7, 2)]


def test_ledger_counts_a_flush_the_vendor_cannot_do_as_done() -> None:
    e = make_env(provided=OPTIONAL_OPS - {"iotlb_flush", "iotlb_flush_all"})
    with e.io.dont_flush():
        e.io.map_page(e.guest, Dfn(5), Mfn(5), Perm.RW)
    e.io.iotlb_flush(e.guest, Dfn(5), 1)
    # the caller did its part; whatever the hardware still caches is now a missing flush, not a window
    assert e.io.ledger.pending(1) == []
