"""The differential state machine: every vendor against the reference model, and what it catches.

The default run plays a bounded number of random stories on every installed vendor at once.  The tests
after it show the machine is not toothless: with a seed-era quirk switched on, or a driver broken on
purpose, both a fixed story and a derandomized Hypothesis search end in a ``Divergence``; with the quirk
off the same story passes.  ``-m slow`` plays at least 20,000 steps on every vendor.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from iommusim.drivers.vtd.driver import VtdDriver
from iommusim.errors import DmaFault
from iommusim.frames import PAGE_SHIFT, Daddr, Dfn, Gfn, Mfn
from iommusim.iommu.config import IommuConfig
from iommusim.machine import PciDevice, Sbdf
from iommusim.perms import FlushFlags, Perm
from iommusim.platform import HardwareSpec, available_vendors, build_platform
from iommusim.verify.differential import (
    ACCEL,
    APPLIED_COUNTS,
    NIC,
    PVDEV,
    SPARE,
    STEP_COUNTS,
    Differential,
    Divergence,
    FlushMode,
    Story,
    differential_machine,
    replay,
)
from iommusim.verify.reference import RefEntry, ReferenceModel

VENDORS = available_vendors()
_QUIET = list(HealthCheck)


def _settings(examples: int, steps: int, *, derandomize: bool = False, shrink: bool = True) -> settings:
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])
    chosen = settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        derandomize=derandomize,
        suppress_health_check=_QUIET,
        phases=phases,
    )
    return settings(chosen, database=None) if derandomize else chosen


def _needs(vendor: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(vendor not in VENDORS, reason=f"the {vendor} model is not installed")


# -- the reference model on its own ------------------------------------------------------------------------


def test_reference_stale_windows_open_on_skipped_flushes_and_close_on_covering_flushes() -> None:
    ref = ReferenceModel()
    ref.add_device("dev")
    a, b = RefEntry(Mfn(0x100), Perm.RW), RefEntry(Mfn(0x200), Perm.R)
    ref.create(1, {Dfn(5): a})
    ref.assign("dev", 1)
    ref.update(1, Dfn(5), [b], flushed=False)  # remapped, flush owed: either frame
    assert ref.outcomes(1, Dfn(5), Perm.R) == {Mfn(0x100), Mfn(0x200)}
    assert ref.outcomes(1, Dfn(5), Perm.W) == {Mfn(0x100), None}
    ref.update(1, Dfn(6), [a], flushed=True)  # a flushed call that only adds sends no flush
    assert ref.pending(1) == [Dfn(5)]
    ref.flush(1, Dfn(6), 4)  # a flush that does not cover it
    assert ref.pending(1) == [Dfn(5)]
    ref.flush(1, Dfn(0), 6)
    assert ref.outcomes(1, Dfn(5), Perm.W) == {None}
    ref.update(1, Dfn(5), [None], flushed=False)
    ref.update(1, Dfn(4), [a, a, b], flushed=True)  # modified one present entry: the whole range is flushed
    assert ref.pending(1) == [] and ref.lookup(1, Dfn(5)) == a
    ref.update(1, Dfn(6), [None], flushed=False)
    ref.flush_all(1)
    assert ref.allowed(1, Dfn(6)) == {None}
    ref.update(1, Dfn(6), [a], flushed=False)  # one page added, flush skipped: nothing cached "not present"
    assert ref.allowed(1, Dfn(6)) == {a}
    ref.update(1, Dfn(8), [a, b], flushed=False)  # a block may replace a table: "not present" may linger
    assert ref.allowed(1, Dfn(8)) == {a, None} and ref.allowed(1, Dfn(9)) == {b, None}
    ref.destroy(1)
    assert ref.owner["dev"] is None


# -- the default run: every vendor, bounded -----------------------------------------------------------------


def test_every_vendor_agrees_with_the_reference() -> None:
    run_state_machine_as_test(differential_machine(), settings=_settings(10, 30))


def test_a_fixed_story_with_stale_windows_passes_on_every_vendor() -> None:
    """Skipped, deferred and made flushes, a 2 MiB block split, a device moved and a guest replaced."""
    story: Story = [
        ("dma_write", (NIC, 0x5, 1), {}),
        ("unmap", (1, 0x5), {"mode": FlushMode.SKIP}),
        ("dma_read", (NIC, 0x5), {}),
        ("map", (1, 0x400, 0x200), {"order": 9, "mode": FlushMode.DEFERRED}),
        ("dma_read", (NIC, 0x401), {}),
        ("unmap", (1, 0x401), {"mode": FlushMode.SKIP}),
        ("retype", (1, 0x402), {"mode": FlushMode.SKIP}),
        ("map_range", (1, 0x1F0, 600, 3), {"writable": False, "mode": FlushMode.DEFERRED}),
        ("flush", (1, 0x400, 3), {}),
        ("assign", (ACCEL, 1), {}),
        ("dma_write", (ACCEL, 0x7, 9), {}),
        ("move", (ACCEL, 2), {}),
        ("lookup", (1, 0x1F0), {}),
        ("crash", (1,), {}),
        ("destroy", (1,), {}),
        ("create", (1,), {}),
        ("unmap_range", (1, 0x3F0, 40), {"mode": FlushMode.FLUSH}),
        ("flush_all", (1,), {}),
    ]
    replay(Differential(), story)


@pytest.mark.skipif(not {"vtd", "amd"} & set(VENDORS), reason="PV guests exist on x86 only")
def test_a_pv_guest_changed_through_the_generic_layer() -> None:
    """map_page/unmap_page (alone and inside dont_flush) and the range form with and without its flush."""
    story: Story = [
        ("map", (3, 0x505, 0x7), {}),
        ("dma_read", (PVDEV, 0x505), {}),
        ("map", (3, 0x505, 0x9), {"mode": FlushMode.SKIP}),
        ("dma_write", (PVDEV, 0x505, 3), {}),
        ("flush", (3, 0x500, 0x10), {}),
        ("map", (3, 0x600, 0x200), {"order": 9}),
        ("dma_read", (PVDEV, 0x601), {}),
        ("unmap", (3, 0x601), {"mode": FlushMode.DEFERRED}),
        ("map_range", (3, 0x3F0, 300, 5), {"mode": FlushMode.SKIP}),
        ("unmap_range", (3, 0x3F5, 100), {}),
        ("retype", (3, 0x3F0), {}),
        ("lookup", (3, 0x3F0), {}),
        ("assign", (SPARE, 3), {}),
        ("destroy", (3,), {}),
        ("create", (3,), {}),
    ]
    diff = Differential([v for v in VENDORS if v in ("vtd", "amd")])
    replay(diff, story)
    assert all(lane.slots == {1, 2, 3} for lane in diff.lanes)


def test_negative_caching_makes_additions_changes() -> None:
    ref = ReferenceModel(negative_caching=True)
    a = RefEntry(Mfn(0x100), Perm.RW)
    ref.create(1, {})
    ref.update(1, Dfn(5), [a], flushed=False)
    assert ref.allowed(1, Dfn(5)) == {a, None}
    ref.update(1, Dfn(6), [a], flushed=True)  # an addition is flushed: its own range
    assert ref.pending(1) == [Dfn(5)]
    ref.update(1, Dfn(4), [a, a], flushed=True)  # adds dfn 4: the non-present flush covers dfn 5 too
    assert ref.pending(1) == []
    b = RefEntry(Mfn(0x200), Perm.R)
    ref.update(1, Dfn(5), [None], flushed=False)  # a translation left stale...
    ref.update(1, Dfn(5), [b], flushed=True)  # ...is not invalidated by a flush of non-present entries
    assert ref.allowed(1, Dfn(5)) == {a, b}


def test_a_block_mapped_over_a_split_one_with_its_flush_skipped_may_fault_until_the_flush() -> None:
    """Found by the machine on VT-d: the PDE cache still leads to the replaced leaf table (allowed)."""
    story: Story = [
        ("unmap_range", (1, 0x0, 7), {}),
        ("map", (1, 0x0, 0x0), {"writable": False}),
        ("map", (1, 0x0, 0x0), {"order": 9, "writable": False, "mode": FlushMode.SKIP}),
        ("dma_read", (NIC, 0x1), {}),
        ("flush", (1, 0x0, 0x200), {}),
        ("dma_read", (NIC, 0x1), {}),
    ]
    replay(Differential(), story)


def test_other_machine_shapes_agree_too() -> None:
    """Two IOMMUs, VT-d caching mode with register-based invalidation, a tiny IOTLB."""
    story: Story = [
        ("dma_write", (NIC, 0x5, 1), {}),
        ("dma_read", (PVDEV, 0x5), {}),
        ("unmap", (1, 0x5), {"mode": FlushMode.SKIP}),
        ("map", (1, 0x600, 0x3), {"mode": FlushMode.SKIP}),
        ("map", (3, 0x600, 0x3), {"mode": FlushMode.SKIP}),
        ("dma_read", (NIC, 0x600), {}),
        ("assign", (ACCEL, 2), {}),
        ("map_range", (2, 0x1FE, 20, 0x10), {"mode": FlushMode.DEFERRED}),
        ("dma_read", (ACCEL, 0x1FF), {}),
        ("flush_all", (1,), {}),
    ]
    replay(Differential(units=2, caching_mode=True, queued_invalidation=False, iotlb_entries=8), story)


def test_a_stale_window_is_seen_and_closed_by_its_flush() -> None:
    """The reference's allowance is used for real: the device keeps the page until the flush, then loses it."""
    diff = Differential()
    replay(diff, [("dma_read", (NIC, 0x9), {}), ("unmap", (1, 0x9), {"mode": FlushMode.SKIP})])
    for lane in diff.lanes:
        dev = lane.devices[NIC]
        assert lane.platform.machine.dma.read(dev, Daddr(0x9 << PAGE_SHIFT), 8)  # stale, and allowed
    replay(diff, [("flush", (1, 0x9, 1), {})])
    for lane in diff.lanes:
        with pytest.raises(DmaFault):
            lane.platform.machine.dma.read(lane.devices[NIC], Daddr(0x9 << PAGE_SHIFT), 8)


