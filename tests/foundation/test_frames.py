"""Run-time behaviour of the typed frame numbers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from iommusim import (
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
from iommusim.errors import FrameRangeError
from iommusim.frames import PAGE_SHIFT, PAGE_SIZE, expect_kind

KINDS = [Mfn, Gfn, Dfn, Maddr, Daddr, Gaddr]
u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
small = st.integers(min_value=0, max_value=(1 << 40))


@pytest.mark.parametrize("a", KINDS)
@pytest.mark.parametrize("b", KINDS)
def test_equality_across_kinds_is_never_true(a: type, b: type) -> None:
    x, y = a(0x1234), b(0x1234)
    if a is b:
        assert x == y
        assert hash(x) == hash(y)
    else:
        assert x != y
        assert (x == y) is False


@pytest.mark.parametrize("kind", KINDS)
def test_equality_with_bare_int_is_never_true(kind: type) -> None:
    assert kind(5) != 5
    assert kind(5) != 5


@pytest.mark.parametrize("a", KINDS)
@pytest.mark.parametrize("b", KINDS)
def test_mixing_kinds_in_arithmetic_names_both(a: type, b: type) -> None:
    if a is b:
        assert a(7) - b(5) == 2
        with pytest.raises(TypeError, match=f"{a.__name__} and {b.__name__}"):
            a(7) + b(5)
        return
    with pytest.raises(TypeError, match=f"{a.__name__} and {b.__name__}"):
        a(7) + b(5)
    with pytest.raises(TypeError, match=f"{a.__name__} and {b.__name__}"):
        a(7) - b(5)
    for op in ("__lt__", "__le__", "__gt__", "__ge__"):
        with pytest.raises(TypeError, match=f"{a.__name__} and {b.__name__}"):
            getattr(a(7), op)(b(5))


@given(small, st.integers(min_value=0, max_value=1 << 20))
def test_arithmetic_keeps_the_kind(v: int, n: int) -> None:
    for kind in KINDS:
        x = kind(v)
        assert type(x + n) is kind and (x + n).value == v + n
        assert type(n + x) is kind
        if n <= v:
            assert type(x - n) is kind and (x - n).value == v - n
        assert (x + n) - x == n and type((x + n) - x) is int


def test_ordering_within_a_kind() -> None:
    assert Dfn(1) < Dfn(2) <= Dfn(2) and Dfn(3) > Dfn(2) >= Dfn(2)
    assert sorted([Mfn(3), Mfn(1), Mfn(2)]) == [Mfn(1), Mfn(2), Mfn(3)]


def test_constructor_refuses_other_kinds_and_non_ints() -> None:
    with pytest.raises(TypeError, match=r"Dfn.*Mfn"):
        Dfn(Mfn(3))  # type: ignore[arg-type]
    for bad in (1.0, "3", None, True):
        with pytest.raises(TypeError):
            Dfn(bad)  # type: ignore[arg-type]
    assert Dfn(np.uint64(9)) == Dfn(9)  # bulk paths hand in numpy integers


def test_range() -> None:
    with pytest.raises(FrameRangeError):
        Dfn(-1)
    with pytest.raises(FrameRangeError):
        Dfn(1 << 64)
    with pytest.raises(FrameRangeError):
        INVALID_DFN + 1
    assert isinstance(FrameRangeError("x"), ValueError)


def test_immutable_and_picklable() -> None:
    d = Dfn(5)
    with pytest.raises(AttributeError):
        d.value = 6  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(d)) == d


def test_sentinels_and_formats() -> None:
    assert INVALID_MFN.value == INVALID_GFN.value == INVALID_DFN.value == (1 << 64) - 1
    assert INVALID_MFN != INVALID_DFN
    assert repr(Dfn(0x1F000)) == "Dfn(0x1f000)" == str(Dfn(0x1F000))
    # PRI_mfn is %05lx (zero padded to 5), PRI_dfn is plain %lx
    assert Mfn(0x1F).xen() == "0001f" and Gfn(0x1F).xen() == "0001f" and Dfn(0x1F).xen() == "1f"
    assert int(Mfn(7)) == 7 and Mfn(7).value == 7


@given(u64)
def test_conversions_round_trip(v: int) -> None:
    frame = v >> PAGE_SHIFT
    assert daddr_to_dfn(dfn_to_daddr(Dfn(frame))) == Dfn(frame)
    assert maddr_to_mfn(mfn_to_maddr(Mfn(frame))) == Mfn(frame)
    assert gaddr_to_gfn(gfn_to_gaddr(Gfn(frame))) == Gfn(frame)
    assert daddr_to_dfn(Daddr(v)) == Dfn(v >> 12)


def test_conversion_golden_values() -> None:
    # 0x1f000 frames << 12 = 0x1f000000 bytes; 0x1f000fff >> 12 = 0x1f000
    assert dfn_to_daddr(Dfn(0x1F000)) == Daddr(0x1F00_0000)
    assert daddr_to_dfn(Daddr(0x1F00_0FFF)) == Dfn(0x1F000)
    assert mfn_to_maddr(Mfn(1)) == Maddr(PAGE_SIZE)


@pytest.mark.parametrize(
    ("fn", "arg", "want"),
    [
        (dfn_to_daddr, Mfn(1), "Dfn"),
        (daddr_to_dfn, Maddr(1), "Daddr"),
        (mfn_to_maddr, Dfn(1), "Mfn"),
        (maddr_to_mfn, Daddr(1), "Maddr"),
        (gfn_to_gaddr, 1, "Gfn"),
        (gaddr_to_gfn, Gfn(1), "Gaddr"),
    ],
)
def test_conversions_reject_wrong_kind(fn, arg, want) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match=f"must be a {want}, got {type(arg).__name__}"):
        fn(arg)


def test_expect_kind_and_alignment() -> None:
    assert expect_kind(Dfn, Dfn(1), "x") == Dfn(1)
    with pytest.raises(TypeError, match="x must be a Dfn, got int"):
        expect_kind(Dfn, 1, "x")
    assert Dfn(0x200).is_aligned(9) and not Dfn(0x201).is_aligned(9)
    assert Dfn(0x3FF).align_down(9) == Dfn(0x200)
