"""Bad input everywhere: the documented error, and nothing changed.

Every call below is a caller's mistake: a frame of the wrong kind, a frame beyond what the domain or the
machine can address, flags that do not exist, a device or domain that does not exist, a malformed
scenario file, a corrupt memory image.  Each must raise the exception (with the errno) the model
documents, or make the CLI print one clear message with its exit status, and leave the machine as it
was: the bytes of every hypervisor page (tables, queues, device tables), the allocator's accounting,
every domain's translations and who owns each device.  Where Xen's policy crashes the domain for a
driver error (x86: the generic wrappers; AMD: its own map), the crash is the only change allowed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sweep_helpers import DISK, NIC, VENDORS, Rig, booted, devices
from typer.testing import CliRunner

from iommusim.cli.app import app
from iommusim.errors import (
    AddressNotAvailable,
    AlreadyExists,
    HypervisorBug,
    InvalidArgument,
    IommuError,
    NoDevice,
    NoSuchDomain,
)
from iommusim.frames import Dfn, Gfn, Mfn
from iommusim.images import write_elf, write_raw
from iommusim.iommu.config import IommuConfig
from iommusim.perms import Perm
from iommusim.platform import HardwareSpec, build_platform
from iommusim.tools.check import check
from iommusim.tools.scenario.library import packaged_scenarios
from iommusim.tools.vendors import vendor_tools

Call = Callable[[Rig], object]


def snapshot(rig: Rig) -> dict[str, Any]:
    """Everything a mistake must not change (domain crashes are compared separately)."""
    p = rig.p
    return {
        "hypervisor pages": rig.table_frames_snapshot(),
        "accounting": dict(rig.alloc.in_use),
        "translations": {d.domid: rig.mappings(d) for d in p.machine.domains.values()},
        "owners": {str(dev.sbdf): getattr(dev.owner, "domid", None) for dev in p.machine.pci},
        "domains": sorted(p.machine.domains),
        "owed flushes": {domid: p.iommu.ledger.pending(domid) for domid in p.iommu.ledger.domains()},
    }


def crashed(rig: Rig) -> dict[int, bool]:
    return {d.domid: d.crashed for d in rig.p.machine.domains.values()}


def refused(rig: Rig, call: Call, error: type[BaseException], *, errno: str | None, crashes: bool = False) -> str:
    """Make the call, expect ``error``; nothing changes but (where Xen's policy says so) the guest's crash."""
    before, was = snapshot(rig), crashed(rig)
    with pytest.raises(error) as info:
        call(rig)
    exc = info.value
    if errno is not None:
        assert isinstance(exc, IommuError) and exc.errno == getattr(__import__("errno"), errno), repr(exc)
    assert snapshot(rig) == before, f"{exc!r} changed the machine"
    assert crashed(rig) == {**was, 1: crashes} if crashes else crashed(rig) == was, repr(exc)
    report = check(rig.p)
    assert report.ok, report.violations
    return str(exc)


# -- the generic layer: kinds, counts and flags, checked before anything happens ---------------------------------


def _m1(r: Rig) -> Mfn:
    return r.mfn(r.g, 1)


KIND_MISTAKES: dict[str, tuple[Call, type[BaseException], str | None]] = {
    "mfn-as-dfn": (lambda r: r.p.iommu.map_page(r.g, _m1(r), _m1(r), Perm.RW), TypeError, None),  # type: ignore[arg-type]
    "int-as-dfn": (lambda r: r.p.iommu.map_page(r.g, 5, _m1(r), Perm.RW), TypeError, None),  # type: ignore[arg-type]
    "dfn-as-mfn": (lambda r: r.p.iommu.map_page(r.g, Dfn(5), Dfn(5), Perm.RW), TypeError, None),  # type: ignore[arg-type]
    "gfn-as-mfn": (lambda r: r.p.iommu.map(r.g, Dfn(5), Gfn(5), 2, Perm.RW), TypeError, None),  # type: ignore[arg-type]
    "gfn-unmap": (lambda r: r.p.iommu.unmap_page(r.g, Gfn(1)), TypeError, None),  # type: ignore[arg-type]
    "int-unmap-range": (lambda r: r.p.iommu.unmap(r.g, 1, 1), TypeError, None),  # type: ignore[arg-type]
    "mfn-flush": (lambda r: r.p.iommu.iotlb_flush(r.g, _m1(r), 1), TypeError, None),  # type: ignore[arg-type]
    "mfn-lookup": (lambda r: r.p.iommu.lookup_page(r.g, _m1(r)), TypeError, None),  # type: ignore[arg-type]
    "dfn-as-gfn": (lambda r: r.p.guest_map(r.g, Dfn(5), _m1(r)), TypeError, None),  # type: ignore[arg-type]
    "gfn-as-mfn-p2m": (lambda r: r.p.guest_map(r.g, Gfn(5), Gfn(6)), TypeError, None),  # type: ignore[arg-type]
    "int-daddr": (lambda r: r.p.machine.dma.read(r.p.device(NIC), 0x1000, 4), TypeError, None),  # type: ignore[arg-type]
    "negative-map-count": (lambda r: r.p.iommu.map(r.g, Dfn(5), _m1(r), -1, Perm.RW), InvalidArgument, "EINVAL"),
    "negative-unmap-count": (lambda r: r.p.iommu.unmap(r.g, Dfn(5), -3), InvalidArgument, "EINVAL"),
    "negative-flush-count": (lambda r: r.p.iommu.iotlb_flush(r.g, Dfn(5), -1), InvalidArgument, "EINVAL"),
    "flag-4": (lambda r: r.p.iommu.map_page(r.g, Dfn(5), _m1(r), Perm(4)), InvalidArgument, "EINVAL"),
    "flag-int-8": (lambda r: r.p.iommu.map_page(r.g, Dfn(5), _m1(r), 8), InvalidArgument, "EINVAL"),  # type: ignore[arg-type]
    "flag-text": (lambda r: r.p.iommu.map(r.g, Dfn(5), _m1(r), 2, "rw"), InvalidArgument, "EINVAL"),  # type: ignore[arg-type]
    "p2m-order-negative": (lambda r: r.p.guest_map(r.g, Gfn(0), _m1(r), order=-1), InvalidArgument, "EINVAL"),
    "p2m-order-huge": (lambda r: r.p.guest_map(r.g, Gfn(0), _m1(r), order=99), InvalidArgument, "EINVAL"),
    "p2m-unmap-order-huge": (lambda r: r.p.guest_unmap(r.g, Gfn(0), order=64), InvalidArgument, "EINVAL"),
    "daddr-negative": (lambda r: r.dma_read(NIC, -1), IommuError, "ERANGE"),
}


@pytest.fixture(scope="module", params=VENDORS)
def shared_rig(request: pytest.FixtureRequest) -> Rig:
    """One machine per vendor for the mistakes that must not change anything at all (so none may leak)."""
    return booted(str(request.param))


@pytest.mark.parametrize("case", sorted(KIND_MISTAKES))
def test_a_callers_mistake_is_refused_before_anything_happens(shared_rig: Rig, case: str) -> None:
    call, error, errno = KIND_MISTAKES[case]
    refused(shared_rig, call, error, errno=errno)


# -- unknown devices and domains, and machines that cannot be built ----------------------------------------------


NAMING_MISTAKES: dict[str, tuple[Call, type[BaseException], str | None]] = {
    "unknown-device": (lambda r: r.p.iommu.assign_device(r.g, "0000:7f:00.0"), NoDevice, "ENODEV"),
    "malformed-sbdf": (lambda r: r.p.iommu.assign_device(r.g, "zz:00"), InvalidArgument, "EINVAL"),
    "int-device": (lambda r: r.p.iommu.assign_device(r.g, 0x300), TypeError, None),
    "someone-elses-device": (lambda r: r.p.iommu.assign_device(r.g, NIC), Exception, None),
    "deassign-not-assigned": (lambda r: r.p.iommu.deassign_device(r.g, DISK), NoDevice, "ENODEV"),
    "unknown-domain": (lambda r: r.p.machine.domain(99), NoSuchDomain, "ESRCH"),
    "duplicate-domain": (lambda r: r.p.create_guest(1, 1 << 20), AlreadyExists, "EEXIST"),
    "second-hardware-domain": (lambda r: r.p.create_hardware_domain(1 << 20), AlreadyExists, "EEXIST"),
    "device-of-unknown-name": (lambda r: r.p.device("0000:00:1f.7"), NoDevice, "ENODEV"),
}


@pytest.mark.parametrize("case", sorted(NAMING_MISTAKES))
def test_unknown_devices_and_domains(shared_rig: Rig, case: str) -> None:
    call, error, errno = NAMING_MISTAKES[case]
    message = refused(shared_rig, call, error, errno=errno)
    assert message


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: build_platform(HardwareSpec("intel")), "unknown vendor"),
        (lambda: IommuConfig(quirks=frozenset({"no-such-quirk"})), "unknown quirk"),
        (lambda: IommuConfig.from_cmdline("iommu=bogus"), "unknown iommu= sub-option"),
        (lambda: build_platform(HardwareSpec(VENDORS[0], ram_bytes=12345)), "multiple of 4 KiB"),
        (lambda: build_platform(HardwareSpec(VENDORS[0], ram_bytes=64 << 20, units=0)), "at least one"),
    ],
)
def test_machines_that_cannot_be_built(build: Callable[[], object], fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        build()


# -- frames out of range: per vendor, as each documents it ---------------------------------------------------------

HUGE = 1 << 52  # a frame 2**64 bytes up: beyond every domain's and every machine's width


def _beyond_domain(vendor: str) -> tuple[Call, type[BaseException], str | None, bool]:
    """A guest frame beyond the domain's DMA address width, changed the way the vendor's guests change."""
    if vendor == "vtd":  # the width check of the driver, through the wrapper's crash policy
        return (
            lambda r: r.p.iommu.map_page(r.g, Dfn(HUGE), _m1(r), Perm.RW),
            AddressNotAvailable,
            "EADDRNOTAVAIL",
            True,
        )
    if vendor == "amd":  # update_paging_mode's ASSERT on a dfn beyond 48 bits: a hypervisor bug, before any change
        return (lambda r: r.p.iommu.map_page(r.g, Dfn(HUGE), _m1(r), Perm.RW), HypervisorBug, None, False)
    return (lambda r: r.p.guest_map(r.g, Gfn(HUGE), _m1(r)), InvalidArgument, "EINVAL", False)  # beyond the IPA size


def _beyond_machine(vendor: str) -> tuple[Call, type[BaseException], str | None, bool]:
    """A machine frame no entry can hold (beyond the units' / the format's physical address width)."""
    if vendor == "smmu":
        return (lambda r: r.p.guest_map(r.g, Gfn(0x100), Mfn(HUGE)), InvalidArgument, "EINVAL", False)
    return (lambda r: r.p.iommu.map_page(r.g, Dfn(0x100), Mfn(HUGE), Perm.RW), InvalidArgument, "EINVAL", True)


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("what", ["beyond-domain", "beyond-machine", "beyond-machine-range", "beyond-width-2"])
def test_frames_out_of_range(vendor: str, what: str) -> None:
    rig = booted(vendor)
    if what == "beyond-domain":
        call, error, errno, crashes = _beyond_domain(vendor)
    elif what == "beyond-machine":
        call, error, errno, crashes = _beyond_machine(vendor)
    elif what == "beyond-machine-range":  # a range whose last frame no entry can hold
        if vendor == "smmu":
            last = Mfn((1 << 36) - 1)  # the p2m's 48-bit output address

            def call(r: Rig) -> object:
                return r.map_guest_range(0x100, last, 2)

            error, errno, crashes = InvalidArgument, "EINVAL", False
        else:
            # the v1 entry's 40-bit frame field on AMD, the units' width (the machine's) on VT-d
            bits = 40 if vendor == "amd" else rig.p.machine.memory.address_width - 12
            last = Mfn((1 << bits) - 1)

            def call(r: Rig) -> object:
                return r.p.iommu.map(r.g, Dfn(0x100), last, 2, Perm.RW)

            error, errno, crashes = InvalidArgument, "EINVAL", True
    else:  # the first frame beyond the machine's own width (46 bits by default): no leaf may point there
        first = Mfn(1 << (rig.p.machine.memory.address_width - 12))
        if vendor == "smmu":
            pytest.skip("the ARM p2m holds 48-bit output addresses: a 46-bit machine frame still fits")
        if vendor == "amd":
            first = Mfn(1 << 40)

        def call(r: Rig) -> object:
            return r.p.iommu.map_page(r.g, Dfn(0x100), first, Perm.RW)

        error, errno, crashes = InvalidArgument, "EINVAL", True
    message = refused(rig, call, error, errno=errno, crashes=crashes)
    assert message


def test_a_vtd_leaf_never_points_beyond_the_units_width() -> None:
    """Regression: VT-d wrote the frame's high bits into reserved bits and reported the page mapped."""
    if "vtd" not in VENDORS:
        pytest.skip("VT-d is not installed")
    rig = booted("vtd")
    d0 = rig.hwdom
    assert d0 is not None
    before = rig.lookup(d0, 0x90000)  # the hardware domain's identity map
    for mfn in (Mfn(1 << 34), Mfn((1 << 34) + 0x1207), Mfn(1 << 40)):
        with pytest.raises(InvalidArgument, match="address width"):
            rig.p.iommu.map_page(d0, Dfn(0x90000), mfn, Perm.RW)
    assert rig.lookup(d0, 0x90000) == before
    assert not d0.crashed  # the hardware domain is exempt from the crash policy


# -- the CLI: malformed scenario files and corrupt images -------------------------------------------------------


def cli(*args: str | Path) -> tuple[int, str]:
    """Run ``iommusim`` in-process; an exception escaping the CLI fails the test (no tracebacks for users)."""
    result = CliRunner().invoke(
        app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1"}, catch_exceptions=False
    )
    assert "Traceback" not in result.output
    return result.exit_code, result.output


BASIC = packaged_scenarios()["basic"].read_text()

MALFORMED = {
    "not-toml": ("[scenario\nname = 'x'\n", "line 1"),
    "step-not-a-name": ('[scenario]\nname = "x"\n[[steps]]\ndo = 5\n', "steps[1]"),
    "unknown-vendor": ('[scenario]\nname = "x"\nvendors = ["intel"]\n', "intel"),
    "bad-size": ('[scenario]\nname = "x"\n[machine]\nmemory = "lots"\n', "machine.memory"),
    "bad-frame": (BASIC + '\n[[steps]]\ndo = "map"\ndomain = 1\ngfn = "d1:zz"\nmfn = 1\n', "gfn"),
    "order-too-big": (BASIC + '\n[[steps]]\ndo = "unmap"\ndomain = 1\ngfn = 0\norder = 99\n', "order"),
    "negative-count": (BASIC + '\n[[steps]]\ndo = "unmap"\ndomain = 1\ngfn = 0\ncount = -4\n', "count"),
    "bad-perms": (BASIC + '\n[[steps]]\ndo = "map"\ndomain = 1\ngfn = 5\nmfn = 5\nperms = "x"\n', "perms"),
    "unknown-device": (BASIC + '\n[[steps]]\ndo = "assign"\ndevice = "0000:7f:00.0"\ndomain = 1\n', "0000:7f:00.0"),
    "binary": ("\x00\x01\x02\xff", ""),
}


@pytest.mark.parametrize("command", ["run", "check"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_scenarios_are_one_clear_message(tmp_path: Path, command: str, case: str) -> None:
    text, fragment = MALFORMED[case]
    path = tmp_path / "bad.toml"
    path.write_bytes(text.encode("utf-8", "surrogateescape") if case != "binary" else b"\x00\x01\x02\xff")
    code, out = cli(command, path)
    assert code in (1, 2), out  # 2: a mistake found before running; 1: a step that cannot be done
    assert fragment in out, out
    assert out.strip()


def test_a_missing_scenario_file_is_a_usage_error(tmp_path: Path) -> None:
    code, out = cli("run", tmp_path / "nope.toml")
    assert code == 2 and "nope.toml" in out


_FIXTURE_OK = [HealthCheck.function_scoped_fixture]


@settings(max_examples=25, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(data=st.data())
def test_mangled_scenarios_never_escape_the_cli(tmp_path: Path, data: st.DataObject) -> None:
    """Random cuts, deletions and substitutions of a packaged example: a result or a clear error, always."""
    mangle_and_run(tmp_path, data)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(data=st.data())
def test_mangled_scenarios_never_escape_the_cli_deep(tmp_path: Path, data: st.DataObject) -> None:
    mangle_and_run(tmp_path, data)


def mangle_and_run(tmp_path: Path, data: st.DataObject) -> None:
    lines = BASIC.splitlines()
    how = data.draw(st.sampled_from(["cut", "drop-line", "replace-value", "swap-lines"]))
    if how == "cut":
        text = BASIC[: data.draw(st.integers(0, len(BASIC)))]
    elif how == "drop-line":
        i = data.draw(st.integers(0, len(lines) - 1))
        text = "\n".join(lines[:i] + lines[i + 1 :])
    elif how == "swap-lines":
        i, j = data.draw(st.integers(0, len(lines) - 1)), data.draw(st.integers(0, len(lines) - 1))
        lines[i], lines[j] = lines[j], lines[i]
        text = "\n".join(lines)
    else:
        candidates = [k for k, ln in enumerate(lines) if "=" in ln]
        i = data.draw(st.sampled_from(candidates))
        junk = data.draw(st.sampled_from(['"x"', "-1", "0x7fffffffffffffff", "[]", "{}", "true", '"d9:0x1"', "1.5"]))
        lines[i] = lines[i].split("=", 1)[0] + "= " + junk
        text = "\n".join(lines)
    path = tmp_path / "mangled.toml"
    path.write_text(text)
    code, out = cli("run", path, "-v", VENDORS[0])
    assert code in (0, 1, 2), out


def _image(tmp_path: Path, kind: str) -> tuple[Path, list[str]]:
    """An image of a small live machine, and the decode arguments for its first target."""
    p = build_platform(HardwareSpec(VENDORS[0], ram_bytes=32 << 20), devices=devices())
    rig = Rig(VENDORS[0], p, p.create_hardware_domain(4 << 20))
    rig.guest = p.create_guest(1, 1 << 20)
    p.iommu.assign_device(rig.guest, NIC)
    target = vendor_tools(rig.vendor).decode_targets(rig.p)[0]
    path = tmp_path / f"mem.{kind}"
    (write_raw if kind == "raw" else write_elf)(rig.p.machine.memory, path)
    opts = [a for k, v in target.options.items() for a in ("-o", f"{k}={v}")]
    return path, ["--format", target.format, "--root", f"{target.root:#x}", *opts]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, list[str]]]:
    tmp = tmp_path_factory.mktemp("images")
    out = {}
    for kind in ("raw", "elf"):
        path, args = _image(tmp, kind)
        out[kind] = (path.read_bytes(), args)
    return out


Images = dict[str, tuple[bytes, list[str]]]


@settings(max_examples=20, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(data=st.data())
def test_corrupt_images_are_refused_clearly(tmp_path: Path, images: Images, data: st.DataObject) -> None:
    """Truncated, overwritten or foreign images: exit 0/1 with a report, or 3 with the problem named."""
    corrupt_and_decode(tmp_path, images, data)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(data=st.data())
def test_corrupt_images_are_refused_clearly_deep(tmp_path: Path, images: Images, data: st.DataObject) -> None:
    corrupt_and_decode(tmp_path, images, data)


def corrupt_and_decode(tmp_path: Path, images: Images, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(sorted(images)))
    blob, args = images[kind]
    how = data.draw(st.sampled_from(["truncate", "header", "flip", "garbage", "empty"]))
    if how == "truncate":
        bad = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif how == "header":  # the ELF header and program headers (or the raw image's first page)
        at = data.draw(st.integers(0, 255))
        bad = blob[:at] + data.draw(st.binary(min_size=1, max_size=16)) + blob[at + 16 :]
    elif how == "flip":
        at = data.draw(st.integers(0, len(blob) - 1))
        bad = blob[:at] + bytes([blob[at] ^ 0xFF]) + blob[at + 1 :]
    elif how == "garbage":
        bad = data.draw(st.binary(min_size=1, max_size=4096))
    else:
        bad = b""
    path = tmp_path / f"bad.{kind}"
    path.write_bytes(bad)
    digest = hashlib.sha256(bad).hexdigest()
    for command in ("decode", "check"):
        cmd = [command, path, *args] if command == "decode" else ["check", "--image", path, *args]
        code, out = cli(*cmd)
        assert code in (0, 1, 3), out
        if code == 3:
            assert out.strip(), "exit 3 without a message"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # the image is only read


def test_decode_without_an_image_or_with_a_wrong_format(tmp_path: Path) -> None:
    code, out = cli("decode", tmp_path / "none.raw", "--format", "arm-s2", "--root", "0x1000")
    assert code in (2, 3) and "none.raw" in out
    img = tmp_path / "x.raw"
    img.write_bytes(bytes(8192))
    code, out = cli("decode", img, "--format", "no-such-format", "--root", "0x1000")
    assert code == 2 and "no-such-format" in out
    code, out = cli("decode", img, "--format", "arm-s2", "--root", "banana")
    assert code == 2