# -- it catches defects: quirks and a broken driver -----------------------------------------------------------

# a 4 KiB mapping of its own (the guest's memory is mapped with 2 MiB leaves, whose split flushes everything)
_REMAP_RO: Story = [
    ("map", (1, 0x505, 0x7), {}),
    ("dma_write", (NIC, 0x505, 0), {}),
    ("retype", (1, 0x505), {"mode": FlushMode.FLUSH}),
]
_UNMAP: Story = [("dma_read", (NIC, 0x5), {}), ("unmap", (1, 0x5), {"mode": FlushMode.FLUSH})]


def _search(vendors: Sequence[str], quirks: Sequence[str] = ()) -> None:
    """A derandomized Hypothesis search (deterministic), without shrinking to keep it short."""
    machine = differential_machine(vendors, quirks=quirks)
    run_state_machine_as_test(machine, settings=_settings(25, 30, derandomize=True, shrink=False))


@_needs("amd")
def test_amd_remap_with_new_permissions_is_flushed() -> None:
    replay(Differential(["amd"]), _REMAP_RO)


@_needs("amd")
def test_quirk_amd_remap_perm_no_flush_is_caught_by_a_fixed_story() -> None:
    with pytest.raises(Divergence, match=r"\[amd\].* write of dfn 0x505 gave Mfn"):
        replay(Differential(["amd"], quirks=["amd-remap-perm-no-flush"]), _REMAP_RO)


