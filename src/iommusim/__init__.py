"""iommusim: an executable model of Xen's IOMMU layer and the VT-d, AMD-Vi and ARM SMMU hardware below it."""

from iommusim.frames import (
    INVALID_DFN,
    INVALID_GFN,
    INVALID_MFN,
    Daddr,
    Dfn,
    Gaddr,
    Gfn,
    Maddr,
    Mfn,
    daddr_to_dfn,
    dfn_to_daddr,
    gaddr_to_gfn,
    gfn_to_gaddr,
    maddr_to_mfn,
    mfn_to_maddr,
)
from iommusim.perms import FlushFlags, Perm

__version__ = "0.1.0"

__all__ = [
    "INVALID_DFN",
    "INVALID_GFN",
    "INVALID_MFN",
    "Daddr",
    "Dfn",
    "FlushFlags",
    "Gaddr",
    "Gfn",
    "Maddr",
    "Mfn",
    "Perm",
    "__version__",
    "daddr_to_dfn",
    "dfn_to_daddr",
    "gaddr_to_gfn",
    "gfn_to_gaddr",
    "maddr_to_mfn",
    "mfn_to_maddr",
]
