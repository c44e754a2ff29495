"""Fail the 1st, 2nd, ... Nth hypervisor allocation of an operation until it passes untouched.

A sweep first runs the operation once without failures and records the owner of every hypervisor
allocation it makes (its *allocation points*).  Then, on a fresh copy of the same situation each time, it
makes the n-th of those allocations fail (``PageAllocator`` failure injection) and hands the outcome to a
caller's check: the error raised (or none, where the hypervisor swallows the failure), which allocation
failed and the state to inspect.  Last it runs with a failure planned one past the end, which must not
fire: that is the run that "passes untouched".

The driver itself only insists on what makes a sweep meaningful: the situation is rebuilt identically
(the n-th allocation is the one the clean run made n-th), and the planned failure really fired.  What a
failure must and must not change is the caller's business, because that is where the vendors differ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from iommusim.machine.allocator import AllocationFailurePlan, PageAllocator

__all__ = [
    "Attempt",
    "RecordingPlan",
    "SweepError",
    "SweepReport",
    "each_kind",
    "every_point",
    "owner_kind",
    "sweep",
]

S = TypeVar("S")


class SweepError(AssertionError):
    """The sweep itself went wrong: the situation is not reproducible, or a planned failure never fired."""


@dataclass
class RecordingPlan(AllocationFailurePlan):
    """A failure plan that also remembers, in order, the owner of every allocation it counted."""

    owners: list[str] = field(default_factory=list)

    def should_fail(self, owner: str) -> bool:
        if self.owner_prefix is None or owner.startswith(self.owner_prefix):
            self.owners.append(owner)
        return super().should_fail(owner)


@dataclass(frozen=True)
class Attempt(Generic[S]):
    """One run of the operation: which allocation was made to fail (none in the clean runs) and what came of it."""

    nth: int  # 0: the clean run; len(points) + 1: the run that passes untouched
    owner: str | None  # owner of the allocation that failed, None if nothing failed
    error: Exception | None  # what the operation raised, None if it returned
    state: S
    allocations: tuple[str, ...]  # owners of the allocations counted, the failed one included

    @property
    def failed(self) -> bool:
        return self.owner is not None


@dataclass
class SweepReport(Generic[S]):
    name: str
    points: tuple[str, ...]  # owners of the clean run's allocations, in order
    attempts: list[Attempt[S]] = field(default_factory=list)

    @property
    def tried(self) -> list[int]:
        """The values of N that made an allocation fail."""
        return [a.nth for a in self.attempts if a.failed]

    @property
    def failed_owners(self) -> set[str]:
        return {a.owner for a in self.attempts if a.owner is not None}

    @property
    def failed_kinds(self) -> set[str]:
        return {owner_kind(o) for o in self.failed_owners}

    @property
    def kinds(self) -> set[str]:
        """Every kind of structure the operation allocates."""
        return {owner_kind(o) for o in self.points}


def owner_kind(owner: str) -> str:
    """The kind of structure an allocator owner names: ``"d1:iommu-pt"`` -> ``"iommu-pt"``."""
    return owner.rpartition(":")[2]


def every_point(points: Sequence[str]) -> range:
    """Every N from 1 to the number of allocations: the exhaustive sweep."""
    return range(1, len(points) + 1)


def each_kind(points: Sequence[str]) -> list[int]:
    """The first two and the last allocation of each owner: every allocation point, cheaply.

    Two, because the first allocation of an owner is often special (a root, a queue made once) and the
    second is the first of the ordinary ones.
    """
    seen: dict[str, list[int]] = {}
    for i, owner in enumerate(points, start=1):
        seen.setdefault(owner, []).append(i)
    chosen: set[int] = set()
    for ns in seen.values():
        chosen.update((*ns[:2], ns[-1]))
    return sorted(chosen)


def _run(
    setup: Callable[[], S],
    operation: Callable[[S], object],
    allocator: Callable[[S], PageAllocator],
    plan: RecordingPlan,
) -> tuple[S, Exception | None]:
    state = setup()
    alloc = allocator(state)
    alloc.failure = plan
    try:
        operation(state)
    except Exception as exc:  # the check decides whether this was the right error
        return state, exc
    finally:
        if alloc.failure is plan:
            alloc.clear_failures()
    return state, None


def sweep(
    setup: Callable[[], S],
    operation: Callable[[S], object],
    check: Callable[[Attempt[S]], None],
    *,
    allocator: Callable[[S], PageAllocator],
    owner_prefix: str | None = None,
    select: Callable[[Sequence[str]], Iterable[int]] = every_point,
    name: str = "",
) -> SweepReport[S]:
    """Sweep ``operation`` over the allocations it makes in the situation ``setup`` builds.

    ``check`` sees the clean run (``nth`` 0), one attempt per selected N and the final untouched run;
    ``owner_prefix`` restricts both counting and failing to matching owners; ``select`` picks which N to
    try from the clean run's allocation points (all of them by default).
    """
    plan = RecordingPlan(owner_prefix=owner_prefix)
    state, error = _run(setup, operation, allocator, plan)
    if error is not None:
        raise SweepError(f"{name}: the operation fails without any injected failure: {error!r}") from error
    report: SweepReport[S] = SweepReport(name, tuple(plan.owners))
    check(Attempt(0, None, None, state, report.points))
    points = report.points
    for n in sorted(set(select(points))):
        if not 1 <= n <= len(points):
            raise SweepError(f"{name}: N={n} is outside the {len(points)} allocation(s) of the clean run")
        plan = RecordingPlan(nth=n, owner_prefix=owner_prefix)
        state, error = _run(setup, operation, allocator, plan)
        if not plan.fired:
            raise SweepError(f"{name}: allocation #{n} never happened, though the clean run made {len(points)}")
        if plan.fired[0] != points[n - 1]:
            raise SweepError(
                f"{name}: allocation #{n} was for {plan.fired[0]!r}, the clean run made it for {points[n - 1]!r}"
            )
        attempt = Attempt(n, plan.fired[0], error, state, tuple(plan.owners))
        report.attempts.append(attempt)
        check(attempt)
    n = len(points) + 1
    plan = RecordingPlan(nth=n, owner_prefix=owner_prefix)
    state, error = _run(setup, operation, allocator, plan)
    if plan.fired:
        raise SweepError(f"{name}: allocation #{n} happened, though the clean run made only {len(points)}")
    check(Attempt(n, None, error, state, tuple(plan.owners)))
    return report