@_needs("amd")
def test_quirk_amd_remap_perm_no_flush_is_found_by_the_search() -> None:
    with pytest.raises(Divergence, match=r"\[amd\]"):
        _search(["amd"], ["amd-remap-perm-no-flush"])


_PV_REMAP: Story = [
    ("map", (3, 0x505, 0x7), {}),
    ("dma_read", (PVDEV, 0x505), {}),
    ("map", (3, 0x505, 0x9), {"mode": FlushMode.FLUSH}),
]


@_needs("amd")
def test_amd_pv_remap_is_flushed() -> None:
    replay(Differential(["amd"]), _PV_REMAP)


@_needs("amd")
def test_quirk_amd_pv_no_map_flush_is_caught() -> None:
    with pytest.raises(Divergence, match=r"\[amd\].* read of dfn 0x505 gave Mfn"):
        replay(Differential(["amd"], quirks=["amd-pv-no-map-flush"]), _PV_REMAP)


@_needs("smmu")
def test_smmu_unmap_is_flushed() -> None:
    replay(Differential(["smmu"]), _UNMAP)


@_needs("smmu")
def test_quirk_arm_p2m_no_smmu_flush_is_caught_by_a_fixed_story() -> None:
    with pytest.raises(Divergence, match=r"\[smmu\].* read of dfn 0x5 gave Mfn"):
        replay(Differential(["smmu"], quirks=["arm-p2m-no-smmu-flush"]), _UNMAP)


