"""Xen's ARM architecture code the SMMU depends on: the stage-2 p2m in machine memory (arch/arm/p2m.c)."""

from iommusim.arm.p2m import ArmP2m, p2m_entry_for_type
from iommusim.arm.vtcr import P2mLayout, VmidAllocator, p2m_layout_for_pa_range

__all__ = ["ArmP2m", "P2mLayout", "VmidAllocator", "p2m_entry_for_type", "p2m_layout_for_pa_range"]
