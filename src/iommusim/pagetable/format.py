"""The contract every page-table format fulfils, for the driver that writes it and the hardware that reads it.

Levels are numbered the VT-d/AMD way for every architecture: level 1 holds 4 KiB leaves, level 2 entries
cover 2 MiB, level 3 entries 1 GiB, and so on (ARM's lookup level 3 is our level 1).  A format knows the
bit layout of one entry at one level; the radix algorithm (``radix``) and the walker (``walk``) know the
tree.  Each concrete format is proven by golden values worked out from its specification.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from iommusim.perms import Perm

__all__ = ["ENTRIES_PER_TABLE", "Decoded", "EntryKind", "PageTableFormat", "level_shift"]

ENTRIES_PER_TABLE = 512
U64Array = npt.NDArray[np.uint64]


def level_shift(level: int) -> int:
    """Bit position of the address bits a level's index starts at (12 for level 1, 21 for 2, ...)."""
    return 12 + 9 * (level - 1)


class EntryKind(IntEnum):
    EMPTY = 0  # not present
    TABLE = 1  # points to a table of the next level down
    LEAF = 2  # maps a page or a superpage
    MALFORMED = 3  # present but not decodable: reserved bits set, bad level encoding, ...


@dataclass(frozen=True, slots=True)
class Decoded:
    """One entry, decoded."""

    kind: EntryKind
    raw: int
    level: int
    address: int = 0  # TABLE: the next table's machine address; LEAF: the output base address
    perms: Perm = Perm.NONE
    next_level: int = 0  # TABLE: level of the table pointed to
    page_shift: int = 12  # LEAF: log2 of the size this entry maps
    problem: str = ""  # MALFORMED: what is wrong, in the specification's words

    @property
    def present(self) -> bool:
        return self.kind != EntryKind.EMPTY


class PageTableFormat(ABC):
    """Bit layout of one architecture's translation-table entries."""

    #: Short name used by tools (``vtd-sl``, ``amd-v1``, ``arm-s2``).
    name: str = ""
    #: Mask of the output-address field in an entry (bits 51:12 for every format here).
    addr_mask: int = ((1 << 52) - 1) & ~0xFFF
    #: Bits that make an entry present (any of them set).
    present_mask: int = 1
    #: Levels at which the hardware accepts a leaf (a page or superpage).
    leaf_levels: frozenset[int] = frozenset({1})
    #: Whether read/write rights of table entries restrict what the leaf grants (AND across the walk).
    hierarchical_perms: bool = False

    @abstractmethod
    def table_entry(self, table_maddr: int, level: int) -> int:
        """An entry at ``level`` that points to a table of the next level down at ``table_maddr``."""

    @abstractmethod
    def leaf_bits(self, perms: Perm, level: int, attrs: object | None = None) -> int:
        """Every bit of a leaf at ``level`` except the output address, which the caller ORs in."""

    @abstractmethod
    def decode(self, raw: int, level: int) -> Decoded:
        """Decode one entry the way the hardware does, including every encoding the spec defines."""

    def is_table(self, raw: int, level: int) -> bool:
        """Fast check used on every software walk: does this present entry point to a table?

        Formats override it with a bit test; the default decodes.
        """
        return self.decode(raw, level).kind == EntryKind.TABLE

    def split_leaf_bits(self, raw: int, level: int) -> int:
        """Leaf bits for the 512 children when a superpage at ``level`` is split into ``level - 1`` leaves.

        The default keeps the permissions and attributes; a format whose leaf encoding differs by level
        overrides this.
        """
        return self.leaf_bits(self.decode(raw, level).perms, level - 1, None)

    # -- vectorised views (bulk paths); defaults suit formats whose present bits are ``present_mask`` --

    def present_array(self, words: U64Array) -> npt.NDArray[np.bool_]:
        out: npt.NDArray[np.bool_] = (words & np.uint64(self.present_mask)) != 0
        return out

    def table_array(self, words: U64Array, level: int) -> npt.NDArray[np.bool_]:
        """Which present entries at ``level`` point to tables (rather than being leaves)."""
        return np.fromiter(
            (self.decode(int(w), level).kind == EntryKind.TABLE for w in words), dtype=bool, count=len(words)
        )

    def table_entry_array(self, table_maddrs: U64Array, level: int) -> U64Array:
        """``table_entry`` for many table addresses at once (the bulk map hooks up new tables with it).

        The default calls ``table_entry`` per address; formats whose table entry is the address ORed with
        fixed bits override it with one numpy operation.
        """
        return np.fromiter(
            (self.table_entry(int(a), level) for a in table_maddrs), dtype=np.uint64, count=len(table_maddrs)
        )

    def address_array(self, words: U64Array) -> U64Array:
        out: U64Array = words & np.uint64(self.addr_mask)
        return out

    def malformed_array(self, words: U64Array, level: int) -> npt.NDArray[np.bool_]:
        """Which entries the hardware would refuse to use (reserved bits, bad encodings)."""
        return np.fromiter(
            (self.decode(int(w), level).kind == EntryKind.MALFORMED for w in words), dtype=bool, count=len(words)
        )

    def leaf_shift_array(self, words: U64Array, level: int) -> npt.NDArray[np.int64]:
        """log2 of the page each leaf maps (the level's own size unless the format encodes another)."""
        return np.full(len(words), level_shift(level), dtype=np.int64)

    def perms_array(self, words: U64Array, level: int) -> npt.NDArray[np.uint8]:
        return np.fromiter((int(self.decode(int(w), level).perms) for w in words), dtype=np.uint8, count=len(words))
