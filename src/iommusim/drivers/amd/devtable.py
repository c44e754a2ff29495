"""The device table in machine memory, written the way Xen writes it: 32-bit words of 256-bit entries.

One table, indexed by requestor id, is shared by every IOMMU of the segment (as in Xen).  Binding a device
to a domain replaces words 0 to 2 of its entry (root, paging mode, TV and V; root high bits with IR and IW;
the domain id), which also clears the guest-translation fields; word 3 keeps what firmware put there and
carries the IOTLB-enable bit.  Disabling translation clears V and TV.
"""

from __future__ import annotations

from iommusim.errors import OutOfMemory
from iommusim.frames import PAGE_SHIFT, Mfn
from iommusim.hw.amd.structs import DTE_SIZE, Dte
from iommusim.machine.allocator import PageAllocator
from iommusim.machine.memory import MachineMemory

__all__ = ["DeviceTable"]

_V = 1 << 0
_TV = 1 << 1
_IR = 1 << 29  # in word 1
_IW = 1 << 30  # in word 1
_IOTLB = 1 << 0  # in word 3


class DeviceTable:
    def __init__(self, memory: MachineMemory, allocator: PageAllocator, bdf_entries: int) -> None:
        self.memory = memory
        self.allocator = allocator
        need = max(1, -(-(bdf_entries * DTE_SIZE) // 4096))
        self.pages = 1 << (need - 1).bit_length()  # Xen allocates a power-of-two number of pages
        self.entries = self.pages * (4096 // DTE_SIZE)
        self.base: Mfn | None = None

    def allocate(self) -> None:
        if self.base is None:
            self.base = self.allocator.alloc("amd:device-table", self.pages)

    def release(self) -> None:
        if self.base is not None:
            self.allocator.free(self.base, self.pages)
            self.base = None

    @property
    def maddr(self) -> int:
        if self.base is None:
            raise OutOfMemory("the device table was never allocated")
        return self.base.value << PAGE_SHIFT

    def _addr(self, req_id: int, word: int) -> int:
        if not 0 <= req_id < self.entries:
            raise IndexError(f"requestor id {req_id:#x} beyond the {self.entries}-entry device table")
        return self.maddr + req_id * DTE_SIZE + 4 * word

    def read_word(self, req_id: int, word: int) -> int:
        return self.memory.read_u32(self._addr(req_id, word))

    def write_word(self, req_id: int, word: int, value: int) -> None:
        self.memory.write_u32(self._addr(req_id, word), value)

    def read(self, req_id: int) -> Dte:
        return Dte.from_words([self.read_word(req_id, w) for w in range(8)])

    def translation_valid(self, req_id: int) -> bool:
        w0 = self.read_word(req_id, 0)
        return bool(w0 & _V) and bool(w0 & _TV)

    def set_root_page_table(self, req_id: int, root: int, domain_id: int, paging_mode: int, valid: bool) -> None:
        """Xen's amd_iommu_set_root_page_table: words 2, 1 and 0 rewritten from scratch, in that order."""
        self.write_word(req_id, 2, domain_id & 0xFFFF)
        self.write_word(req_id, 1, ((root >> 32) & 0xFFFFF) | _IR | _IW)
        self.write_word(req_id, 0, (root & 0xFFFF_F000) | ((paging_mode & 7) << 9) | _TV | (_V if valid else 0))

    def set_iotlb(self, req_id: int, on: bool) -> None:
        w3 = self.read_word(req_id, 3)
        self.write_word(req_id, 3, (w3 | _IOTLB) if on else (w3 & ~_IOTLB))

    def disable_translation(self, req_id: int) -> None:
        self.write_word(req_id, 0, self.read_word(req_id, 0) & ~(_V | _TV))
