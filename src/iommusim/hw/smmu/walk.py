"""The SMMU's stage-2 table walk: one input address through the tables in memory, with every check it makes.

The walk starts at the lookup level and with the concatenated root tables the context's translation
control describes, reads one descriptor per level from machine memory and stops at a leaf or at the first
descriptor it cannot use.  It reports faults the way the architecture classifies them:

* translation fault: an invalid descriptor, a reserved encoding, a level-0 block, an input address
  beyond the configured input size or a configuration that does not describe a walk (reported at
  lookup level 0);
* address size fault: a table or output address beyond the output size;
* access flag fault: a leaf with AF = 0, unless the context disables access flag faults (SCTLR.AFFD);
* external fault: a descriptor fetch outside memory.

Permissions are checked by the caller, so that a translation can be cached before the access that needed
it is refused, as hardware TLBs do.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from iommusim.errors import BadAddress
from iommusim.frames import PAGE_SHIFT
from iommusim.machine.memory import MachineMemory
from iommusim.pagetable.arm_s2 import AF, ArmS2Format, S2Geometry, arm_level, our_level
from iommusim.pagetable.format import EntryKind
from iommusim.perms import Perm

__all__ = ["S2FaultKind", "S2Walk", "walk_stage2"]

_FORMAT = ArmS2Format()


class S2FaultKind(Enum):
    TRANSLATION = "translation"
    ACCESS_FLAG = "access-flag"
    PERMISSION = "permission"
    ADDRESS_SIZE = "address-size"
    EXTERNAL = "external"


@dataclass(frozen=True, slots=True)
class S2Walk:
    """How a walk ended: a leaf (``fault is None``) or a fault at an ARM lookup level."""

    fault: S2FaultKind | None
    level: int  # ARM lookup level of the leaf or of the fault
    out: int = 0  # leaf: machine address of the page or block it maps
    page_shift: int = 12
    perms: Perm = Perm.NONE
    raw: int = 0  # the last descriptor read
    reads: int = 0  # descriptors fetched
    during_fetch: bool = False  # the fault happened fetching a descriptor (FSYNR0.PTWF)
    why: str = ""


def walk_stage2(
    memory: MachineMemory,
    ttbr: int,
    geometry: S2Geometry | None,
    ipa: int,
    oas_bits: int,
    *,
    affd: bool = False,
) -> S2Walk:
    """Translate ``ipa`` through the tables at ``ttbr`` (the base of the concatenated root tables)."""
    if geometry is None:
        return S2Walk(S2FaultKind.TRANSLATION, 0, why="T0SZ/SL0/granule do not describe a stage-2 walk")
    if ipa >> geometry.ipa_bits:
        return S2Walk(S2FaultKind.TRANSLATION, 0, why=f"input address beyond the {geometry.ipa_bits}-bit input size")
    oa_limit = 1 << oas_bits
    level = geometry.start_level
    table = ttbr & ~((geometry.root_pages << PAGE_SHIFT) - 1)
    if table >= oa_limit:
        return S2Walk(S2FaultKind.ADDRESS_SIZE, level, why="root table beyond the output size")
    reads = 0
    while True:
        shift = PAGE_SHIFT + 9 * (3 - level)
        index = ipa >> shift
        index &= (geometry.root_pages << 9) - 1 if level == geometry.start_level else 511
        desc_addr = table + index * 8
        try:
            raw = memory.read_u64(desc_addr)
        except BadAddress:
            return S2Walk(
                S2FaultKind.EXTERNAL, level, reads=reads, during_fetch=True, why=f"descriptor at {desc_addr:#x}"
            )
        reads += 1
        ours = our_level(level)
        decoded = _FORMAT.decode(raw, ours)
        if decoded.kind == EntryKind.EMPTY:
            return S2Walk(S2FaultKind.TRANSLATION, level, raw=raw, reads=reads, why="invalid descriptor")
        if decoded.kind == EntryKind.MALFORMED:
            kind = S2FaultKind.ADDRESS_SIZE if _FORMAT.problem(raw, ours).is_address_size else S2FaultKind.TRANSLATION
            return S2Walk(kind, level, raw=raw, reads=reads, why=decoded.problem)
        if decoded.kind == EntryKind.TABLE:
            if decoded.address >= oa_limit:
                return S2Walk(S2FaultKind.ADDRESS_SIZE, level, raw=raw, reads=reads, why="next table beyond OAS")
            table = decoded.address
            level += 1
            continue
        if decoded.address >= oa_limit:
            return S2Walk(S2FaultKind.ADDRESS_SIZE, level, raw=raw, reads=reads, why="output beyond OAS")
        if not raw & AF and not affd:
            return S2Walk(S2FaultKind.ACCESS_FLAG, level, raw=raw, reads=reads, why="access flag clear")
        return S2Walk(
            None,
            arm_level(ours),
            out=decoded.address,
            page_shift=decoded.page_shift,
            perms=decoded.perms,
            raw=raw,
            reads=reads,
        )
