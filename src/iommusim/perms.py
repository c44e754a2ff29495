"""Mapping permissions and flush flags shared by every layer.

``Perm`` is Xen's IOMMUF_readable / IOMMUF_writable (bits 0 and 1 in the seed era); a DMA access is the
single permission it needs.  ``FlushFlags`` are the later IOMMU_FLUSHF_* bits that a map or unmap reports
so that a batch of changes can be flushed once.
"""

from __future__ import annotations

from enum import IntFlag

__all__ = ["FlushFlags", "Perm"]


class Perm(IntFlag):
    NONE = 0
    R = 1
    W = 2
    RW = 3

    def short(self) -> str:
        """'rw', 'r-', '-w' or '--', the way dumps print it."""
        return ("r" if self & Perm.R else "-") + ("w" if self & Perm.W else "-")

    @classmethod
    def parse(cls, text: str) -> Perm:
        """Parse 'r', 'w', 'rw', 'r-', '--' (case-insensitive); anything else is a ValueError."""
        t = text.strip().lower().replace("-", "")
        if not set(t) <= {"r", "w"} or len(set(t)) != len(t):
            raise ValueError(f"bad permission string {text!r}: use r, w or rw")
        p = cls.NONE
        if "r" in t:
            p |= cls.R
        if "w" in t:
            p |= cls.W
        return p


class FlushFlags(IntFlag):
    """What a change did, so the caller knows which flush it needs (Xen's IOMMU_FLUSHF_*)."""

    NONE = 0
    ADDED = 1  # a new present entry was written where none was
    MODIFIED = 2  # a present entry was changed or cleared
    ALL = 4  # the change needs a flush of the whole domain (e.g. a table was replaced)
