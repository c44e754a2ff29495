"""``iommusim demo``: a short, deterministic, narrated tour of the model on every installed vendor.

For each vendor the same story is told through the vendor-neutral ``Platform`` API: the hardware domain's
IOMMU set-up (with a progress bar), a guest with an assigned device doing DMA, an unmap with its flush and
one without (the stale window that opens and the flush that closes it), a fault with the line the
hypervisor logs, and the hardware's counters.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from iommusim.errors import DmaFault, IommuError, NoDevice
from iommusim.frames import Daddr, Dfn, Gfn, Mfn, dfn_to_daddr
from iommusim.iommu import Iommu
from iommusim.machine import Domain, DomainKind, Machine, PageType, PciDevice, PciDevType, Sbdf
from iommusim.perms import Perm
from iommusim.platform import HardwareSpec, Platform, available_vendors, build_platform
from iommusim.tools.vendors import VENDOR_TITLES

NIC = "0000:03:00.0"
HWDOM_BYTES = 256 << 20
GUEST_BYTES = 64 << 20


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
    out.print(f"{guest}: HVM guest, {guest.tot_pages} pages behind a p2m")
    nic = m.add_pci_device(PciDevice(Sbdf.parse(NIC), PciDevType.PCIE_ENDPOINT), owner=hwdom)
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
    out.print(f"Without an IOMMU the generic layer's map is a no-op: flags={flags!r}")


def _dma_read(p: Platform, dev: PciDevice, gfn: int, length: int = 16) -> str:
    try:
        data = p.machine.dma.read(dev, Daddr(gfn << 12), length)
        return f"[green]read {data.rstrip(bytes(1))!r}[/]"
    except DmaFault as exc:
        return f"[red]fault[/] ({exc})"


def _new_console_lines(p: Platform, mark: int) -> list[str]:
    return [line.text for line in p.machine.console.lines[mark:]]


def _log(out: Console, p: Platform, mark: int) -> None:
    for line in _new_console_lines(p, mark):
        out.print(f"  [dim]hypervisor log:[/] {line}")


def _mapped_pages(p: Platform, d: Domain) -> int:
    """Pages the domain's IOMMU view maps, read back from memory (through the vendor's tools, if any)."""
    try:
        from iommusim.tools.tables import table_mappings
        from iommusim.tools.vendors import vendor_tools

        tables = vendor_tools(p.vendor).domain_tables(p, d)
        return 0 if tables is None else sum(m.pages for m in table_mappings(p.machine.memory, tables))
    except NoDevice:
        return sum(m.pages for m in p.iommu.dump_page_tables(d))


def _check_line(p: Platform) -> str | None:
    """The isolation check's verdict in one line (None when the vendor has no tools support yet)."""
    try:
        from iommusim.tools.check import check

        report = check(p)
    except NoDevice:
        return None
    verdict = "[green]no violation[/]" if report.ok else f"[red]{len(report.violations)} violation(s)[/]"
    owed = f", {len(report.stale)} stale window(s) with the flush still owed" if report.stale else ""
    return f"isolation check: {verdict}{owed}"


def _vendor_story(out: Console, vendor: str) -> None:
    out.rule(f"[bold]{VENDOR_TITLES.get(vendor, vendor)}")
    nic = PciDevice(Sbdf.parse(NIC), PciDevType.PCIE_ENDPOINT)
    p = build_platform(HardwareSpec(vendor=vendor, ram_bytes=1 << 30, iotlb_entries=64), devices=[nic])
    out.print(f"{len(p.units)} IOMMU unit(s): {', '.join(u.name for u in p.units)}")

    with Progress(
        TextColumn("hardware domain set-up"), BarColumn(), TaskProgressColumn(), console=out, transient=True
    ) as bar:
        task = bar.add_task("hwdom", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        hwdom = p.create_hardware_domain(HWDOM_BYTES, progress=progress)
    out.print(f"{hwdom}: {hwdom.tot_pages} pages of its own; its IOMMU view maps {_mapped_pages(p, hwdom)} pages")

    guest = p.create_guest(1, GUEST_BYTES)
    p.iommu.assign_device(guest, NIC)
    dev = p.device(NIC)
    out.print(f"{dev.sbdf} assigned to {guest}; {guest} now has IOMMU tables ({p.iommu.state(guest).status.value})")
    out.print(f"{guest}'s IOMMU view maps {_mapped_pages(p, guest)} pages, its whole memory")

    gfn = 0x100
    p.machine.dma.write(dev, Daddr(gfn << 12), b"hello from a NIC")
    assert guest.p2m is not None
    entry = guest.p2m.lookup(Gfn(gfn))
    landed = p.machine.memory.read_bytes(entry.mfn.value << 12, 16) if entry else b""
    out.print(f"DMA write to gfn {gfn:#x} landed in {entry.mfn if entry else '?'}: {landed!r}")

    out.print("[bold]Unmap with its flush[/]: the device loses the page at once")
    mark = len(p.machine.console.lines)
    p.guest_unmap(guest, Gfn(gfn))
    out.print(f"  DMA read of gfn {gfn:#x}: {_dma_read(p, dev, gfn)}")
    _log(out, p, mark)

    stale = gfn + 1
    secret = f"{guest} secret, page {stale:#x}".encode()
    p.machine.dma.write(dev, Daddr(stale << 12), secret)
    out.print(
        f"[bold]Unmap without its flush[/]: {secret.decode()!r} sits in gfn {stale:#x}, and the IOTLB knows the page"
    )
    p.guest_unmap(guest, Gfn(stale), flush=False)
    owed = ", ".join(f"dfn {a:#x}" + (f" x{n}" if n > 1 else "") for a, n in p.iommu.ledger.pending(guest.domid))
    out.print(f"  unmapped from {guest}'s tables with the flush skipped; the flush ledger says {guest} owes: {owed}")
    out.print(
        f"  DMA read of gfn {stale:#x} after the unmap: {_dma_read(p, dev, stale, len(secret))}"
        "  [yellow]<- stale translation: the device still reads the page the guest gave up[/]"
    )
    verdict = _check_line(p)
    if verdict:
        out.print(f"  {verdict}")
    p.iommu.iotlb_flush(guest, Dfn(stale), 1)
    mark = len(p.machine.console.lines)
    out.print(f"  after the flush: {_dma_read(p, dev, stale)}")
    _log(out, p, mark)
    out.print(f"  the flush ledger is empty again: {p.iommu.ledger.pending(guest.domid) == []}")

    table = Table(title=f"{VENDOR_TITLES.get(vendor, vendor)} counters")
    table.add_column("unit")
    table.add_column("counter")
    table.add_column("value", justify="right")
    for unit, counters in p.counters().items():
        for name, value in sorted(counters.items()):
            if value:
                table.add_row(unit, name, str(value))
    out.print(table)


def run_demo(vendors: Sequence[str] | None = None) -> int:
    out = Console(highlight=False)
    _machine_tour(out)
    found = available_vendors()
    chosen = [v for v in found if vendors is None or v in vendors]
    if vendors:
        missing = [v for v in vendors if v not in found]
        if missing:
            out.print(f"[red]not installed:[/] {', '.join(missing)} (installed: {', '.join(found) or 'none'})")
            return 2
    if not chosen:
        out.print("[yellow]No vendor model is installed yet: the tour above shows the machine and generic layer.[/]")
        return 0
    rc = 0
    for vendor in chosen:
        try:
            _vendor_story(out, vendor)
        except (IommuError, DmaFault) as exc:  # a vendor model that breaks must not hide the others
            out.print(f"[red]the {vendor} story stopped:[/] {exc}")
            rc = 1
    return rc
