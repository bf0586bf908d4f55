"""A pool of rollout workers fed by ObjectRefs, for a driver that never holds bulk data.

The driver submits refs of prompt batches and gets refs of rollout batches back; weights
are ``ray.put(pack_state(state))`` once per sync by the caller (``data.weight_transport``)
and the same ref goes to every worker.
"""
from __future__ import annotations

import ray

from actors.dispatch import ElasticPool, LeastLoaded
from actors.rollout import RolloutWorker
from config import Config


class RolloutPool(ElasticPool):
    """``num_workers`` RolloutWorkers on one model; ``slot_options``: each worker's placement (its bundle).

    A batch goes to the worker with the fewest unfinished batches (ties in turn). A weight
    broadcast interrupts the batches a worker is generating (they keep the version they
    began with); batches submitted after it begin with the new weights or newer. A replaced
    worker loads the latest broadcast weights before its first batch.

    The pool is elastic: ``add_engine`` starts an engine that is given batches once it has
    started and loaded the latest weights; ``retire_engine`` stops giving one batches and
    kills it once its batches are done (``settle`` reports both, with the slot's placement).
    """

    def __init__(self, config: Config, num_workers: int, *, num_cpus: float = 0.5, num_gpus: float = 0.0,
                 model_path: str | None = None, engine_args: dict | None = None, max_restarts: int = 3,
                 slot_options: list[dict] | None = None):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self._dispatch = LeastLoaded(
            lambda **placement: RolloutWorker.options(num_cpus=num_cpus, num_gpus=num_gpus, **placement).remote(
                config, model_path, engine_args),
            num_workers, "rollout", max_restarts=max_restarts, slot_options=slot_options, ready_method="ping")
        self._version = 0  # of the last broadcast: no batch submitted after it may begin older

    def ready(self, timeout_s: float | None = None) -> None:
        """Block until every engine has started (raises the first start failure, or GetTimeoutError)."""
        ray.get([w.ping.remote() for w in self._dispatch.actors], timeout=timeout_s)

    def dispatch(self, prompt_ref: ray.ObjectRef, **sampling) -> tuple[ray.ObjectRef, str]:
        """Sample groups for one prompt batch (pass its ref): (ref of the rollout batch, the worker's name).

        ``sampling`` as ``RolloutCore.generate``; the name is for ``replace`` when the call fails.
        """
        return self._dispatch.dispatch("generate", prompt_ref, min_version=self._version, **sampling)

    def broadcast_named(self, state_ref: ray.ObjectRef, version: int) -> list[tuple[ray.ObjectRef, str]]:
        """Every worker loads the one stored state (replayed on replacements): (ack ref, worker name) each."""
        if not isinstance(state_ref, ray.ObjectRef):  # a dict here would be stored once per worker
            raise TypeError("broadcast_named takes the ObjectRef of ray.put(state), not the state itself")
        self._version = int(version)
        return self._dispatch.broadcast("update_weights", state_ref, version)
