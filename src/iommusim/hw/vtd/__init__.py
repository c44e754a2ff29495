"""The Intel VT-d remapping hardware model: register and structure definitions, caches and the unit."""

from iommusim.hw.vtd.regs import Cap, Ecap, Reg
from iommusim.hw.vtd.structs import FaultReason, FaultRecord, TranslationType
from iommusim.hw.vtd.unit import InterruptLine, VtdUnit

__all__ = ["Cap", "Ecap", "FaultReason", "FaultRecord", "InterruptLine", "Reg", "TranslationType", "VtdUnit"]
