"""Time-weighted gauges: how busy each phase of the pipeline was, and how long its queues.

The scheduler calls ``begin``/``end`` around every stage call it has outstanding and
``set`` for queue lengths. A phase is busy while its gauge is above zero; the report gives
busy and idle seconds, the busy fraction, and the time-weighted mean and the max of each
gauge over the timer's life. Busy periods are kept so that overlap between phases (the
point of an asynchronous schedule) can be measured, not just inferred from wall time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class _Gauge:
    value: float = 0.0
    since: float = 0.0  # time of the last change
    area: float = 0.0  # integral of value over time
    busy_s: float = 0.0  # time with value > 0
    peak: float = 0.0
    periods: list[tuple[float, float]] = field(default_factory=list)
    busy_from: float | None = None


class PhaseTimer:
    """Gauges keyed by name, integrated over time from construction to ``report``."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._start = clock()
        self._gauges: dict[str, _Gauge] = {}

    def begin(self, name: str) -> None:
        """One more call of phase ``name`` is outstanding."""
        self.set(name, self._gauge(name).value + 1)

    def end(self, name: str) -> None:
        """One outstanding call of phase ``name`` completed."""
        value = self._gauge(name).value
        if value < 1:
            raise ValueError(f"phase {name!r} has no outstanding call")
        self.set(name, value - 1)

    def set(self, name: str, value: float) -> None:
        """Gauge ``name`` now reads ``value`` (a queue length, a count of calls)."""
        now, gauge = self._clock(), self._gauge(name)
        self._advance(gauge, now)
        if gauge.value <= 0 < value:
            gauge.busy_from = now
        elif value <= 0 < gauge.value:
            gauge.periods.append((gauge.busy_from, now))
            gauge.busy_from = None
        gauge.value = value
        gauge.peak = max(gauge.peak, value)

    def periods(self, name: str) -> list[tuple[float, float]]:
        """The (start, end) times when ``name`` was busy; an open period ends now."""
        gauge = self._gauge(name)
        tail = [(gauge.busy_from, self._clock())] if gauge.busy_from is not None else []
        return gauge.periods + tail

    def integral(self, name: str) -> tuple[float, float]:
        """(now, the integral of gauge ``name`` over time up to now): two readings give its mean between them."""
        now, gauge = self._clock(), self._gauge(name)
        self._advance(gauge, now)
        return now, gauge.area

    def report(self) -> dict[str, dict[str, float]]:
        """Per gauge: busy_s, idle_s, busy_fraction, mean and max, up to now."""
        now = self._clock()
        wall = max(now - self._start, 1e-12)
        out = {}
        for name, gauge in sorted(self._gauges.items()):
            self._advance(gauge, now)
            out[name] = {
                "busy_s": gauge.busy_s,
                "idle_s": wall - gauge.busy_s,
                "busy_fraction": gauge.busy_s / wall,
                "mean": gauge.area / wall,
                "max": gauge.peak,
            }
        return out

    def _gauge(self, name: str) -> _Gauge:
        if name not in self._gauges:
            self._gauges[name] = _Gauge(since=self._start)
        return self._gauges[name]

    @staticmethod
    def _advance(gauge: _Gauge, now: float) -> None:
        elapsed = now - gauge.since
        gauge.area += gauge.value * elapsed
        if gauge.value > 0:
            gauge.busy_s += elapsed
        gauge.since = now
