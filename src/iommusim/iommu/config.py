"""The IOMMU's global knobs (Xen's iommu= and dom0-iommu= options) with their seed-era defaults."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from iommusim.errors import InvalidArgument
from iommusim.quirks import check_quirks

__all__ = ["IommuConfig"]

# iommu= sub-option -> config field (booleans; "no-" inverts)
_IOMMU_OPTS = {
    "force": "force",
    "required": "force",
    "snoop": "snoop",
    "qinval": "qinval",
    "queued-invalidation": "qinval",
    "intremap": "intremap",
    "sharept": "hap_pt_share",
    "verbose": "verbose",
    "debug": "debug",
    "dom0-passthrough": "hwdom_passthrough",
    "dom0-strict": "hwdom_strict",
    "superpages": "superpages",
}
_DOM0_OPTS = {
    "passthrough": "hwdom_passthrough",
    "strict": "hwdom_strict",
    "map-inclusive": "hwdom_inclusive",
    "map-reserved": "hwdom_reserved",
}


@dataclass(frozen=True)
class IommuConfig:
    enable: bool = True
    force: bool = False
    verbose: bool = False
    debug: bool = False
    snoop: bool = True
    qinval: bool = True
    intremap: bool = True
    #: Share the CPU's EPT/NPT tables with the IOMMU.  Xen defaults to sharing; the model has no x86 EPT in
    #: memory, so x86 domains keep separate IOMMU tables (ARM always shares: its p2m *is* the SMMU's table).
    hap_pt_share: bool = False
    hwdom_strict: bool = False
    hwdom_passthrough: bool = False
    hwdom_inclusive: bool | None = None  # None: automatic (PV hardware domains only)
    hwdom_reserved: bool | None = None  # None: automatic (on)
    superpages: bool = True  # let drivers use superpages where hardware and alignment allow
    dev_iotlb_timeout_ms: int = 1000
    #: Take the per-domain mapping lock (a switch only so a test can show the lock is needed).
    mapping_lock: bool = True
    quirks: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        check_quirks(self.quirks)

    def quirk(self, name: str) -> bool:
        return name in self.quirks

    @classmethod
    def from_cmdline(cls, cmdline: str, base: IommuConfig | None = None) -> IommuConfig:
        """Parse Xen-style ``iommu=...`` and ``dom0-iommu=...`` words; unknown sub-options are EINVAL."""
        cfg = base or cls()
        names = {f.name for f in fields(cls)}
        changes: dict[str, object] = {}
        for word in cmdline.split():
            key, _, value = word.partition("=")
            if key not in ("iommu", "dom0-iommu"):
                continue
            table = _IOMMU_OPTS if key == "iommu" else _DOM0_OPTS
            for opt in filter(None, value.split(",")):
                if key == "iommu" and opt in ("0", "no", "off", "false", "1", "yes", "on", "true"):
                    changes["enable"] = opt in ("1", "yes", "on", "true")
                    continue
                positive = not opt.startswith("no-")
                name = opt[3:] if not positive else opt
                if name not in table:
                    raise InvalidArgument(f"unknown {key}= sub-option {opt!r}")
                assert table[name] in names
                changes[table[name]] = positive
        return replace(cfg, **changes)  # type: ignore[arg-type]
