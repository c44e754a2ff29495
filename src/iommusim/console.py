"""The hypervisor console: a simulated clock, log levels and Xen's printk rate limiter.

The model keeps its own time so that runs are deterministic: nothing advances the clock but the code that
says so (a scenario step, a test, a timeout that the model waits out).  Log lines are kept in memory for
tests and tools and also forwarded to Python's ``logging``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

__all__ = ["Console", "LogLevel", "LogLine", "RateLimiter", "SimClock"]

_log = logging.getLogger("iommusim.xen")
# a library does not print on its own: without a handler configured by the application, lines stay in the Console
logging.getLogger("iommusim").addHandler(logging.NullHandler())


class SimClock:
    """Monotonic simulated time in nanoseconds."""

    __slots__ = ("_ns",)

    def __init__(self, start_ns: int = 0) -> None:
        self._ns = start_ns

    @property
    def ns(self) -> int:
        return self._ns

    @property
    def ms(self) -> int:
        return self._ns // 1_000_000

    def advance(self, ns: int) -> None:
        if ns < 0:
            raise ValueError("time does not run backwards")
        self._ns += ns

    def advance_ms(self, ms: int) -> None:
        self.advance(ms * 1_000_000)


class LogLevel(IntEnum):
    """Xen's XENLOG_* levels, most severe first."""

    ERR = 0
    WARNING = 1
    INFO = 2
    DEBUG = 3


_PY_LEVEL = {
    LogLevel.ERR: logging.ERROR,
    LogLevel.WARNING: logging.WARNING,
    LogLevel.INFO: logging.INFO,
    LogLevel.DEBUG: logging.DEBUG,
}


@dataclass(frozen=True, slots=True)
class LogLine:
    time_ns: int
    level: LogLevel
    text: str

    def __str__(self) -> str:
        return f"({self.level.name}) {self.text}"


class RateLimiter:
    """Token bucket as Xen's printk limiter has it: one token per ``interval_ms``, at most ``burst`` saved.

    When a message is allowed after some were refused, the limiter reports how many it swallowed so the
    caller can print the "suppressed" line first.
    """

    def __init__(self, clock: SimClock, interval_ms: int = 5000, burst: int = 10) -> None:
        self.clock = clock
        self.interval_ms = interval_ms
        self.burst = burst
        self._tokens_ms = interval_ms * burst
        self._last_ms = clock.ms
        self.suppressed = 0
        self.total_suppressed = 0

    def allow(self) -> tuple[bool, int]:
        """(allowed, messages suppressed since the last allowed one)."""
        now = self.clock.ms
        self._tokens_ms = min(self._tokens_ms + (now - self._last_ms), self.interval_ms * self.burst)
        self._last_ms = now
        if self._tokens_ms >= self.interval_ms:
            self._tokens_ms -= self.interval_ms
            missed, self.suppressed = self.suppressed, 0
            return True, missed
        self.suppressed += 1
        self.total_suppressed += 1
        return False, 0


class Console:
    """Where the hypervisor's messages go."""

    def __init__(self, clock: SimClock | None = None, *, keep: int = 100_000) -> None:
        self.clock = clock if clock is not None else SimClock()
        self.lines: list[LogLine] = []
        self._keep = keep
        self.limiter = RateLimiter(self.clock)

    def printk(self, level: LogLevel, text: str) -> None:
        line = LogLine(self.clock.ns, level, text)
        self.lines.append(line)
        if len(self.lines) > self._keep:
            del self.lines[: len(self.lines) - self._keep]
        _log.log(_PY_LEVEL[level], text)

    def printk_ratelimited(self, level: LogLevel, text: str) -> bool:
        """Print through the global limiter; returns whether the line was printed."""
        allowed, missed = self.limiter.allow()
        if not allowed:
            return False
        if missed:
            self.printk(LogLevel.WARNING, f"printk: {missed} messages suppressed.")
        self.printk(level, text)
        return True

    def grep(self, needle: str) -> list[LogLine]:
        return [line for line in self.lines if needle in line.text]

    def __iter__(self) -> Iterator[LogLine]:
        return iter(self.lines)
