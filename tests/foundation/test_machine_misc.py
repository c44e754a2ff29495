"""Domains, PCI names, E820, console rate limiting, DMA without an IOMMU."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iommusim.console import Console, LogLevel, SimClock
from iommusim.errors import AlreadyExists, DmaFault, InvalidArgument, NoDevice, NoSuchDomain
from iommusim.frames import Daddr
from iommusim.machine import (
    DomainKind,
    DomainState,
    E820Entry,
    E820Map,
    E820Type,
    Machine,
    PageType,
    PciDevice,
    Sbdf,
)


def test_domain_lifecycle_and_crash() -> None:
    m = Machine(ram_bytes=16 << 20)
    d = m.create_domain(3, DomainKind.HVM)
    assert d.state == DomainState.RUNNING and not d.is_shutting_down
    d.crash("map failed")
    assert d.state == DomainState.CRASHED and d.is_shutting_down and d.crashed
    assert d.crash_reasons == ["map failed"]
    d.crash("again")
    assert d.state == DomainState.CRASHED and len(d.crash_reasons) == 2
    with pytest.raises(AlreadyExists):
        m.create_domain(3, DomainKind.PV)
    with pytest.raises(NoSuchDomain):
        m.domain(99)
    m.create_domain(0, DomainKind.PV, hardware=True)
    with pytest.raises(AlreadyExists):
        m.create_domain(4, DomainKind.PV, hardware=True)
    s = m.create_domain(5, DomainKind.PV)
    s.shutdown()
    assert s.state == DomainState.SHUTTING_DOWN and s.is_shutting_down


@given(st.integers(0, 0xFFFF), st.integers(0, 255), st.integers(0, 31), st.integers(0, 7))
def test_sbdf_round_trip(seg: int, bus: int, dev: int, fn: int) -> None:
    s = Sbdf(seg, bus, dev, fn)
    assert Sbdf.parse(str(s)) == s
    assert Sbdf.from_bdf(s.bdf, seg) == s
    assert s.devfn == dev * 8 + fn


def test_sbdf_golden_and_errors() -> None:
    s = Sbdf.parse("0000:00:02.0")
    assert (s.seg, s.bus, s.dev, s.fn) == (0, 0, 2, 0) and str(s) == "0000:00:02.0"
    # bus 0x03, device 0x1f, function 7: requester id = 0x03 << 8 | (0x1f << 3 | 7) = 0x03ff
    assert Sbdf.parse("03:1f.7").bdf == 0x03FF
    for bad in ("0000:00:02", "00:20.0", "0000:00:02.8", "zz:00.0", ""):
        with pytest.raises(InvalidArgument):
            Sbdf.parse(bad)


def test_phantom_functions() -> None:
    dev = PciDevice(Sbdf.parse("0000:05:00.0"), phantom_stride=2)
    assert dev.phantom_devfns == [2, 4, 6]
    assert PciDevice(Sbdf.parse("0000:05:00.0")).phantom_devfns == []


def test_pci_bus() -> None:
    m = Machine(ram_bytes=16 << 20)
    dev = m.add_pci_device(PciDevice(Sbdf.parse("0000:01:00.0")))
    assert m.pci.get("0000:01:00.0") is dev
    with pytest.raises(NoDevice):
        m.pci.get("0000:02:00.0")
    with pytest.raises(AlreadyExists):
        m.add_pci_device(PciDevice(Sbdf.parse("0000:01:00.0")))


def test_e820() -> None:
    e = E820Map([E820Entry(0, 100, E820Type.RAM), E820Entry(100, 10, E820Type.RESERVED)])
    assert e.type_of(50) == E820Type.RAM and e.type_of(105) == E820Type.RESERVED and e.type_of(200) is None
    with pytest.raises(InvalidArgument):
        E820Map([E820Entry(0, 100, E820Type.RAM), E820Entry(50, 10, E820Type.RESERVED)])


def test_page_types_decide_device_writability() -> None:
    m = Machine(ram_bytes=16 << 20)
    m.pages.set_type(300, PageType.L1_PAGE_TABLE)
    m.pages.set_type(301, PageType.WRITABLE)
    m.pages.set_type(302, PageType.SEG_DESC, type_count=0)  # typed but no reference: still writable
    import numpy as np

    w = m.pages.device_writable(np.array([300, 301, 302, 303]))
    assert list(w) == [False, True, True, True]


def test_rate_limiter_token_bucket() -> None:
    clock = SimClock()
    c = Console(clock)
    printed = [c.printk_ratelimited(LogLevel.ERR, f"msg {i}") for i in range(15)]
    assert printed == [True] * 10 + [False] * 5  # a burst of 10, then nothing until tokens come back
    clock.advance_ms(5000)  # one token every 5000 ms
    assert c.printk_ratelimited(LogLevel.ERR, "later")
    texts = [line.text for line in c.lines]
    assert texts[-2:] == ["printk: 5 messages suppressed.", "later"]
    assert not c.printk_ratelimited(LogLevel.ERR, "too soon")
    clock.advance_ms(100_000)  # the bucket refills to the burst, not beyond
    assert [c.printk_ratelimited(LogLevel.ERR, "x") for _ in range(11)] == [True] * 10 + [False]


def test_dma_without_iommu_reaches_machine_memory() -> None:
    m = Machine(ram_bytes=16 << 20)
    dev = m.add_pci_device(PciDevice(Sbdf.parse("0000:01:00.0")))
    m.dma.write(dev, Daddr(0x3FF0), b"x" * 32)
    assert m.memory.read_bytes(0x3FF0, 32) == b"x" * 32
    assert m.dma.read(dev, Daddr(0x3FF0), 32) == b"x" * 32
    dev.bus_master = False
    with pytest.raises(DmaFault, match="bus mastering"):
        m.dma.read(dev, Daddr(0), 4)
    with pytest.raises(TypeError):
        m.dma.read(dev, 0, 4)  # type: ignore[arg-type]
