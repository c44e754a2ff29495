"""Type-safe frame numbers and addresses.

Xen boxes machine, guest and device frame numbers in distinct one-member structs (``mfn_t``, ``gfn_t``,
``dfn_t``) so that the compiler refuses to mix them.  Here each kind is its own final class: mypy --strict
rejects passing one kind where another is expected, arithmetic between kinds, and (with strict equality)
comparisons across kinds; at run time the same mistakes raise ``TypeError`` naming both kinds.

Raw integers belong inside format codecs and machine memory only; the conversions between kinds are the
named functions at the bottom of this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Final, NoReturn, Self, TypeVar, final, overload

__all__ = [
    "INVALID_DFN",
    "INVALID_GFN",
    "INVALID_MFN",
    "IOMMU_PAGE_MASK",
    "IOMMU_PAGE_SHIFT",
    "IOMMU_PAGE_SIZE",
    "PAGE_MASK",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "Daddr",
    "Dfn",
    "Gaddr",
    "Gfn",
    "Maddr",
    "Mfn",
    "daddr_to_dfn",
    "dfn_to_daddr",
    "expect_kind",
    "gaddr_to_gfn",
    "gfn_to_gaddr",
    "maddr_to_mfn",
    "mfn_to_maddr",
]

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
PAGE_MASK: Final = ~(PAGE_SIZE - 1)
IOMMU_PAGE_SHIFT: Final = 12
IOMMU_PAGE_SIZE: Final = 1 << IOMMU_PAGE_SHIFT
IOMMU_PAGE_MASK: Final = ~(IOMMU_PAGE_SIZE - 1)

_U64_LIMIT: Final = 1 << 64


def _kind_name(obj: object) -> str:
    return type(obj).__name__


def _mixed(op: str, left: object, right: object) -> NoReturn:
    raise TypeError(
        f"cannot apply {op!r} to {_kind_name(left)} and {_kind_name(right)}: frame kinds do not mix; convert explicitly"
    )


class _Number:
    """Shared behaviour of every boxed kind: immutable, hashable, ordered only within its own kind."""

    __slots__ = ("value",)
    value: int
    _hex_width: ClassVar[int] = 0  # zero-padding of Xen's PRI_* format for log lines

    def __init__(self, value: int) -> None:
        if type(value) is not int:
            value = _coerce(type(self), value)
        if not 0 <= value < _U64_LIMIT:
            from iommusim.errors import FrameRangeError

            raise FrameRangeError(f"{type(self).__name__} value {value:#x} does not fit in 64 bits")
        _set_value(self, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value:#x})"

    __str__ = __repr__

    def __int__(self) -> int:
        return self.value

    def __reduce__(self) -> tuple[type[Self], tuple[int]]:
        return (type(self), (self.value,))

    def xen(self) -> str:
        """The value as Xen's log lines print it (PRI_mfn is %05lx, PRI_dfn is plain %lx)."""
        return f"{self.value:0{self._hex_width}x}"

    def __add__(self, n: int) -> Self:
        if not isinstance(n, int):
            _mixed("+", self, n)
        return type(self)(self.value + n)

    def __radd__(self, n: int) -> Self:
        if not isinstance(n, int):
            _mixed("+", n, self)
        return type(self)(self.value + n)

    @overload
    def __sub__(self, other: Self) -> int: ...
    @overload
    def __sub__(self, other: int) -> Self: ...
    def __sub__(self, other: Self | int) -> Self | int:
        if isinstance(other, int):
            return type(self)(self.value - other)
        if type(other) is type(self):
            return self.value - other.value
        _mixed("-", self, other)

    def _same_kind(self, other: object, op: str) -> int:
        if type(other) is not type(self):
            _mixed(op, self, other)
        return other.value  # type: ignore[attr-defined, unused-ignore]

    def __lt__(self, other: Self) -> bool:
        return self.value < self._same_kind(other, "<")

    def __le__(self, other: Self) -> bool:
        return self.value <= self._same_kind(other, "<=")

    def __gt__(self, other: Self) -> bool:
        return self.value > self._same_kind(other, ">")

    def __ge__(self, other: Self) -> bool:
        return self.value >= self._same_kind(other, ">=")

    # Equality and hashing are hidden from the type checker on purpose: with only object.__eq__ in view,
    # mypy's strict-equality check flags ``Dfn(1) == Mfn(1)`` as a non-overlapping comparison.
    if not TYPE_CHECKING:

        def __eq__(self, other):
            if type(other) is type(self):
                return self.value == other.value
            return NotImplemented

        def __ne__(self, other):
            if type(other) is type(self):
                return self.value != other.value
            return NotImplemented

        def __hash__(self):
            return hash(self.value)

    def is_aligned(self, order: int) -> bool:
        """True when the value is a multiple of 2**order."""
        return self.value & ((1 << order) - 1) == 0

    def align_down(self, order: int) -> Self:
        return type(self)(self.value & ~((1 << order) - 1))


