"""How Xen sizes the stage-2 p2m (setup_virt_paging) and hands out the CPU's VMIDs.

Xen reads the CPUs' physical address range (ID_AA64MMFR0_EL1.PARange) and picks, from one fixed table, the
input size (T0SZ), the initial lookup level (SL0) and how many root tables are concatenated.  Every domain's
p2m then has that shape, and VTCR_EL2 describes it to the CPU.  The SMMU must be told the same shape in its
context bank's translation control register, or it walks the p2m from the wrong level.
"""

from __future__ import annotations

from dataclasses import dataclass

from iommusim.errors import Busy, InvalidArgument
from iommusim.pagetable.arm_s2 import S2Geometry, s2_geometry_aarch64

__all__ = ["PA_RANGE_BITS", "P2mLayout", "VmidAllocator", "p2m_layout_for_pa_range"]

#: PARange in bits -> (PS encoding, T0SZ, root order, SL0): Xen's pa_range_info for AArch64.
#: A 42-bit PA range still gets a 40-bit IPA (T0SZ 24), as in Xen.
_PA_RANGE_INFO: dict[int, tuple[int, int, int, int]] = {
    32: (0, 32, 0, 1),
    36: (1, 28, 0, 1),
    40: (2, 24, 1, 1),
    42: (3, 24, 1, 1),
    44: (4, 20, 0, 2),
    48: (5, 16, 0, 2),
}
PA_RANGE_BITS = tuple(_PA_RANGE_INFO)

# VTCR_EL2 fields
_VTCR_RES1 = 1 << 31
_VTCR_SH0_INNER = 3 << 12
_VTCR_ORGN0_WBWA = 1 << 10
_VTCR_IRGN0_WBWA = 1 << 8
_VTCR_PS_SHIFT = 16
_VTCR_SL0_SHIFT = 6


@dataclass(frozen=True, slots=True)
class P2mLayout:
    """The p2m shape every domain gets, and the VTCR_EL2 value that describes it to the CPU."""

    pa_bits: int
    t0sz: int
    sl0: int
    root_order: int
    vtcr: int
    geometry: S2Geometry

    @property
    def ipa_bits(self) -> int:
        return 64 - self.t0sz

    @property
    def root_level(self) -> int:
        """ARM lookup level of the root (Xen's P2M_ROOT_LEVEL = 2 - SL0)."""
        return 2 - self.sl0

    @property
    def root_pages(self) -> int:
        return 1 << self.root_order

    @property
    def gfn_limit(self) -> int:
        """First guest frame the p2m cannot hold."""
        return 1 << (self.ipa_bits - 12)


def p2m_layout_for_pa_range(pa_bits: int) -> P2mLayout:
    """Xen's choice for a CPU physical address range of ``pa_bits`` (32, 36, 40, 42, 44 or 48)."""
    info = _PA_RANGE_INFO.get(pa_bits)
    if info is None:
        raise InvalidArgument(f"no AArch64 PARange of {pa_bits} bits; known: {', '.join(map(str, PA_RANGE_BITS))}")
    ps, t0sz, root_order, sl0 = info
    geometry = s2_geometry_aarch64(t0sz, sl0)
    # Xen's table is consistent with the architecture: the same T0SZ/SL0 yield its root order
    assert geometry is not None
    assert geometry.root_pages == 1 << root_order
    vtcr = (
        _VTCR_RES1
        | _VTCR_SH0_INNER
        | _VTCR_ORGN0_WBWA
        | _VTCR_IRGN0_WBWA
        | (ps << _VTCR_PS_SHIFT)
        | (sl0 << _VTCR_SL0_SHIFT)
        | t0sz
    )
    return P2mLayout(pa_bits, t0sz, sl0, root_order, vtcr, geometry)


class VmidAllocator:
    """The CPU's VMIDs (8-bit): VMID 0 is reserved, the first free one is taken (Xen's p2m_alloc_vmid)."""

    def __init__(self, bits: int = 8) -> None:
        self.limit = 1 << bits
        self._used: set[int] = {0}

    def alloc(self) -> int:
        for vmid in range(1, self.limit):
            if vmid not in self._used:
                self._used.add(vmid)
                return vmid
        raise Busy("VMID pool exhausted")

    def free(self, vmid: int) -> None:
        if vmid:
            self._used.discard(vmid)

    @property
    def in_use(self) -> int:
        return len(self._used) - 1
