"""Parsers for the values a scenario file holds: sizes, frames, permissions, data, per-vendor alternatives.

Each parser takes the raw TOML value and returns the model's value, or raises ``BadValue`` with a sentence
that says what was expected; the loader adds where (file, line, key).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from iommusim.errors import IommuError
from iommusim.machine.p2m import P2mType
from iommusim.machine.pages import PageType
from iommusim.machine.pci import PciDevType, Sbdf
from iommusim.perms import Perm
from iommusim.tools.vendors import KNOWN_VENDORS

__all__ = [
    "BadValue",
    "FrameRef",
    "PerVendor",
    "boolean",
    "choice",
    "data_bytes",
    "frame",
    "integer",
    "page_size",
    "perms",
    "regex",
    "sbdf",
    "size",
    "text",
]

T = TypeVar("T")
Parser = Callable[[Any], Any]


class BadValue(ValueError):
    """A value of the wrong kind or out of range (the message says what was expected)."""


@dataclass(frozen=True)
class FrameRef:
    """A machine frame named by the domain that owns it: guest frame ``gfn`` of domain ``domid``."""

    domid: int
    gfn: int

    def __str__(self) -> str:
        return f"d{self.domid}:{self.gfn:#x}"


@dataclass(frozen=True)
class PerVendor:
    """A value that differs by vendor: ``{ vtd = ..., smmu = ..., default = ... }`` in the file."""

    values: dict[str, Any]

    def pick(self, vendor: str, missing: Any = None) -> Any:
        if vendor in self.values:
            return self.values[vendor]
        return self.values.get("default", missing)


def per_vendor(parser: Parser) -> Parser:
    """Accept either a plain value or a table keyed by vendor names (and ``default``)."""

    def parse(value: Any) -> Any:
        if isinstance(value, dict) and value and set(value) <= {*KNOWN_VENDORS, "default"}:
            return PerVendor({k: parser(v) for k, v in value.items()})
        return parser(value)

    return parse


def integer(lo: int | None = 0, hi: int | None = None) -> Parser:
    def parse(value: Any) -> int:
        n: int
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        elif isinstance(value, str) and re.fullmatch(r"\s*(0x[0-9a-fA-F_]+|\d[\d_]*)\s*", value):
            n = int(value.strip().replace("_", ""), 0)
        else:
            raise BadValue(f"expected an integer, got {value!r}")
        if lo is not None and n < lo:
            raise BadValue(f"expected at least {lo:#x}, got {n:#x}" if lo > 9 else f"expected at least {lo}, got {n}")
        if hi is not None and n > hi:
            raise BadValue(f"expected at most {hi}, got {n}")
        return n

    return parse


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadValue(f"expected true or false, got {value!r}")
    return value


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise BadValue(f"expected a string, got {value!r}")
    return value


def choice(*options: str) -> Parser:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise BadValue(f"expected one of {', '.join(repr(o) for o in options)}, got {value!r}")
        return value

    return parse


def choice_int(*options: int) -> Parser:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or value not in options:
            raise BadValue(f"expected one of {', '.join(map(str, options))}, got {value!r}")
        return int(value)

    return parse


def list_of(parser: Parser) -> Parser:
    def parse(value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise BadValue(f"expected a list, got {value!r}")
        return [parser(v) for v in value]

    return parse


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def size(value: Any) -> int:
    """Bytes: an integer, or a string such as "64M", "1G", "4 KiB"."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise BadValue(f"expected a positive size, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            n = int(m[1]) << _UNITS[m[2].upper()]
            if n > 0:
                return n
    raise BadValue(f"expected a size such as 64M, 1G or a number of bytes, got {value!r}")


def page_size(value: Any) -> int:
    """A page size as a shift: "4K" -> 12, "2M" -> 21, "1G" -> 30 (also the shift itself)."""
    if isinstance(value, int) and not isinstance(value, bool) and value in (12, 21, 30, 39):
        return value
    n = size(value)
    if n & (n - 1) or n < 4096:
        raise BadValue(f"expected a page size such as 4K, 2M or 1G, got {value!r}")
    return n.bit_length() - 1


def perms(value: Any) -> Perm:
    if not isinstance(value, str):
        raise BadValue(f"expected permissions such as 'r', 'w' or 'rw', got {value!r}")
    try:
        return Perm.parse(value)
    except ValueError as exc:
        raise BadValue(str(exc)) from None


_FRAME_RE = re.compile(r"^\s*d(\d+)\s*:\s*(0x[0-9a-fA-F_]+|\d[\d_]*)\s*$")


def frame(value: Any) -> int | FrameRef:
    """A machine frame: a number, or "d1:0x100" (the frame behind guest frame 0x100 of d1)."""
    if isinstance(value, str):
        m = _FRAME_RE.match(value)
        if m:
            return FrameRef(int(m[1]), int(m[2].replace("_", ""), 0))
    try:
        return int(integer(0)(value))
    except BadValue:
        raise BadValue(
            f"expected a machine frame (a number, or 'd1:0x100' for d1's guest frame 0x100), got {value!r}"
        ) from None


def sbdf(value: Any) -> str:
    if not isinstance(value, str):
        raise BadValue(f"expected a PCI address such as '0000:03:00.0', got {value!r}")
    try:
        return str(Sbdf.parse(value))
    except IommuError as exc:
        raise BadValue(exc.message) from None


def data_bytes(value: Any) -> bytes:
    """Text (UTF-8) to write or expect."""
    if not isinstance(value, str) or not value:
        raise BadValue(f"expected a non-empty string, got {value!r}")
    return value.encode()


def hex_bytes(value: Any) -> bytes:
    if not isinstance(value, str):
        raise BadValue(f"expected hexadecimal bytes such as 'de ad be ef', got {value!r}")
    try:
        out = bytes.fromhex(value.replace("_", " "))
    except ValueError:
        raise BadValue(f"expected hexadecimal bytes such as 'de ad be ef', got {value!r}") from None
    if not out:
        raise BadValue("expected at least one byte")
    return out


def regex(value: Any) -> re.Pattern[str]:
    if not isinstance(value, str):
        raise BadValue(f"expected a regular expression, got {value!r}")
    try:
        return re.compile(value)
    except re.error as exc:
        raise BadValue(f"not a valid regular expression ({exc})") from None


def enum_name(kind: type[PageType] | type[P2mType] | type[PciDevType], what: str) -> Parser:
    names = {m.name.lower().replace("_", "-"): m for m in kind}
    names.update({str(m.value).lower().replace("_", "-"): m for m in kind})
    short = {"l1": "l1-page-table", "l2": "l2-page-table", "l3": "l3-page-table", "l4": "l4-page-table"}

    def parse(value: Any) -> Any:
        key = str(value).lower().replace("_", "-")
        key = short.get(key, key) if kind is PageType else key
        if key not in names:
            raise BadValue(f"expected a {what} ({', '.join(sorted({m.name.lower() for m in kind}))}), got {value!r}")
        return names[key]

    return parse


page_type = enum_name(PageType, "page type")
p2m_type = enum_name(P2mType, "p2m type")
device_type = enum_name(PciDevType, "device type")
