"""Decode IOMMU structures from a memory image someone else made: the registry of image formats.

Each format is an ``ImageDecoder`` registered by module path in ``DECODERS`` (as vendors register their
platforms): ``vtd-sl`` (one VT-d second-level tree), ``vtd-root`` (a VT-d root table, every device's
context and tables) and ``arm-s2`` (an ARM stage-2 tree, with its starting level and concatenated root
tables) come with iommusim; AMD adds ``amd-v1`` (a v1 tree with its paging mode) and ``amd-dt`` (a device
table).  A decoder takes the image (anything that yields frames), the root address and the integer options
it declares, and returns one ``DecodedSpace`` per address space it found.

Problems the decoder can live with (a malformed entry, a device whose tables lead outside the image) are
listed in the result; a tree that cannot be walked at all raises ``TableWalkError`` or ``ImageError``
naming the address.  Every walk is bounded by the number of frames the image holds, so a looping or
self-sharing tree ends in an error, never a hang.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from typing import Any, Protocol

from iommusim.errors import InvalidArgument
from iommusim.images import ElfImage, MemoryImage, RawImage
from iommusim.machine.memory import U64Array
from iommusim.pagetable.walk import FrameReader, Mapping
from iommusim.tools.tables import TableRoot, mapping_json
from iommusim.tools.vendors import ContextMode

__all__ = [
    "DECODERS",
    "CachingReader",
    "DecodeResult",
    "DecodedSpace",
    "ImageDecoder",
    "available_decoders",
    "check_options",
    "decoder",
    "image_frames",
]

#: format name -> "module:attribute" of its ``ImageDecoder``.
DECODERS: dict[str, str] = {}
DECODERS["vtd-sl"] = "iommusim.tools.adapters.vtd:SECOND_LEVEL_DECODER"
DECODERS["vtd-root"] = "iommusim.tools.adapters.vtd:ROOT_TABLE_DECODER"
DECODERS["arm-s2"] = "iommusim.tools.adapters.smmu:STAGE2_DECODER"
DECODERS["amd-v1"] = "iommusim.tools.adapters.amd:V1_DECODER"
DECODERS["amd-dt"] = "iommusim.tools.adapters.amd:DEVICE_TABLE_DECODER"


@dataclass
class DecodedSpace:
    """One address space found in the image: who uses it, its tables and what they map."""

    label: str
    mode: ContextMode = ContextMode.TRANSLATED
    tables: TableRoot | None = None
    sources: list[str] = field(default_factory=list)  # devices (requester ids, stream ids) that use it
    attrs: dict[str, Any] = field(default_factory=dict)  # vendor fields: domain id, address width, ...
    mappings: list[Mapping] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def pages(self) -> int:
        return sum(m.pages for m in self.mappings)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "mode": self.mode.value,
            "tables": self.tables.to_json() if self.tables else None,
            "sources": self.sources,
            "attrs": self.attrs,
            "pages": self.pages,
            "mappings": [mapping_json(m) for m in self.mappings],
            "problems": self.problems,
        }


@dataclass
class DecodeResult:
    format: str
    root: int
    options: dict[str, int]
    spaces: list[DecodedSpace] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def all_problems(self) -> list[str]:
        return self.problems + [f"{s.label}: {p}" for s in self.spaces for p in s.problems]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "root": f"{self.root:#x}",
            "options": self.options,
            "spaces": [s.to_json() for s in self.spaces],
            "problems": self.problems,
            "ok": not self.all_problems,
        }


class ImageDecoder(Protocol):
    name: str
    vendor: str  # the vendor whose machines write this format (tests build one to make images)
    summary: str
    #: option name -> help text; every option is an integer given as --name on the command line
    options: MappingABC[str, str]

    def decode(
        self, reader: FrameReader, root: int, options: MappingABC[str, int], *, max_tables: int
    ) -> DecodeResult: ...


def decoder(name: str) -> ImageDecoder:
    """The decoder registered for ``name``; EINVAL naming the known ones otherwise."""
    target = DECODERS.get(name)
    found = _load(target) if target else None
    if found is None:
        known = ", ".join(available_decoders()) or "none"
        raise InvalidArgument(f"unknown image format {name!r}; known: {known}")
    return found


def _load(target: str) -> ImageDecoder | None:
    module, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    found: ImageDecoder | None = getattr(mod, attr, None)
    return found


def available_decoders() -> list[str]:
    return [name for name, target in DECODERS.items() if _load(target) is not None]


def check_options(dec: ImageDecoder, options: MappingABC[str, int]) -> dict[str, int]:
    """Refuse options the decoder does not take (EINVAL naming the ones it does)."""
    unknown = sorted(set(options) - set(dec.options))
    if unknown:
        takes = ", ".join(f"--{o.replace('_', '-')}" for o in dec.options) or "no options"
        raise InvalidArgument(
            f"{dec.name} does not take {', '.join('--' + o.replace('_', '-') for o in unknown)} (it takes {takes})"
        )
    return dict(options)


def image_frames(image: MemoryImage) -> int:
    """How many frames the image holds: no tree in it can have more distinct tables."""
    if isinstance(image, RawImage):
        return max(1, image.size >> 12)
    if isinstance(image, ElfImage):
        return max(1, sum((s.memsz + 0xFFF) >> 12 for s in image.segments))
    return 1 << 18


class CachingReader:
    """Keeps the last frames read from a slow reader (an image copies each frame out of the file)."""

    def __init__(self, reader: FrameReader, capacity: int = 256) -> None:
        self.reader = reader
        self.capacity = capacity
        self._frames: OrderedDict[int, U64Array] = OrderedDict()

    def peek_words(self, mfn: int) -> U64Array:
        words = self._frames.get(mfn)
        if words is not None:
            self._frames.move_to_end(mfn)
            return words
        words = self.reader.peek_words(mfn)
        self._frames[mfn] = words
        if len(self._frames) > self.capacity:
            self._frames.popitem(last=False)
        return words
