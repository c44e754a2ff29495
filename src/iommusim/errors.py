"""One exception hierarchy that carries Xen's errno.

Xen returns negative errno values from every IOMMU path and marks the functions must-check; the Python
analogue is an exception, which cannot be ignored by accident.  Every error names the operation, the
domain and the frame involved when they are known, so that a log line or a test can say exactly what
failed.  ``HypervisorBug`` stands apart: it models Xen's BUG()/BUG_ON(), a crash of the hypervisor itself,
and is deliberately not an ``IommuError`` so that no caller handles it by accident.
"""

from __future__ import annotations

import errno as _errno
from typing import ClassVar

__all__ = [
    "AddressNotAvailable",
    "AlreadyExists",
    "BadAddress",
    "Busy",
    "CrossDevice",
    "DmaFault",
    "FrameRangeError",
    "HypervisorBug",
    "InvalidArgument",
    "IommuError",
    "NoDevice",
    "NoSuchDeviceOrAddress",
    "NoSuchDomain",
    "NoSuchEntry",
    "NotImplementedOp",
    "NotPermitted",
    "NotSupported",
    "OutOfMemory",
    "Restart",
    "TimedOut",
    "errno_name",
]

#: Xen's ERESTART (85) is the Linux ERESTART value too; spelled out because not every libc exports it.
ERESTART = getattr(_errno, "ERESTART", 85)


def errno_name(code: int) -> str:
    """Symbolic name of an errno value, as Xen developers know it (ENOMEM, EFAULT, ...)."""
    if code == ERESTART:
        return "ERESTART"
    return _errno.errorcode.get(code, f"E{code}")


class IommuError(Exception):
    """An error with an errno; ``-exc.errno`` is what the Xen function would have returned."""

    errno_value: ClassVar[int] = _errno.EIO

    def __init__(
        self,
        message: str,
        *,
        op: str | None = None,
        domain: object | None = None,
        frame: object | None = None,
    ) -> None:
        self.message = message
        self.op = op
        self.domain = domain
        self.frame = frame
        super().__init__(self._render())

    @property
    def errno(self) -> int:
        return self.errno_value

    @property
    def rc(self) -> int:
        """The value Xen would have returned: the negated errno."""
        return -self.errno_value

    def _render(self) -> str:
        parts = [f"[{errno_name(self.errno_value)}]"]
        if self.op:
            parts.append(f"{self.op}:")
        if self.domain is not None:
            parts.append(f"{self.domain}:")
        parts.append(self.message)
        if self.frame is not None:
            parts.append(f"({self.frame!r})")
        return " ".join(parts)

    def with_context(self, *, op: str | None = None, domain: object | None = None) -> IommuError:
        """Fill in the operation and domain where a lower layer did not know them."""
        if op is not None and self.op is None:
            self.op = op
        if domain is not None and self.domain is None:
            self.domain = domain
        self.args = (self._render(),)
        return self


class OutOfMemory(IommuError):
    errno_value = _errno.ENOMEM


class BadAddress(IommuError):
    errno_value = _errno.EFAULT


class InvalidArgument(IommuError):
    errno_value = _errno.EINVAL


class AddressNotAvailable(IommuError):
    errno_value = _errno.EADDRNOTAVAIL


class NoDevice(IommuError):
    errno_value = _errno.ENODEV


class Busy(IommuError):
    errno_value = _errno.EBUSY


class FrameRangeError(IommuError, ValueError):
    """A frame or address that does not fit where it is used (ERANGE)."""

    errno_value = _errno.ERANGE

    def __init__(self, message: str, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]


class NotSupported(IommuError):
    errno_value = _errno.EOPNOTSUPP


class NotImplementedOp(IommuError):
    """ENOSYS: the operation does not exist for this configuration (e.g. ARM populate_page_table)."""

    errno_value = _errno.ENOSYS


class NoSuchEntry(IommuError):
    errno_value = _errno.ENOENT


class AlreadyExists(IommuError):
    errno_value = _errno.EEXIST


class NotPermitted(IommuError):
    errno_value = _errno.EPERM


class NoSuchDomain(IommuError):
    errno_value = _errno.ESRCH


class TimedOut(IommuError):
    errno_value = _errno.ETIMEDOUT


class CrossDevice(IommuError):
    errno_value = _errno.EXDEV


class NoSuchDeviceOrAddress(IommuError):
    errno_value = _errno.ENXIO


class Restart(IommuError):
    errno_value = ERESTART


class DmaFault(Exception):
    """A device's DMA was refused by the IOMMU; carries the hardware's own fault record.

    Raised to the device (the transaction is aborted), never to the hypervisor: it is not an IommuError.
    """

    def __init__(self, message: str, *, record: object | None = None) -> None:
        super().__init__(message)
        self.record = record


class HypervisorBug(Exception):
    """Xen hit BUG()/BUG_ON(): in the real system the whole host would crash here."""
