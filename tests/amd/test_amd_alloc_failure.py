"""Allocation failure injected at every allocation point: existing mappings intact, nothing leaked.

Each test first counts how many hypervisor allocations the operation makes when it succeeds, then
makes each of them fail in turn on a fresh copy of the same situation.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from amd_support import NIC, Scenario, amd_platform, can_read, scenario

from iommusim.errors import HypervisorBug, IommuError, NoDevice
from iommusim.frames import Dfn, Mfn
from iommusim.hw.amd import regs
from iommusim.perms import Perm

FREE = 0x20000
D = 0x10000
RW = Perm.RW


def _count_allocations(make: Callable[[], Scenario], op: Callable[[Scenario], object]) -> int:
    s = make()
    before = s.p.machine.allocator.allocations
    op(s)
    return s.p.machine.allocator.allocations - before


def _existing_ok(s: Scenario) -> bool:
    """The mappings every scenario below starts with still reach their frames."""
    return can_read(s.p, s.nic, 5 << 12) is not None and can_read(s.p, s.nic, (D + 1) << 12) is not None


def _fresh() -> Scenario:
    s = scenario(hwdom_passthrough=True)
    s.p.iommu.map_page(s.guest, Dfn(D + 1), Mfn(FREE + 1), RW)
    assert _existing_ok(s)
    return s


def _each_failure(op: Callable[[Scenario], object], make: Callable[[], Scenario] = _fresh) -> int:
    total = _count_allocations(make, op)
    assert total > 0
    for n in range(1, total + 1):
        s = make()
        st = s.driver.arch(s.guest)
        in_use = dict(s.p.machine.allocator.in_use)
        mode, dte, root = st.paging_mode, s.dte(), st.table.root
        s.p.machine.allocator.fail_nth(n)
        with pytest.raises(IommuError):
            op(s)
        assert s.p.machine.allocator.failure is not None and s.p.machine.allocator.failure.fired
        assert dict(s.p.machine.allocator.in_use) == in_use, f"allocation {n} of {total} leaked"
        assert (st.paging_mode, s.dte(), st.table.root) == (mode, dte, root), "half-made state"
        assert _existing_ok(s)
        assert s.guest.crashed  # Xen's AMD map/unmap crash the domain on these failures
    return total


def test_map_page_that_grows_two_levels() -> None:
    # from two levels: 2**27 >> 9 = 2**18 >= 512 -> a level-3 root; 2**18 >> 9 = 512 -> a level-4 root;
    # then slot 1 of the new root is empty: a level-3, a level-2 and a level-1 table.  5 allocations.
    total = _each_failure(lambda s: s.p.iommu.map_page(s.guest, Dfn(1 << 27), Mfn(FREE), RW))
    assert total == 5


def test_map_range_over_new_tables() -> None:
    # 2**20 >> 9 = 2048 >= 512: a level-3 root; slot 4 of it: a level-2 table; 1500 = 2 * 512 + 476 pages
    # from a 2 MiB-aligned frame: two 2 MiB leaves and one level-1 table for the last 476.  3 allocations.
    total = _each_failure(lambda s: s.p.iommu.map(s.guest, Dfn(1 << 20), Mfn(FREE), 1500, RW))
    assert total == 3


def _merged() -> Scenario:
    s = _fresh()
    s.p.iommu.map(s.guest, Dfn(D + 512), Mfn(FREE + 512), 512, RW)
    assert s.translate((D + 600) << 12).page_shift == 21
    return s


def test_unmap_inside_a_superpage_needs_a_table() -> None:
    total = _each_failure(lambda s: s.p.iommu.unmap_page(s.guest, Dfn(D + 600)), _merged)
    assert total == 1
    s = _merged()
    s.p.machine.allocator.fail_nth(1)
    with pytest.raises(IommuError):
        s.p.iommu.unmap_page(s.guest, Dfn(D + 600))
    assert can_read(s.p, s.nic, (D + 600) << 12) is not None  # the superpage is whole


def test_assignment() -> None:
    def make() -> Scenario:
        s = scenario(assign=False, hwdom_passthrough=True)
        s.p.iommu.map_page(s.hwdom, Dfn(D + 1), Mfn(FREE + 1), RW)
        return s

    total = _count_allocations(make, lambda s: s.p.iommu.assign_device(s.guest, s.nic))
    assert total >= 3
    for n in range(1, total + 1):
        s = make()
        in_use = dict(s.p.machine.allocator.in_use)
        s.p.machine.allocator.fail_nth(n)
        with pytest.raises(IommuError):
            s.p.iommu.assign_device(s.guest, s.nic)
        assert dict(s.p.machine.allocator.in_use) == in_use
        assert s.nic.owner is s.hwdom
        assert not s.dte().valid  # still the passthrough hardware domain's entry
        assert can_read(s.p, s.nic, 0x3F00_0000) is not None


def test_assignment_with_a_unity_range() -> None:
    ivmd = {"ivmd": [{"first_pfn": 0x3E000, "pages": 2, "perms": "rw", "devices": [NIC]}]}

    def make() -> Scenario:
        s = scenario(assign=False, hwdom_passthrough=True, extra=ivmd)
        s.p.iommu.assign_device(s.guest, s.disk)  # the guest has tables already
        return s

    total = _count_allocations(make, lambda s: s.p.iommu.assign_device(s.guest, s.nic))
    assert total == 1  # the unity range's level-1 table
    s = make()
    in_use = dict(s.p.machine.allocator.in_use)
    s.p.machine.allocator.fail_nth(1)
    with pytest.raises(IommuError):
        s.p.iommu.assign_device(s.guest, s.nic)
    assert dict(s.p.machine.allocator.in_use) == in_use
    assert s.nic.owner is s.hwdom
    assert s.driver.arch(s.guest).unity == {}


def test_hardware_domain_root_is_a_hypervisor_bug() -> None:
    p = amd_platform(hwdom_passthrough=True)
    p.machine.allocator.fail_nth(1)
    with pytest.raises(HypervisorBug):
        p.create_hardware_domain(16 << 20)


def test_hardware_domain_identity_map() -> None:
    """A failed run is retried page by page (Xen's loop): the map ends complete, nothing leaks."""

    def make() -> object:
        return amd_platform(ram=32 << 20, hwdom_inclusive=False)

    ref = amd_platform(ram=32 << 20, hwdom_inclusive=False)
    before = ref.machine.allocator.allocations
    d_ref = ref.create_hardware_domain(8 << 20)
    total = ref.machine.allocator.allocations - before
    want = ref.iommu.dump_page_tables(d_ref)
    for n in (2, total):  # the first table below the root, and the last allocation of all
        p = make()
        p.machine.allocator.fail_nth(n)  # type: ignore[attr-defined]
        d0 = p.create_hardware_domain(8 << 20)  # type: ignore[attr-defined]
        assert p.iommu.dump_page_tables(d0) == want  # type: ignore[attr-defined]
        assert dict(p.machine.allocator.in_use) == dict(ref.machine.allocator.in_use)  # type: ignore[attr-defined]
        assert d0.crashed  # the AMD driver crashed the hardware domain where the map failed


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_hardware_setup(n: int) -> None:
    from amd_support import devices

    from iommusim.drivers.amd.platform import assemble
    from iommusim.iommu.config import IommuConfig
    from iommusim.platform import HardwareSpec

    p = assemble(HardwareSpec("amd", ram_bytes=64 << 20), IommuConfig(), devices())
    p.machine.allocator.fail_nth(n)  # device table, command buffer, event log, completion semaphore
    p.iommu.setup()
    assert not p.iommu.enabled
    assert isinstance(p.iommu.setup_error, NoDevice)
    assert p.machine.allocator.total_in_use == 0
    assert not p.units[0].mmio.read(regs.CONTROL)  # never turned on