@_needs("smmu")
def test_quirk_arm_p2m_no_smmu_flush_is_found_by_the_search() -> None:
    with pytest.raises(Divergence, match=r"\[smmu\]"):
        _search(["smmu"], ["arm-p2m-no-smmu-flush"])


def _forgetful_unmap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break VT-d on purpose: unmap_range clears the entries but says no flush is needed."""
    original = VtdDriver.unmap_range

    def unmap_range(self: VtdDriver, d: Any, dfn: Dfn, count: int) -> FlushFlags:
        original(self, d, dfn, count)
        return FlushFlags.NONE

    monkeypatch.setattr(VtdDriver, "unmap_range", unmap_range)


@_needs("vtd")
def test_a_vtd_driver_that_skips_the_unmap_flush_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    replay(Differential(["vtd"]), _UNMAP)
    _forgetful_unmap(monkeypatch)
    with pytest.raises(Divergence, match=r"\[vtd\].* read of dfn 0x5 gave Mfn"):
        replay(Differential(["vtd"]), _UNMAP)
    with pytest.raises(Divergence, match=r"\[vtd\]"):
        _search(["vtd"])


# -- regressions of bugs the machine found ----------------------------------------------------------------


@_needs("smmu")
def test_smmu_destroy_releases_devices_the_device_tree_way() -> None:
    """Destroying an ARM guest detaches its devices (Xen's iommu_release_dt_devices, reassign to NULL).

    It used to go through the PCI deassign path: the device was attached to dom0's context, could DMA
    into dom0's memory, and could never be assigned again (EEXIST).
    """
    nic = "0000:03:00.0"
    p = build_platform(HardwareSpec("smmu", ram_bytes=64 << 20), devices=[PciDevice(Sbdf.parse(nic))])
    d0 = p.create_hardware_domain(16 << 20)
    for _ in range(2):
        g = p.create_guest(1, 4 << 20)
        p.iommu.assign_device(g, nic)
        p.destroy(g)
        dev = p.device(nic)
        assert dev.owner is d0
        with pytest.raises(DmaFault):
            p.machine.dma.read(dev, Daddr(d0.extents[0].mfn.value << PAGE_SHIFT), 4)
    assert p.machine.allocator.owned("d1:") == 0


@pytest.mark.parametrize("caching_mode", [False, True])
def test_a_flushed_addition_does_not_pay_an_unmap_flush_still_owed(caching_mode: bool) -> None:
    """Found by the deep run on VT-d: the ledger forgot a window it still had to report.

    An unmap with its flush skipped leaves a stale translation; a later map of the same page with its
    flush only adds an entry, so VT-d (no caching mode) sends no invalidation, yet the generic layer
    marked the range flushed, and the isolation check called the stale entry a missing flush.
    """
    story: Story = [
        ("dma_read", (NIC, 0x1), {}),
        ("unmap", (1, 0x0), {"order": 9, "mode": FlushMode.SKIP}),
        ("map", (1, 0x1, 0x0), {"writable": False}),
        ("dma_read", (NIC, 0x1), {}),
        ("flush", (1, 0x1, 1), {}),
    ]
    replay(Differential(caching_mode=caching_mode), story)


@pytest.mark.parametrize("vendor", [v for v in VENDORS if v in ("vtd", "amd")])
def test_x86_guest_unmap_and_remap_keep_the_m2p_for_tables_rebuilt_later(vendor: str) -> None:
    """When a device comes back after the last one left, Xen rebuilds the tables from the M2P.

    guest_map/guest_unmap did not keep the M2P (guest_physmap_add_entry/p2m_remove_page do), so a frame
    the guest had unmapped was reachable again, at its old gfn, after the rebuild.
    """
    nic = "0000:03:00.0"
    config = IommuConfig(hwdom_strict=True, hwdom_inclusive=False)
    p = build_platform(HardwareSpec(vendor, ram_bytes=64 << 20), config=config, devices=[PciDevice(Sbdf.parse(nic))])
    p.create_hardware_domain(16 << 20)
    g = p.create_guest(1, 4 << 20)
    assert g.p2m is not None
    p.iommu.assign_device(g, nic)
    moved = g.p2m.lookup(Gfn(6))
    assert moved is not None
    p.guest_unmap(g, Gfn(5))
    p.guest_unmap(g, Gfn(6))
    p.guest_map(g, Gfn(0x500), moved.mfn)  # the frame that was at gfn 6 moves to 0x500
    p.iommu.deassign_device(g, nic)
    p.iommu.assign_device(g, nic)
    dev = p.device(nic)
    for gfn in (5, 6):
        with pytest.raises(DmaFault):
            p.machine.dma.read(dev, Daddr(gfn << PAGE_SHIFT), 4)
    assert p.machine.dma.translate(dev, 0x500 << PAGE_SHIFT, Perm.R) >> PAGE_SHIFT == moved.mfn.value


# -- the deep run ------------------------------------------------------------------------------------------

DEEP_STEPS = 20_000


@pytest.mark.slow
def test_every_vendor_agrees_with_the_reference_for_20000_steps(capsys: pytest.CaptureFixture[str]) -> None:
    start = {v: STEP_COUNTS[v] for v in VENDORS}
    first = {v: APPLIED_COUNTS[v] for v in VENDORS}
    began = time.perf_counter()
    rounds = 0
    shapes: list[dict[str, Any]] = [
        {},
        {"units": 2},
        {"caching_mode": True, "queued_invalidation": False},
        {"units": 2, "iotlb_entries": 8},
    ]
    while min(STEP_COUNTS[v] - start[v] for v in VENDORS) < DEEP_STEPS:
        shape = shapes[rounds % len(shapes)]
        run_state_machine_as_test(differential_machine(**shape), settings=_settings(50, 60))
        rounds += 1
    done = {v: STEP_COUNTS[v] - start[v] for v in VENDORS}
    applied = {v: APPLIED_COUNTS[v] - first[v] for v in VENDORS}
    with capsys.disabled():
        print(
            f"\ndifferential: {done} steps ({applied} operations applied) in {rounds} round(s), "
            f"{time.perf_counter() - began:.0f} s"
        )
    assert min(done.values()) >= DEEP_STEPS


def test_another_domains_destroy_does_not_free_tables_still_owed_a_flush() -> None:
    """Found by the deep run on VT-d: a leaf table replaced by a 2 MiB block with the flush skipped was on
    the layer's shared deferred-free list, and destroying an unrelated domain freed it while the device's
    paging-structure cache still led to it (a freed page walked as a table)."""
    story: Story = [
        ("assign", (ACCEL, 2), {}),
        ("dma_read", (ACCEL, 0x111), {}),
        ("unmap", (2, 0x0), {}),
        ("map", (2, 0x0, 0x0), {"order": 9, "mode": FlushMode.SKIP}),
        ("destroy", (1,), {}),
        ("dma_read", (ACCEL, 0x111), {}),
        ("flush", (2, 0x0, 0x200), {}),
        ("dma_read", (ACCEL, 0x111), {}),
    ]
    replay(Differential(), story)
