"""The segmentation deployment: a thin Ray Serve shell over ``cores.SegmentCore``.

``encode`` runs the frozen encoders (cached by image hash), ``segment`` the head of the
version the policy answered with. Both are plain methods, which Serve runs in its thread
pool; a lock guards the core's cache and heads. ``reconfigure`` loads a new version's head
before the policy can answer with it (or ``segment`` loads it on first use).
"""
from __future__ import annotations

import threading

from ray import serve

from config import Config
from pipelines.serve.cores import Answer, Segmentation, SegmentCore
from pipelines.serve.policy_deployment import NoModelError


@serve.deployment(name="segment")
class SegmentDeployment:
    def __init__(self, config: dict):
        self.config = Config.model_validate(config)
        self.core: SegmentCore | None = None
        self.lock = threading.Lock()

    def reconfigure(self, user_config: dict) -> None:
        """``{"model_dir", "version"}``: the encoders load from the first folder (they are frozen), the head per
        version."""
        model_dir, version = user_config.get("model_dir"), int(user_config.get("version", 0))
        if not model_dir:
            return
        core = self.core or SegmentCore(self.config, model_dir, self.config.serve.feature_cache_size)
        with self.lock:
            core.load_head(model_dir, version)
            self.core = core

    def _core(self) -> SegmentCore:
        if self.core is None:
            raise NoModelError("no model is loaded yet")
        return self.core

    def policy_inputs(self) -> tuple[str, ...]:
        with self.lock:
            return self._core().policy_inputs()

    def encode(self, image, image_hash: str) -> tuple[dict, bool]:
        core = self._core()
        with self.lock:
            return core.encode(image, image_hash)

    def segment(self, answer: Answer, features: dict) -> Segmentation | None:
        core = self._core()
        with self.lock:
            return core.segment(answer, features)
