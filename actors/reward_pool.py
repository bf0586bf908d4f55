"""A pool of reward workers fed by ObjectRefs, for a driver that never holds bulk data.

The driver submits the refs of scored batches and gets refs of rewarded batches back; the
arrays go from the object store to a worker and back without passing through the driver.
"""

from __future__ import annotations

from typing import Iterable

import ray

from actors.reward import DEFAULT_REF_TOKEN, RewardWorker, check_settings
from rewards import DEFAULT_PRESET


class RewardPool:
    """``num_workers`` RewardWorkers with one scoring setting (preset, token, threshold).

    Each batch goes to the worker with the fewest unfinished batches, ties broken in turn,
    so a slow batch does not hold up the ones queued behind it on the same worker.
    """

    def __init__(
        self,
        num_workers: int,
        *,
        num_cpus: float = 1.0,
        preset: str = DEFAULT_PRESET,
        ref_token: str = DEFAULT_REF_TOKEN,
        threshold: float = 0.5,
        weights=None,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        check_settings(preset, ref_token, threshold, weights)
        self._settings = dict(preset=preset, ref_token=ref_token, threshold=threshold,
                              weights=weights)
        self._workers = [RewardWorker.options(num_cpus=num_cpus).remote()
                         for _ in range(num_workers)]
        self._unfinished: list[list[ray.ObjectRef]] = [[] for _ in self._workers]
        self._turn = 0

    def submit(self, batch_ref: ray.ObjectRef) -> ray.ObjectRef:
        """Score one batch (pass its ObjectRef); returns the ref of the rewarded batch."""
        worker = self._least_loaded()
        out = self._workers[worker].score.remote(batch_ref, **self._settings)
        self._unfinished[worker].append(out)
        return out

    def map(self, batch_refs: Iterable[ray.ObjectRef]) -> list[ray.ObjectRef]:
        """``submit`` each batch; the refs come back in the input order."""
        return [self.submit(ref) for ref in batch_refs]

    def shutdown(self) -> None:
        """Kill the workers (their queued batches fail); the pool is unusable after."""
        for worker in self._workers:
            ray.kill(worker)
        self._workers, self._unfinished = [], []

    def _least_loaded(self) -> int:
        for i, refs in enumerate(self._unfinished):
            if refs:  # fetch_local=False: look at completion only, never pull the result here
                _, self._unfinished[i] = ray.wait(
                    refs, num_returns=len(refs), timeout=0, fetch_local=False
                )
        n = len(self._workers)
        if not n:
            raise RuntimeError("the reward pool was shut down")
        chosen = min(range(n), key=lambda i: (len(self._unfinished[i]), (i - self._turn) % n))
        self._turn = (chosen + 1) % n
        return chosen
