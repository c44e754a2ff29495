"""The ARM SMMUv2 hardware model (silicon half): registers, stream matching, stage-2 walks, TLB, faults."""

from iommusim.hw.smmu.unit import GLOBAL_IRQ, SmmuConfig, SmmuFaultRecord, SmmuMmio, SmmuV2, context_irq
from iommusim.hw.smmu.walk import S2FaultKind, S2Walk, walk_stage2

__all__ = [
    "GLOBAL_IRQ",
    "S2FaultKind",
    "S2Walk",
    "SmmuConfig",
    "SmmuFaultRecord",
    "SmmuMmio",
    "SmmuV2",
    "context_irq",
    "walk_stage2",
]