_set_value = _Number.__dict__["value"].__set__


def _coerce(cls: type[_Number], value: object) -> int:
    """Accept numpy integers (bulk paths produce them); refuse frames of any kind and anything else."""
    if isinstance(value, _Number):
        raise TypeError(
            f"{cls.__name__}() takes an int, got {_kind_name(value)}: "
            f"convert frame kinds explicitly (e.g. {cls.__name__}(int(x)))"
        )
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{cls.__name__}() takes an int, got {_kind_name(value)}")
    return int(value.__index__())  # type: ignore[attr-defined, unused-ignore]


@final
class Mfn(_Number):
    """Machine frame number: a host-physical 4 KiB frame (Xen's mfn_t)."""

    __slots__ = ()
    _hex_width = 5


@final
class Gfn(_Number):
    """Guest frame number: a frame as the guest names it in its own tables (Xen's gfn_t)."""

    __slots__ = ()
    _hex_width = 5


@final
class Dfn(_Number):
    """Device frame number: a frame in a device's DMA address space (Xen's dfn_t)."""

    __slots__ = ()


@final
class Maddr(_Number):
    """Machine (host-physical) byte address."""

    __slots__ = ()


@final
class Daddr(_Number):
    """Device (DMA) byte address (Xen's daddr_t)."""

    __slots__ = ()


@final
class Gaddr(_Number):
    """Guest-physical byte address."""

    __slots__ = ()


INVALID_MFN: Final = Mfn(_U64_LIMIT - 1)
INVALID_GFN: Final = Gfn(_U64_LIMIT - 1)
INVALID_DFN: Final = Dfn(_U64_LIMIT - 1)

K = TypeVar("K", bound=_Number)


def expect_kind(kind: type[K], obj: Any, what: str) -> K:
    """Run-time guard for public entry points: ``obj`` must be exactly ``kind``."""
    if type(obj) is not kind:
        raise TypeError(f"{what} must be a {kind.__name__}, got {_kind_name(obj)} ({obj!r})")
    return obj  # type: ignore[no-any-return, unused-ignore]


def dfn_to_daddr(dfn: Dfn) -> Daddr:
    return Daddr(expect_kind(Dfn, dfn, "dfn").value << IOMMU_PAGE_SHIFT)


def daddr_to_dfn(daddr: Daddr) -> Dfn:
    return Dfn(expect_kind(Daddr, daddr, "daddr").value >> IOMMU_PAGE_SHIFT)


def mfn_to_maddr(mfn: Mfn) -> Maddr:
    return Maddr(expect_kind(Mfn, mfn, "mfn").value << PAGE_SHIFT)


def maddr_to_mfn(maddr: Maddr) -> Mfn:
    return Mfn(expect_kind(Maddr, maddr, "maddr").value >> PAGE_SHIFT)


def gfn_to_gaddr(gfn: Gfn) -> Gaddr:
    return Gaddr(expect_kind(Gfn, gfn, "gfn").value << PAGE_SHIFT)


def gaddr_to_gfn(gaddr: Gaddr) -> Gfn:
    return Gfn(expect_kind(Gaddr, gaddr, "gaddr").value >> PAGE_SHIFT)
