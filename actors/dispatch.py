"""Least-loaded dispatch over a list of actors, shared by the rollout and reward pools."""
from __future__ import annotations

import ray


class LeastLoaded:
    """Tracks each actor's unfinished calls; picks the one with the fewest, ties in turn.

    Completion is checked with `fetch_local=False`, so the driver never pulls a result.
    """

    def __init__(self, actors: list, name: str):
        self.actors, self.name = list(actors), name
        self._unfinished: list[list[ray.ObjectRef]] = [[] for _ in self.actors]
        self._turn = 0

    def call(self, method: str, *args, **kwargs) -> ray.ObjectRef:
        """Submit `method` to the least-loaded actor; returns its result ref."""
        index = self._pick()
        out = getattr(self.actors[index], method).remote(*args, **kwargs)
        self._unfinished[index].append(out)
        return out

    def _pick(self) -> int:
        for i, refs in enumerate(self._unfinished):
            if refs:
                _, self._unfinished[i] = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        n = len(self.actors)
        if not n:
            raise RuntimeError(f"the {self.name} was shut down")
        chosen = min(range(n), key=lambda i: (len(self._unfinished[i]), (i - self._turn) % n))
        self._turn = (chosen + 1) % n
        return chosen

    def shutdown(self) -> None:
        """Kill the actors (their queued calls fail); unusable after."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self._unfinished = [], []
