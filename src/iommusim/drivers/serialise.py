"""One CPU at a time per IOMMU unit: the lock a driver takes around its queue or ring protocol.

Xen serialises each unit's invalidation queue (VT-d's ``register_lock``) or command ring (AMD's
``iommu->lock``); two CPUs sharing a tail pointer or a completion slot would otherwise wait on each other's
completions.  ``serialised`` wraps a driver-side unit method in its unit's ``lock``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

__all__ = ["serialised"]


class _Locked(Protocol):
    @property
    def lock(self) -> AbstractContextManager[Any]: ...


_P = ParamSpec("_P")
_R = TypeVar("_R")
_U = TypeVar("_U", bound=_Locked)


def serialised(fn: Callable[Concatenate[_U, _P], _R]) -> Callable[Concatenate[_U, _P], _R]:
    """Run the method under its unit's lock."""

    @functools.wraps(fn)
    def locked(self: _U, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.lock:
            return fn(self, *args, **kwargs)

    return locked
