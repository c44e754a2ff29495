"""The ARM SMMU driver behind ``IommuOps`` (Xen's arm_smmu_iommu_ops, drivers/passthrough/arm/smmu.c).

Xen on ARM always shares the CPU's stage-2 p2m with the SMMU: there are no IOMMU page tables of the
driver's own.  ``map_page``/``unmap_page`` exist only for direct-mapped domains (the hardware domain),
where they put a 1:1 entry of type iommu_map_rw/ro into the p2m; the SMMU's TLB is flushed by the p2m's own
hook after each change.  The real work is routing devices' streams to context banks whose TTBR0 is the
domain's p2m root.

Ops provided: init, hwdom_init, assign_device, reassign_device, teardown, map_page, unmap_page,
map_range and unmap_range (the model's bulk forms, which no seed-era driver has), iotlb_flush and
iotlb_flush_all (both flush every context of the domain by VMID: SMMUv1/v2 have no flush by address).
Not provided, as in Xen at the seed: add_device, remove_device, enable_device, lookup_page,
free_page_table, suspend/resume, crash_shutdown, share_p2m, get_reserved_device_memory, dump_p2m_table.

Where the model differs from Xen, on purpose:

* a failed assignment frees what it allocated (a new context, the master's SMR array) and leaves the
  device as it was; Xen keeps the per-device data it hung off the device;
* the per-domain structure is re-created if the generic layer tore it down and the domain later gets a
  device again (Xen frees it in teardown and would use it after free on that path);
* ``map_page``/``unmap_page`` report flush flags (Xen's ARM code sets none) so that a batching caller
  inside ``dont_flush`` knows it must flush.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

from iommusim.console import LogLevel
from iommusim.drivers.smmu.device import ArmSmmu, SmmuFeature
from iommusim.drivers.smmu.faults import context_fault, global_fault
from iommusim.drivers.smmu.firmware import SmmuNode
from iommusim.drivers.smmu.state import MasterCfg, SmmuContext, SmmuXenDevice, SmmuXenDomain
from iommusim.errors import (
    AlreadyExists,
    HypervisorBug,
    InvalidArgument,
    IommuError,
    NoDevice,
    NoSuchDeviceOrAddress,
    NoSuchDomain,
    NotImplementedOp,
    NotPermitted,
)
from iommusim.frames import Dfn, Gfn, Mfn, expect_kind
from iommusim.iommu.devices import move_device
from iommusim.iommu.ops import DomainIommu, ReservedMemoryCallback
from iommusim.machine.p2m import P2mType
from iommusim.perms import FlushFlags, Perm

if TYPE_CHECKING:
    from iommusim.arm.p2m import ArmP2m
    from iommusim.arm.vtcr import P2mLayout
    from iommusim.iommu.layer import Iommu
    from iommusim.machine.domain import Domain
    from iommusim.machine.pci import PciDevice
    from iommusim.pagetable.walk import Mapping

__all__ = ["COHERENT_WALK", "SmmuDriver"]

#: The name of IOMMU_FEAT_COHERENT_WALK in ``DomainIommu.features``.
COHERENT_WALK = "coherent-walk"


class SmmuDriver:
    """Xen's ARM SMMU (v1/v2) driver, stage 2 only, over one or more SMMUs found in the device tree."""

    name = "smmu"
    provided = frozenset({"iotlb_flush", "iotlb_flush_all", "map_range", "unmap_range"})
    page_sizes = 1 << 12

    def __init__(self, nodes: list[SmmuNode], layout: P2mLayout, *, usfcfg_bypass: bool = False) -> None:
        self.nodes = nodes
        self.layout = layout
        self.usfcfg_bypass = usfcfg_bypass
        self.smmus: list[ArmSmmu] = []
        self.platform_features = SmmuFeature.COHERENT_WALK
        self._iommu: Iommu | None = None
        self._devdata: dict[PciDevice, SmmuXenDevice] = {}

    @property
    def iommu(self) -> Iommu:
        if self._iommu is None:
            raise NoDevice("the SMMU driver has not been set up")
        return self._iommu

    # -- set-up --------------------------------------------------------------------------------------------

    def hardware_setup(self, iommu: Iommu) -> None:
        """Probe every SMMU node (arm_smmu_dt_init); at least one must come up."""
        self._iommu = iommu
        for node in self.nodes:
            smmu = ArmSmmu(node, iommu, self.layout)
            try:
                smmu.probe()
            except IommuError as exc:
                iommu.console.printk(LogLevel.ERR, f"smmu: {node.path}: not usable: {exc.message}")
                continue
            node.irqs.connect_irq(node.global_irq, partial(self._on_global_fault, smmu))
            smmu.reset(usfcfg_bypass=self.usfcfg_bypass)
            self.smmus.append(smmu)
            self.platform_features &= smmu.features
        if not self.smmus:
            raise NoDevice("no SMMU could be initialised")
        for smmu in self.smmus:
            for sbdf, sids in smmu.node.masters.items():
                dev = iommu.machine.pci.find(sbdf)
                if dev is not None:
                    for sid in sids:
                        smmu.device_of_sid[sid] = dev

    def uses_shared_tables(self, d: Domain) -> bool:
        return True

    def find_smmu_for_device(self, dev: PciDevice) -> ArmSmmu | None:
        return next((s for s in self.smmus if dev.sbdf in s.node.masters), None)

    # -- interrupts -----------------------------------------------------------------------------------------

    def _on_global_fault(self, smmu: ArmSmmu) -> None:
        global_fault(smmu)

    def _on_context_fault(self, ctx: SmmuContext) -> None:
        if ctx.smmu is not None:
            context_fault(ctx.smmu, ctx)

    # -- per-domain state ------------------------------------------------------------------------------------

    def init(self, d: Domain) -> None:
        """arm_smmu_iommu_domain_init: the per-domain structure; coherent walk if every SMMU has it."""
        st = self._st(d)
        st.arch = self._new_xen_domain(d)
        if self.platform_features & SmmuFeature.COHERENT_WALK:
            st.features.add(COHERENT_WALK)

    def _st(self, d: Domain) -> DomainIommu:
        st = d.iommu
        if not isinstance(st, DomainIommu):
            raise InvalidArgument(f"{d} has no IOMMU state", domain=d)
        return st

    def _new_xen_domain(self, d: Domain) -> SmmuXenDomain:
        frame = self.iommu.machine.allocator.alloc(f"d{d.domid}:smmu-domain")
        return SmmuXenDomain(frame)

    def _xen_domain(self, d: Domain) -> SmmuXenDomain:
        st = self._st(d)
        if st.arch is None:
            st.arch = self._new_xen_domain(d)
        xd: SmmuXenDomain = st.arch
        return xd

    def hwdom_init(self, d: Domain) -> None:
        """Warn about the dom0-iommu options ARM does not support and switch them off; nothing is mapped."""
        iommu = self.iommu
        if iommu.config.hwdom_inclusive:
            iommu.console.printk(LogLevel.WARNING, "dom0-iommu=map-inclusive is not supported on ARM")
        if iommu.config.hwdom_reserved:
            iommu.console.printk(LogLevel.WARNING, "dom0-iommu=map-reserved is not supported on ARM")
        iommu.config = replace(iommu.config, hwdom_inclusive=False, hwdom_reserved=False)
        # arch_iommu_hwdom_init is empty on ARM: the p2m already is the hardware domain's DMA view

    def teardown(self, d: Domain) -> None:
        """arm_smmu_iommu_domain_teardown: every context must be gone; free the per-domain structure."""
        st = d.iommu
        if not isinstance(st, DomainIommu) or st.arch is None:
            return
        xd: SmmuXenDomain = st.arch
        if xd.contexts:
            raise HypervisorBug(f"{d}: IOMMU teardown with {len(xd.contexts)} context(s) still in use")
        self.iommu.machine.allocator.free(xd.frame)
        st.arch = None

    # -- devices -------------------------------------------------------------------------------------------------

    def _add_device(self, dev: PciDevice, data: SmmuXenDevice) -> None:
        """arm_smmu_add_device: put the device in a group with its master configuration."""
        smmu = self.find_smmu_for_device(dev)
        if smmu is None:
            raise NoDevice(f"{dev.sbdf} is not a master of any SMMU")
        data.cfg = MasterCfg(smmu.node.masters[dev.sbdf])
        data.smmu = smmu

    def _get_context(self, xd: SmmuXenDomain, dev: PciDevice) -> SmmuContext | None:
        """The domain's context on the device's SMMU, if it has one."""
        smmu = self.find_smmu_for_device(dev)
        if smmu is None:
            return None
        return next((c for c in xd.contexts if c.smmu is smmu), None)

    def attach_dev(self, ctx: SmmuContext, dev: PciDevice) -> None:
        """arm_smmu_attach_dev: finalise the context on first use and route the device's streams to it."""
        smmu = self.find_smmu_for_device(dev)
        if smmu is None:
            raise NoSuchDeviceOrAddress(f"{dev.sbdf}: cannot attach to an SMMU, none serves it")
        data = self._devdata.get(dev)
        if data is not None and data.context is not None:
            raise AlreadyExists(f"{dev.sbdf} is already attached to an IOMMU domain")
        if ctx.smmu is None:
            smmu.init_domain_context(ctx, partial(self._on_context_fault, ctx))
        if ctx.smmu is not smmu:
            raise InvalidArgument(f"{dev.sbdf}: the domain's context is on another SMMU")
        if data is None or data.cfg is None:
            raise NoDevice(f"{dev.sbdf} has no master configuration")
        smmu.domain_add_master(ctx, data.cfg)
        data.context = ctx

    def detach_dev(self, ctx: SmmuContext, dev: PciDevice) -> None:
        data = self._devdata.get(dev)
        if data is None or data.cfg is None or ctx.smmu is None:
            return
        data.context = None
        ctx.smmu.domain_remove_master(ctx, data.cfg)

    def _destroy_context(self, xd: SmmuXenDomain, ctx: SmmuContext) -> None:
        """arm_smmu_destroy_iommu_domain: unlink, release the bank (if it was finalised), free."""
        xd.contexts.remove(ctx)
        if ctx.smmu is not None:
            ctx.smmu.destroy_domain_context(ctx)
        self.iommu.machine.allocator.free(ctx.frame)

    def assign_device(self, d: Domain, devfn: int, dev: PciDevice, flag: int) -> None:
        """arm_smmu_assign_dev: route the device's streams to d's context bank on its SMMU."""
        if devfn != dev.sbdf.devfn:
            return  # phantom functions: the stream ids firmware gave the device already cover them
        xd = self._xen_domain(d)
        data = self._devdata.get(dev)
        new_data = data is None
        if data is None:
            data = self._devdata[dev] = SmmuXenDevice()
        try:
            if data.cfg is None:
                self._add_device(dev, data)
            with xd.lock:
                ctx = self._get_context(xd, dev)
                if ctx is None:
                    frame = self.iommu.machine.allocator.alloc(f"d{d.domid}:smmu-ctx")
                    ctx = SmmuContext(d, frame)
                    xd.contexts.append(ctx)
                try:
                    self.attach_dev(ctx, dev)
                except IommuError:
                    if ctx.ref == 0:
                        self._destroy_context(xd, ctx)
                    raise
                ctx.ref += 1
        except IommuError:
            if new_data and data.context is None:
                del self._devdata[dev]
            raise
        move_device(dev, d)

    def deassign(self, d: Domain, dev: PciDevice) -> None:
        """arm_smmu_deassign_dev: ESRCH unless the device is attached to d; the last device frees the bank."""
        data = self._devdata.get(dev)
        ctx = data.context if data is not None else None
        if ctx is None or ctx.domain is not d:
            raise NoSuchDomain(f"{dev.sbdf} is not attached to {d}", domain=d)
        xd = self._xen_domain(d)
        with xd.lock:
            self.detach_dev(ctx, dev)
            ctx.ref -= 1
            if ctx.ref == 0:
                self._destroy_context(xd, ctx)

    def reassign_device(self, source: Domain, target: Domain | None, devfn: int, dev: PciDevice) -> None:
        """arm_smmu_reassign_dev: only back to the hardware domain (EPERM otherwise), or detach only."""
        if target is not None and not target.is_hardware:
            raise NotPermitted(f"{dev.sbdf} may only be given back to the hardware domain")
        if target is source:
            return
        if devfn != dev.sbdf.devfn:
            return
        self.deassign(source, dev)
        move_device(dev, target)
        if target is not None:
            self.assign_device(target, devfn, dev, 0)

    # -- map / unmap (direct-mapped domains only) ---------------------------------------------------------------

    def _p2m(self, d: Domain) -> ArmP2m:
        from iommusim.arm.p2m import ArmP2m

        p2m = d.p2m
        if not isinstance(p2m, ArmP2m):
            raise InvalidArgument(f"{d} has no ARM stage-2 p2m", domain=d)
        return p2m

    def map_page(self, d: Domain, dfn: Dfn, mfn: Mfn, perms: Perm) -> FlushFlags:
        """A 1:1 p2m entry for a grant mapping of the direct-mapped hardware domain."""
        expect_kind(Dfn, dfn, "dfn")
        expect_kind(Mfn, mfn, "mfn")
        if not d.direct_mapped:
            raise HypervisorBug(f"SMMU map_page on {d}, which is not direct-mapped")
        if mfn.value != dfn.value:
            raise HypervisorBug(f"SMMU map_page of {dfn!r} to {mfn!r}: a direct map needs mfn == dfn")
        p = int(perms)  # int tests: IntFlag operators are slow on the per-page path
        if not p & 3:
            raise InvalidArgument(f"map of {dfn!r} with neither read nor write", domain=d, frame=dfn)
        t = P2mType.IOMMU_MAP_RW if p & 2 else P2mType.IOMMU_MAP_RO
        return self._p2m(d).guest_physmap_add_entry(Gfn(dfn.value), mfn, 0, t)

    def unmap_page(self, d: Domain, dfn: Dfn) -> FlushFlags:
        expect_kind(Dfn, dfn, "dfn")
        if not d.direct_mapped:
            raise InvalidArgument(f"SMMU unmap_page on {d}, which is not direct-mapped", domain=d, frame=dfn)
        return self._p2m(d).guest_physmap_remove_page(Gfn(dfn.value), 0, Mfn(dfn.value))

    def map_range(self, d: Domain, dfn: Dfn, mfn: Mfn, count: int, perms: Perm) -> FlushFlags:
        """The model's bulk form of ``map_page`` (no Xen counterpart): one p2m insert of the whole 1:1 run.

        Same checks and p2m type as ``map_page``; the p2m writes blocks where the hardware and the alignment
        allow them, as its own range inserts do.  The caller (the generic range map) flushes once.
        """
        expect_kind(Dfn, dfn, "dfn")
        expect_kind(Mfn, mfn, "mfn")
        if count <= 0:
            return FlushFlags.NONE
        if not d.direct_mapped:
            raise HypervisorBug(f"SMMU map_range on {d}, which is not direct-mapped")
        if mfn.value != dfn.value:
            raise HypervisorBug(f"SMMU map_range of {dfn!r} to {mfn!r}: a direct map needs mfn == dfn")
        if not perms & Perm.RW:
            raise InvalidArgument(f"map of {dfn!r} with neither read nor write", domain=d, frame=dfn)
        t = P2mType.IOMMU_MAP_RW if perms & Perm.W else P2mType.IOMMU_MAP_RO
        return self._p2m(d).insert_mapping(Gfn(dfn.value), count, Mfn(dfn.value), t)

    def unmap_range(self, d: Domain, dfn: Dfn, count: int) -> FlushFlags:
        """The bulk form of ``unmap_page``: one p2m removal (which reclaims tables it empties whole)."""
        expect_kind(Dfn, dfn, "dfn")
        if count <= 0:
            return FlushFlags.NONE
        if not d.direct_mapped:
            raise InvalidArgument(f"SMMU unmap_range on {d}, which is not direct-mapped", domain=d, frame=dfn)
        return self._p2m(d).remove_mapping(Gfn(dfn.value), count)

    # -- flushes -----------------------------------------------------------------------------------------------------

    def iotlb_flush(self, d: Domain, dfn: Dfn, count: int, flags: FlushFlags) -> None:
        """SMMUv1/v2 have no invalidation by address and VMID: flush everything of the domain."""
        self.iotlb_flush_all(d)

    def iotlb_flush_all(self, d: Domain) -> None:
        """TLBIVMID + sync for every context of the domain that has been finalised on an SMMU."""
        st = d.iommu
        if not isinstance(st, DomainIommu) or st.arch is None:
            return
        xd: SmmuXenDomain = st.arch
        with xd.lock:
            for ctx in xd.contexts:
                if ctx.smmu is None:
                    continue  # still waiting for its first master
                ctx.smmu.tlb_inv_context(ctx)

    # -- inspection ----------------------------------------------------------------------------------------------------

    def contexts(self, d: Domain) -> list[SmmuContext]:
        st = d.iommu
        if not isinstance(st, DomainIommu) or st.arch is None:
            return []
        xd: SmmuXenDomain = st.arch
        return list(xd.contexts)

    def attached_context(self, dev: PciDevice) -> SmmuContext | None:
        data = self._devdata.get(dev)
        return None if data is None else data.context

    # -- ops Xen leaves NULL for the SMMU (not in ``provided``; the generic layer never calls them) -----------------

    def _absent(self, op: str) -> NotImplementedOp:
        return NotImplementedOp(f"the SMMU driver has no {op}", op=op)

    def add_device(self, devfn: int, dev: PciDevice) -> None:
        raise self._absent("add_device")

    def enable_device(self, dev: PciDevice) -> None:
        raise self._absent("enable_device")

    def remove_device(self, devfn: int, dev: PciDevice) -> None:
        raise self._absent("remove_device")

    def get_device_group_id(self, seg: int, bus: int, devfn: int) -> int:
        raise self._absent("get_device_group_id")

    def lookup_page(self, d: Domain, dfn: Dfn) -> tuple[Mfn, Perm]:
        raise self._absent("lookup_page")

    def free_page_table(self, mfn: Mfn, level: int) -> None:
        raise self._absent("free_page_table")

    def suspend(self) -> None:
        raise self._absent("suspend")

    def resume(self) -> None:
        raise self._absent("resume")

    def crash_shutdown(self) -> None:
        raise self._absent("crash_shutdown")

    def share_p2m(self, d: Domain) -> None:
        raise self._absent("share_p2m")

    def get_reserved_device_memory(self, fn: ReservedMemoryCallback, ctxt: object) -> int:
        raise self._absent("get_reserved_device_memory")

    def dump_page_tables(self, d: Domain) -> list[Mapping]:
        raise self._absent("dump_page_tables")
