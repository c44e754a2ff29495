"""Per-domain AMD state (Xen's arch_iommu AMD fields) and the paging mode a domain starts with."""

from __future__ import annotations

from dataclasses import dataclass, field

from iommusim.errors import OutOfMemory
from iommusim.frames import Mfn
from iommusim.pagetable.radix import RadixTable
from iommusim.perms import Perm

__all__ = ["HVM_INITIAL_LEVELS", "AmdDomain", "UnityRange", "paging_mode_for"]

HVM_INITIAL_LEVELS = 2  # translated domains start with two levels and grow on demand


def paging_mode_for(frames: int) -> int:
    """Xen's get_paging_mode: the fewest levels whose reach holds ``frames`` 4 KiB frames (ENOMEM past 6).

    4 Mi frames (16 GiB): 4 Mi -> 8 Ki -> 16 entries, three levels; up to 512 frames: one level.
    """
    if frames <= 0:
        raise ValueError("a paging mode covers at least one frame")
    level = 1
    while frames > 512:
        frames = -(-frames // 512)
        level += 1
        if level > 6:
            raise OutOfMemory(f"{frames} frames need more than six levels")
    return level


@dataclass(frozen=True)
class UnityRange:
    first_pfn: int
    pages: int
    perms: Perm


@dataclass(eq=False)
class AmdDomain:
    """The domain's I/O page tables and what was mapped for firmware on its behalf."""

    table: RadixTable
    #: IVMD ranges mapped 1:1 into the domain, with the requestor ids that need each one.
    unity: dict[UnityRange, set[int]] = field(default_factory=dict)
    #: Table frames a merge unhooked; freed once the domain's caches were flushed.
    pending_free: list[Mfn] = field(default_factory=list)

    @property
    def paging_mode(self) -> int:
        return self.table.levels
