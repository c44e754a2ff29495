"""``iommusim demo``: a short, deterministic, narrated tour of the model."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from iommusim.errors import IommuError
from iommusim.frames import Dfn, Mfn, dfn_to_daddr
from iommusim.iommu import Iommu
from iommusim.machine import DomainKind, Machine, PageType, PciDevice, PciDevType, Sbdf
from iommusim.perms import Perm
from iommusim.platform import available_vendors


def _machine_tour(out: Console) -> None:
    out.rule("[bold]The machine and the type-safe frame numbers")
    m = Machine(ram_bytes=2 << 30, address_width=46)
    out.print(f"Machine: {m.ram_frames * 4 // 1024} MiB of RAM, {m.memory.address_width}-bit physical addresses")
    dfn, mfn = Dfn(0x1F000), Mfn(0x2A000)
    out.print(f"{dfn!r} + 3 = {dfn + 3!r}; dfn_to_daddr({dfn!r}) = {dfn_to_daddr(dfn)!r}")
    try:
        dfn + mfn  # type: ignore[operator]
    except TypeError as exc:
        out.print(f"Mixing kinds is refused at run time too: [red]TypeError[/]: {exc}")
    hwdom = m.create_domain(0, DomainKind.PV, memory_bytes=256 << 20, hardware=True)
    guest = m.create_domain(1, DomainKind.HVM, memory_bytes=128 << 20)
    first = hwdom.extents[0].mfn.value
    m.pages.set_type(first, PageType.L1_PAGE_TABLE, count=16)
    out.print(f"{hwdom}: PV hardware domain, {hwdom.tot_pages} pages (16 of them typed as page tables)")
    out.print(f"{guest}: HVM guest, {guest.tot_pages} pages behind a p2m of {len(guest.p2m)} entries")  # type: ignore[arg-type]
    nic = m.add_pci_device(PciDevice(Sbdf.parse("0000:03:00.0"), PciDevType.PCIE_ENDPOINT, ats=True), owner=hwdom)
    out.print(f"PCI device {nic.sbdf} (requester id {nic.sbdf.bdf:#06x}) owned by {nic.owner}")
    plan = m.allocator.fail_nth(2)
    try:
        m.allocator.alloc("demo:table")
        m.allocator.alloc("demo:table")
    except IommuError as exc:
        out.print(f"Failure injection: {exc}")
    out.print(f"Allocator: {dict(m.allocator.in_use)} in use, injected failures: {plan.fired}")
    iommu = Iommu(m, None)
    iommu.setup()
    iommu.domain_init(guest)
    flags = iommu.map_page(guest, Dfn(0x10), Mfn(first), Perm.RW)
    out.print(f"With no IOMMU enabled the generic layer's map is a no-op: flags={flags!r}")


def run_demo(vendors: list[str] | None = None) -> int:
    out = Console(highlight=False)
    _machine_tour(out)
    found = available_vendors()
    chosen = [v for v in found if vendors is None or v in vendors]
    if not chosen:
        out.print("[yellow]No vendor model is installed yet: the tour above shows the machine and generic layer.[/]")
        return 0
    table = Table(title="Vendors")
    table.add_column("vendor")
    for v in chosen:
        table.add_row(v)
    out.print(table)
    return 0
