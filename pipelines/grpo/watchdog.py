"""Stall detection: an actor with calls outstanding and no call finished for too long.

Ray-free bookkeeping by actor name; the scheduler reports and replaces what it finds.
"""
from __future__ import annotations


class Watchdog:
    """Per actor: outstanding calls, and the last time it made progress.

    Progress is a call finishing, or the actor going from idle to busy; an actor is
    stalled when it is busy and has made none for ``timeout_s``. Each stall is reported
    once (its clock restarts), so a replacement gets a fresh allowance.
    """

    def __init__(self, timeout_s: float | None):
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"the stall timeout must be > 0 s, got {timeout_s}")
        self.timeout_s = timeout_s
        self._busy: dict[str, int] = {}
        self._progress: dict[str, float] = {}

    def started(self, worker: str | None, now: float) -> None:
        if worker is None:
            return
        if not self._busy.get(worker):
            self._progress[worker] = now
        self._busy[worker] = self._busy.get(worker, 0) + 1

    def finished(self, worker: str | None, now: float) -> None:
        if worker is None or not self._busy.get(worker):
            return
        self._busy[worker] -= 1
        self._progress[worker] = now

    def stalled(self, now: float) -> list[tuple[str, float]]:
        """(actor, seconds without progress) of every stalled actor, each reported once."""
        if self.timeout_s is None:
            return []
        found = [(w, now - self._progress[w]) for w, n in self._busy.items()
                 if n and now - self._progress[w] > self.timeout_s]
        for worker, _ in found:
            self._progress[worker] = now
        return found
