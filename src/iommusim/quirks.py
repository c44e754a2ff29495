"""Named switches that reproduce defects of the seed-era Xen code.

The model is correct by default.  Each quirk brings back one historic behaviour so that users can see
what it broke and check that their tools catch it.  The text says what the defect was and which commit
fixed it (facts file, ../shared/spec).
"""

from __future__ import annotations

from iommusim.errors import InvalidArgument

__all__ = ["QUIRKS", "check_quirks"]

QUIRKS: dict[str, str] = {
    "lookup-null-deref": (
        "generic lookup_page calls a vendor op that AMD and ARM do not provide (a NULL dereference at the "
        "seed; fixed by 14e122fcc4): modelled as a hypervisor BUG"
    ),
    "amd-remap-perm-no-flush": (
        "AMD map decides to flush by comparing addresses only, so remapping a page with new permissions "
        "(or a first mapping of mfn 0) is not flushed (fixed by 1a7ffe466c, XSA-275)"
    ),
    "amd-pv-no-map-flush": "AMD never flushes a PV domain's map (fixed by 1a7ffe466c)",
    "amd-no-iotlb-flush-op": (
        "AMD has no iotlb_flush ops at the seed: the generic layer's explicit flushes are no-ops and the driver "
        "flushes inside every map/unmap even when the caller batches (ops added by cbe21fd047)"
    ),
    "amd-unmap-grows-tree": "AMD unmap walks with allocation and can grow the tree (fixed by ad591454f0)",
    "amd-cmd-ring-drop": "a full AMD command ring silently drops the command (fixed by c4e4434357, XSA-373)",
    "amd-iotlb-s-bit-zero": "INVALIDATE_IOTLB_PAGES never carries S=1 (the shift/mask mix-up, still at N)",
    "amd-split-rw-children": "splitting an AMD superpage gives every child IR=IW=1 (fixed by b8238afd07)",
    "amd-merge-counter": (
        "merge by the seed's 512-event counter in AMD PDEs instead of checking the table is really full, "
        "contiguous and uniform (the counter is not an occupancy check; merging removed by 5c08550ff4)"
    ),
    "amd-unity-map-seed": (
        "AMD ignores errors mapping a device's IVMD unity ranges on assignment and leaves the ranges mapped in "
        "the guest after the device leaves (fixed by 34750a3eb0 and 899272539c, XSA-378)"
    ),
    "amd-no-lookup-op": "AMD provides no lookup_page op, as in every Xen release (the model provides one by default)",
    "vtd-flush-rc-overwritten": (
        "VT-d keeps only the last unit's flush result, so an earlier unit's failure is lost (fixed by e7059776f9)"
    ),
    "arm-p2m-no-smmu-flush": (
        "after the need_iommu split, ARM's p2m flush hook tests need_iommu_pt_sync, which is never true "
        "with shared tables, so the SMMU TLB is not flushed after p2m changes (fixed by 9ed527dc95)"
    ),
    "smmu-sl0-level1": (
        "the SMMU context bank's TCR.SL0 is hard-coded to start the walk at lookup level 1, wrong for a p2m "
        "rooted at level 0 (IPA sizes of 44 and 48 bits) (fixed by 9ae1197582)"
    ),
}
QUIRKS["vtd-dfn-truncated"] = (
    "VT-d map/unmap/lookup mask a dfn to the domain's 48-bit width instead of refusing it, so a dfn beyond the "
    "width silently aliases a low one (addr_to_dma_page_maddr at the seed)"
)
QUIRKS["vtd-lookup-enomem"] = (
    "VT-d lookup_page of a dfn with no leaf table returns ENOMEM instead of ENOENT (as added in dd93d54fef)"
)


def check_quirks(names: frozenset[str] | set[str]) -> frozenset[str]:
    unknown = sorted(set(names) - set(QUIRKS))
    if unknown:
        raise InvalidArgument(f"unknown quirk(s): {', '.join(unknown)}; known: {', '.join(sorted(QUIRKS))}")
    return frozenset(names)
