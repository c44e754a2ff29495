"""A memory-mapped register file: little-endian storage plus per-register read and write behaviour.

Hardware models declare their registers as offsets with a width, a reset value, the bits software may
write, and optional hooks; drivers access them only through ``read``/``write`` with an offset and size,
as a CPU would through MMIO.  Accesses must be naturally aligned and hit a declared register (or a 32-bit
half of a 64-bit one); anything else raises, because a driver doing that is broken.

A unit may hand its block a lock: a write and the work its hook starts (an invalidation, a queue run)
then happen as one step with respect to the unit's translations, which take the same lock.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from iommusim.errors import BadAddress

__all__ = ["Register", "RegisterBlock"]

WriteHook = Callable[[int, int], int]  # (old value, value written after masking) -> value to store
ReadHook = Callable[[int], int]  # (stored value) -> value returned


@dataclass
class Register:
    name: str
    offset: int
    size: int = 8  # bytes: 4 or 8
    reset: int = 0
    writable: int = 0  # bits software may change; the rest keep their stored value
    w1c: int = 0  # write-one-to-clear bits
    on_write: WriteHook | None = None
    on_read: ReadHook | None = None
    value: int = field(init=False)

    def __post_init__(self) -> None:
        self.value = self.reset


class RegisterBlock:
    def __init__(self, name: str, size: int, *, lock: AbstractContextManager[Any] | None = None) -> None:
        self.name = name
        self.size = size
        self._lock: AbstractContextManager[Any] = lock if lock is not None else nullcontext()
        self._regs: dict[int, Register] = {}
        self._by_name: dict[str, Register] = {}  # hardware-side lookups happen on every queue kick
        self.accesses = 0

    def add(self, reg: Register) -> Register:
        if reg.offset % reg.size or reg.offset + reg.size > self.size:
            raise ValueError(f"{self.name}: register {reg.name} at {reg.offset:#x} is misplaced")
        replaced = reg.offset in self._regs
        self._regs[reg.offset] = reg
        if replaced:  # the first register of each name, in offset insertion order, as a search would find
            self._by_name = {}
            for r in self._regs.values():
                self._by_name.setdefault(r.name, r)
        else:
            self._by_name.setdefault(reg.name, reg)
        return reg

    def reg(self, offset: int) -> Register:
        return self._regs[offset]

    def __getitem__(self, name: str) -> Register:
        reg = self._by_name.get(name)
        if reg is None:
            raise KeyError(name)
        return reg

    def _locate(self, offset: int, size: int) -> tuple[Register, int]:
        if size not in (4, 8) or offset % size:
            raise BadAddress(f"{self.name}: unaligned or odd-sized MMIO access at {offset:#x} (size {size})")
        reg = self._regs.get(offset)
        if reg is not None and reg.size >= size:
            return reg, 0
        reg = self._regs.get(offset - 4)
        if size == 4 and reg is not None and reg.size == 8:
            return reg, 32
        raise BadAddress(f"{self.name}: no register at offset {offset:#x}")

    def read(self, offset: int, size: int = 4) -> int:
        self.accesses += 1
        reg, shift = self._locate(offset, size)
        value = reg.on_read(reg.value) if reg.on_read else reg.value
        return (value >> shift) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, value: int, size: int = 4) -> None:
        with self._lock:
            self.accesses += 1
            reg, shift = self._locate(offset, size)
            mask = ((1 << (8 * size)) - 1) << shift
            incoming = (value << shift) & mask
            old = reg.value
            cleared = old & ~(incoming & reg.w1c & mask)
            new = (cleared & ~(reg.writable & mask)) | (incoming & reg.writable)
            reg.value = reg.on_write(old, new) if reg.on_write else new

    def set(self, name: str, value: int) -> None:
        """Hardware-side update of a register (status bits, head pointers), bypassing write masks."""
        self[name].value = value

    def get(self, name: str) -> int:
        return self[name].value
