"""Interruptible generation (AReaL-style): new weights land between two engine steps.

A rollout call drives vLLM's engine step by step under a lock. A weight update from
another thread of the (threaded) actor leaves its loader as *pending*; the generating
thread applies it at the next step boundary and preempts every running request
(``reset_prefix_cache(reset_running_requests=True)``), so vLLM recomputes their KV cache
with the new weights and they go on decoding with them. With no call running, the update
applies at once. A call's responses are tagged with the version they *began* with: the
staleness bound holds for their oldest token, and their logprobs are those of the weights
that sampled each token (the behaviour policy the learner's ratio needs).
"""
from __future__ import annotations

import threading
import time
from typing import Callable

POLL_S = 0.02


class InterruptibleEngine:
    def __init__(self, llm):
        self.llm = llm
        self.version = 0
        self._engine = threading.Lock()  # one thread drives the engine at a time
        self._guard = threading.Lock()  # protects everything below and the version
        self._pending: tuple[Callable[[], None], int] | None = None  # (load, version): the newest submitted
        self._waiting: dict[int, int] = {}  # version -> update callers waiting for it
        self._outcome: dict[int, bool | BaseException] = {}  # version -> landed inside a call? / why it failed

    def generate(self, build: Callable[[], list], params: list, min_version: int = 0,
                 wait_s: float = 600.0) -> tuple[list, int]:
        """(finished RequestOutputs in prompt order, the weights version they began with).

        ``build()`` makes the prompts (embeddings from the actor's weights), under the lock.
        The call begins only once weights ``min_version`` are in: an update submitted before
        it may still be on its way in another thread, and must not be overtaken.
        """
        self._acquire_at(min_version, wait_s)
        try:
            began = self.version
            prompts = build()
            if not prompts:
                return [], began
            request_ids = self.llm._add_completion_requests(prompts, params, use_tqdm=False)
            engine, outputs = self.llm.llm_engine, []
            try:
                while engine.has_unfinished_requests():
                    outputs += [out for out in engine.step() if out.finished]
                    if engine.has_unfinished_requests():  # between two steps of running requests
                        self._apply(interrupt=True)
            except BaseException:
                engine.abort_request(list(request_ids))  # the next call must not collect these
                raise
            return sorted(outputs, key=lambda out: int(out.request_id)), began
        finally:
            self._engine.release()

    def _acquire_at(self, min_version: int, wait_s: float) -> None:
        """Take the engine with weights ``min_version`` or newer loaded (TimeoutError past ``wait_s``)."""
        deadline = time.monotonic() + wait_s
        while True:
            self._engine.acquire()
            try:
                self._apply(interrupt=False)
            except BaseException:
                self._engine.release()
                raise
            if self.version >= min_version:
                return
            self._engine.release()
            if time.monotonic() > deadline:
                raise TimeoutError(f"weights version {min_version} never arrived within {wait_s:.0f} s "
                                   f"(the engine has version {self.version}); did its update fail?")
            time.sleep(POLL_S)

    def update(self, load: Callable[[], None], version: int) -> bool:
        """Run ``load`` between engine steps (or now, if idle) and move to ``version``.

        True if the weights landed inside a running call. Versions only move forward, in
        whatever order the actor's threads deliver them: an update older than the weights
        loaded or pending is never loaded, and its caller returns (False) once newer
        weights are in, or raises if their load failed.
        """
        version = int(version)
        with self._guard:
            if version <= self.version:
                return False
            self._waiting[version] = self._waiting.get(version, 0) + 1
            if self._pending is None or self._pending[1] < version:
                self._pending = (load, version)
        try:
            while True:
                with self._guard:
                    if version in self._outcome:
                        outcome = self._outcome[version]
                        if isinstance(outcome, BaseException):
                            raise outcome
                        return outcome
                if self._engine.acquire(timeout=POLL_S):
                    try:
                        self._apply(interrupt=False)
                    finally:
                        self._engine.release()
        finally:
            with self._guard:
                self._waiting[version] -= 1
                if not self._waiting[version]:
                    del self._waiting[version]
                    self._outcome.pop(version, None)

    def _apply(self, interrupt: bool) -> None:
        """Called by the engine's owner: load the pending weights, if any; ``interrupt``: inside a call."""
        with self._guard:
            pending, self._pending = self._pending, None
            if pending is None or pending[1] <= self.version:  # came in while newer weights loaded
                return
        load, version = pending
        try:
            load()
        except Exception as exc:  # its callers raise it; a generating call goes on
            self._settle(version, lambda waited: exc)  # the older ones it replaced never loaded either
            return
        self.llm.reset_prefix_cache(reset_running_requests=interrupt)
        with self._guard:
            self.version = version
        self._settle(version, lambda waited: interrupt and waited == version)

    def _settle(self, version: int, outcome: Callable[[int], bool | BaseException]) -> None:
        """Answer every caller waiting for ``version`` or an older one it superseded."""
        with self._guard:
            for waited in self._waiting:
                if waited <= version and waited not in self._outcome:
                    self._outcome[waited] = outcome(waited)
