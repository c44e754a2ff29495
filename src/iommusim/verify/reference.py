"""The plain reference model: what every device may reach, whichever vendor sits under the hypervisor.

Per domain it keeps a dictionary Dfn -> (Mfn, Perm) (the DMA view the hypervisor has asked for), which
domain owns each device (``None``: the hardware domain) and the *stale windows*: for each Dfn changed
with its flush skipped on purpose, the translations it had since, which the hardware may keep using
until an invalidation covers the Dfn.  It knows nothing about tables, caches or registers, so any
vendor whose devices do something this model does not allow has a bug (or a quirk switched on).

Rules it encodes, which are the contract of the generic layer:

* a change made with its flush (``flushed=True``) that modified a present translation flushes its whole
  range, closing the windows there: the layer flushes ``[dfn, dfn + count)`` once per call;
* a change that only adds a translation needs no flush (nothing caches "not present"), so it never
  opens a window, and a flushed call that only adds closes none (no flush is sent); with
  ``negative_caching`` (VT-d caching mode: the unit caches "not present" too) a skipped addition may
  leave "not present" cached, and a flushed one invalidates only that (VT-d flushes non-present entries
  under domain id 0), never the stale translations of earlier changes;
* a block (one call for many Dfns, such as a 2 MiB map) may replace a whole table by a leaf: until its
  flush the unit's paging-structure caches may still lead a walk into the old table, so with the flush
  skipped the Dfns it adds may still fault (found by the differential machine on VT-d: a 2 MiB map
  over a split block, flush skipped, left the PDE cache pointing at the old leaf table);
* an explicit flush closes the windows it covers; a flush of everything closes all of the domain's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from iommusim.frames import Dfn, Mfn
from iommusim.perms import Perm

__all__ = ["RefDomain", "RefEntry", "ReferenceModel"]


@dataclass(frozen=True, slots=True)
class RefEntry:
    """One translation: the machine frame and what a device may do there."""

    mfn: Mfn
    perms: Perm

    def __str__(self) -> str:
        return f"{self.mfn!r} {self.perms.short()}"


@dataclass
class RefDomain:
    domid: int
    view: dict[Dfn, RefEntry] = field(default_factory=dict)
    #: Dfn -> translations it had since its flush was skipped (the hardware may still use them; None: a
    #: cached "not present", with negative caching only).
    stale: dict[Dfn, set[RefEntry | None]] = field(default_factory=dict)
    crashed: bool = False


class ReferenceModel:
    """Domains, their DMA views and stale windows, and who owns each device."""

    def __init__(self, *, negative_caching: bool = False) -> None:
        self.negative_caching = negative_caching
        self.domains: dict[int, RefDomain] = {}
        #: device name -> domid of its owner; None is the hardware domain
        self.owner: dict[str, int | None] = {}

    # -- life cycle -------------------------------------------------------------------------------------

    def add_device(self, name: str) -> None:
        """A device on the bus, owned by the hardware domain at boot."""
        self.owner[name] = None

    def create(self, domid: int, view: Mapping[Dfn, RefEntry]) -> RefDomain:
        if domid in self.domains:
            raise ValueError(f"reference: d{domid} exists already")
        d = self.domains[domid] = RefDomain(domid, dict(view))
        return d

    def domain(self, domid: int) -> RefDomain:
        return self.domains[domid]

    def crash(self, domid: int) -> None:
        self.domains[domid].crashed = True

    def destroy(self, domid: int) -> None:
        """The domain goes away; its devices return to the hardware domain."""
        del self.domains[domid]
        for name, owner in self.owner.items():
            if owner == domid:
                self.owner[name] = None

    def devices_of(self, domid: int | None) -> list[str]:
        return sorted(n for n, o in self.owner.items() if o == domid)

    def assign(self, name: str, domid: int) -> None:
        if self.owner[name] is not None:
            raise ValueError(f"reference: {name} belongs to d{self.owner[name]}, not the hardware domain")
        if domid not in self.domains:
            raise ValueError(f"reference: no d{domid}")
        self.owner[name] = domid

    def deassign(self, name: str) -> None:
        self.owner[name] = None

    # -- the DMA view -------------------------------------------------------------------------------------

    def update(self, domid: int, first: Dfn, new: Sequence[RefEntry | None], *, flushed: bool) -> int:
        """``len(new)`` consecutive Dfns from ``first`` take the given translations (None: unmapped).

        One call is one call of the generic layer: with ``flushed`` its range is flushed once if any
        present translation changed.  Returns how many present translations changed.
        """
        d = self.domains[domid]
        modified = added = 0
        for i, entry in enumerate(new):
            dfn = first + i
            old = d.view.get(dfn)
            if old == entry:
                continue
            if entry is None:
                del d.view[dfn]
            else:
                d.view[dfn] = entry
            if old is not None:
                modified += 1
                if not flushed:
                    d.stale.setdefault(dfn, set()).add(old)
            elif not flushed and (self.negative_caching or len(new) > 1):
                d.stale.setdefault(dfn, set()).add(None)
            else:
                added += 1
        if flushed and modified:
            self.flush(domid, first, len(new))
        elif flushed and added and self.negative_caching:
            self._forget_not_present(d, first, len(new))
        return modified

    @staticmethod
    def _forget_not_present(d: RefDomain, first: Dfn, count: int) -> None:
        """A flush of non-present entries: cached "not present" goes, stale translations stay."""
        for i in range(count):
            dfn = first + i
            left = d.stale.get(dfn)
            if left is not None and None in left:
                left.discard(None)
                if not left:
                    del d.stale[dfn]

    def flush(self, domid: int, first: Dfn, count: int) -> None:
        """An invalidation of ``[first, first + count)`` reached the hardware."""
        d = self.domains[domid]
        if count <= 0 or not d.stale:
            return
        if count < len(d.stale):
            for i in range(count):
                d.stale.pop(first + i, None)
            return
        end = first + count
        for dfn in [x for x in d.stale if first <= x < end]:
            del d.stale[dfn]

    def flush_all(self, domid: int) -> None:
        self.domains[domid].stale.clear()

    # -- what a device may see ------------------------------------------------------------------------------

    def lookup(self, domid: int, dfn: Dfn) -> RefEntry | None:
        """What the tables must say now (stale caches do not matter to a lookup)."""
        return self.domains[domid].view.get(dfn)

    def allowed(self, domid: int, dfn: Dfn) -> set[RefEntry | None]:
        """Every translation a device of the domain may get for ``dfn`` now (None: a fault)."""
        d = self.domains[domid]
        return {d.view.get(dfn)} | d.stale.get(dfn, set())

    def outcomes(self, domid: int, dfn: Dfn, access: Perm) -> set[Mfn | None]:
        """The machine frames an access may reach (None: it may fault)."""
        out: set[Mfn | None] = set()
        for e in self.allowed(domid, dfn):
            out.add(e.mfn if e is not None and access & e.perms == access else None)
        return out

    def pending(self, domid: int) -> list[Dfn]:
        """Dfns whose flush is still owed (sorted)."""
        return sorted(self.domains[domid].stale, key=lambda x: x.value)

    def touched_frames(self, domid: int, dfns: Iterable[Dfn]) -> set[Mfn]:
        """Every frame the given Dfns may reach now, for checking where a DMA write landed."""
        out: set[Mfn] = set()
        for dfn in dfns:
            out |= {e.mfn for e in self.allowed(domid, dfn) if e is not None}
        return out
