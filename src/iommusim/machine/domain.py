"""Domains: identity, kind, memory, lifecycle and the crash that Xen's error policy applies.

A domain is PV (untranslated: its own page tables name machine frames, the M2P says which guest frame each
page is) or HVM (translated through a p2m); the hardware domain is either, and on ARM it is direct-mapped
(guest frame == machine frame).  ``crash()`` is Xen's ``domain_crash()``: the domain is marked as shutting
down for a crash and stays that way; the IOMMU layer's logging and crash policy read that state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from iommusim.frames import Gfn, Mfn

if TYPE_CHECKING:
    from iommusim.machine.p2m import P2m
    from iommusim.machine.pci import PciDevice

__all__ = ["Domain", "DomainKind", "DomainState", "Extent"]


class DomainKind(Enum):
    PV = "pv"
    HVM = "hvm"


class DomainState(Enum):
    RUNNING = "running"
    SHUTTING_DOWN = "shutting-down"
    CRASHED = "crashed"
    DYING = "dying"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of machine frames a domain owns, and the guest frame the first of them appears at."""

    mfn: Mfn
    count: int
    gfn: Gfn


@dataclass(eq=False)
class Domain:
    domid: int
    kind: DomainKind
    is_hardware: bool = False
    direct_mapped: bool = False
    hap: bool = True  # HVM only: hardware-assisted paging (EPT/NPT) in use
    name: str = ""
    state: DomainState = DomainState.RUNNING
    p2m: P2m | None = None
    extents: list[Extent] = field(default_factory=list)
    pci_devices: list[PciDevice] = field(default_factory=list)
    #: Features that make device assignment impossible (Xen returns -EXDEV).
    mem_sharing: bool = False
    mem_paging: bool = False
    log_dirty: bool = False
    #: The generic IOMMU layer's per-domain state (Xen's struct domain_iommu); set by domain_init.
    iommu: Any = None
    crash_reasons: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = f"d{self.domid}"

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__

    # -- kind predicates (Xen's names) -------------------------------------------------------------

    @property
    def is_hvm(self) -> bool:
        return self.kind == DomainKind.HVM

    @property
    def is_pv(self) -> bool:
        return self.kind == DomainKind.PV

    @property
    def paging_mode_translate(self) -> bool:
        """The guest's frames go through a p2m (HVM, and every ARM domain)."""
        return self.kind == DomainKind.HVM

    # -- lifecycle --------------------------------------------------------------------------------------

    @property
    def is_shutting_down(self) -> bool:
        return self.state != DomainState.RUNNING

    @property
    def is_dying(self) -> bool:
        return self.state in (DomainState.DYING, DomainState.DEAD)

    @property
    def crashed(self) -> bool:
        return bool(self.crash_reasons)

    def crash(self, reason: str = "") -> None:
        """domain_crash(): remember why, and enter the crashed state unless already dying."""
        self.crash_reasons.append(reason or "domain_crash")
        if self.state in (DomainState.RUNNING, DomainState.SHUTTING_DOWN):
            self.state = DomainState.CRASHED

    def shutdown(self) -> None:
        if self.state == DomainState.RUNNING:
            self.state = DomainState.SHUTTING_DOWN

    # -- memory ---------------------------------------------------------------------------------------

    @property
    def tot_pages(self) -> int:
        return sum(e.count for e in self.extents)
