"""Regression tests for the foundation changes the SMMU vendor needed."""

from __future__ import annotations

from collections.abc import Iterator

from iommusim.frames import Gfn, Mfn
from iommusim.machine import DictP2m, DomainKind, Machine
from iommusim.machine.p2m import P2mEntry, P2mType


class _RecordingP2m:
    """A p2m that only records whether the machine released it."""

    def __init__(self) -> None:
        self.torn_down = 0

    def set_entry(self, gfn: Gfn, mfn: Mfn, order: int, type: P2mType) -> None:
        pass

    def remove(self, gfn: Gfn, order: int) -> None:
        pass

    def lookup(self, gfn: Gfn) -> P2mEntry | None:
        return None

    def items(self) -> Iterator[tuple[Gfn, P2mEntry]]:
        return iter(())

    def teardown(self) -> None:
        self.torn_down += 1


def test_destroy_domain_tears_the_p2m_down() -> None:
    m = Machine(ram_bytes=64 << 20)
    made: list[_RecordingP2m] = []

    def factory(_d: object) -> _RecordingP2m:
        made.append(_RecordingP2m())
        return made[-1]

    m.p2m_factory = factory
    d = m.create_domain(1, DomainKind.HVM, memory_bytes=1 << 20)
    assert made[0].torn_down == 0
    m.destroy_domain(d)
    assert made[0].torn_down == 1


def test_dict_p2m_teardown_forgets_everything() -> None:
    p = DictP2m()
    p.set_entry(Gfn(4), Mfn(8), 1, P2mType.RAM_RW)
    assert len(p) == 2
    p.teardown()
    assert len(p) == 0 and p.lookup(Gfn(4)) is None
