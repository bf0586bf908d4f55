"""The policy deployment: a thin Ray Serve shell over ``cores.PolicyCore``.

Concurrent questions are batched by ``@serve.batch`` and answered in one generate call
(``serve.policy.generator``: the rollout's vLLM engine, or eval's function). ``reconfigure``
(the deployment's ``user_config``) loads a model folder's policy beside the one serving, then,
between two batches, loads it into the generator and swaps it in: a running batch finishes
with the weights it began with, no request is dropped, and each answer names the version
that produced it.
"""
from __future__ import annotations

import asyncio

from ray import serve

from config import Config
from config.builders import serve_generator
from pipelines.serve.cores import Answer, PolicyCore, Question


class NoModelError(RuntimeError):
    """No model folder is loaded yet (``--follow`` on a run that has written none)."""


@serve.deployment(name="policy")
class PolicyDeployment:
    def __init__(self, config: dict):
        self.config = Config.model_validate(config)
        self.generator = serve_generator(self.config)
        self.core: PolicyCore | None = None
        self.swap = asyncio.Lock()  # held by a running batch and by a swap

    async def reconfigure(self, user_config: dict) -> None:
        """``{"model_dir", "version", "max_batch_size", "batch_wait_timeout_s"}``; a new version loads first."""
        self.answer.set_max_batch_size(int(user_config["max_batch_size"]))
        self.answer.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
        model_dir, version = user_config.get("model_dir"), int(user_config.get("version", 0))
        if model_dir and (self.core is None or self.core.version != version):
            core = await asyncio.to_thread(PolicyCore, self.config, model_dir, version, self.generator)
            async with self.swap:
                await asyncio.to_thread(core.activate)
                self.core = core

    def status(self) -> dict:
        core = self.core
        return {"model": core.model_dir if core else None, "weights_version": core.version if core else None}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def answer(self, questions: list[Question]) -> list[Answer]:
        async with self.swap:
            core = self.core
            if core is None:
                raise NoModelError("no model is loaded yet")
            return await asyncio.to_thread(core.answer, questions)
