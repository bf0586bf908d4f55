"""A pool of reward workers fed by ObjectRefs, for a driver that never holds bulk data.

The driver submits the refs of reference batches and gets refs of rewarded batches back; the
arrays go from the object store to a worker and back without passing through the driver.
"""

from __future__ import annotations

import ray

from actors.dispatch import LeastLoaded, SupervisedPool
from actors.reward import RewardWorker
from rewards import DEFAULT_PRESET
from rewards.batch import DEFAULT_REF_TOKEN, check_settings


class RewardPool(SupervisedPool):
    """``num_workers`` RewardWorkers with one scoring setting (preset, token, threshold, estimator).

    Each batch goes to the worker with the fewest unfinished batches, ties broken in turn,
    so a slow batch does not hold up the ones queued behind it on the same worker.
    ``slot_options``: each worker's placement (its bundle), kept by its replacements.
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
        advantage_estimator: str = "grpo",
        max_restarts: int = 3,
        slot_options: list[dict] | None = None,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        check_settings(preset, ref_token, threshold, weights, advantage_estimator)
        self._settings = dict(preset=preset, ref_token=ref_token, threshold=threshold,
                              weights=weights, advantage_estimator=advantage_estimator)
        self._dispatch = LeastLoaded(
            lambda **placement: RewardWorker.options(num_cpus=num_cpus, **placement).remote(),
            num_workers, "reward", max_restarts=max_restarts, slot_options=slot_options)

    def dispatch(self, batch_ref: ray.ObjectRef) -> tuple[ray.ObjectRef, str]:
        """Reward one batch (pass its ObjectRef): (ref of the reward batch, the worker's name)."""
        return self._dispatch.dispatch("reward", batch_ref, **self._settings)
