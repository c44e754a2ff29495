"""Regression tests for the foundation changes the SMMU vendor needed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from iommusim.errors import OutOfMemory
from iommusim.frames import Gfn, Mfn
from iommusim.machine import DOMID_INVALID, DictP2m, DomainKind, Machine
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
    assert len(p) == 0
    assert p.lookup(Gfn(4)) is None


class _FailingP2m(DictP2m):
    """A p2m whose third update fails with ENOMEM, as a stage-2 table can when it needs a new table."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.torn_down = False

    def set_entry(self, gfn: Gfn, mfn: Mfn, order: int, type: P2mType) -> None:
        self.calls += 1
        if self.calls == 3:
            raise OutOfMemory("no frame for a p2m table")
        super().set_entry(gfn, mfn, order, type)

    def teardown(self) -> None:
        self.torn_down = True
        super().teardown()


def test_create_domain_leaves_nothing_when_the_p2m_fails() -> None:
    m = Machine(ram_bytes=64 << 20)
    made: list[_FailingP2m] = []

    def factory(_d: object) -> _FailingP2m:
        made.append(_FailingP2m())
        return made[-1]

    m.p2m_factory = factory
    owned_before = int((m.pages.owner != DOMID_INVALID).sum())
    with pytest.raises(OutOfMemory):
        # 0x301 frames are populated in several naturally aligned pieces; the third one fails
        m.create_domain(1, DomainKind.HVM, memory_bytes=0x301 << 12)
    assert 1 not in m.domains
    assert made[0].torn_down
    assert int((m.pages.owner != DOMID_INVALID).sum()) == owned_before
