"""The ``serve`` section: `segrl serve`'s Ray Serve deployments and the HTTP API's input caps.

Each deployment takes a fixed ``num_replicas`` or an ``autoscaling_config`` (not both), the
requests one replica runs at once (``max_ongoing_requests``) and the requests its handles may
queue beyond them (``max_queued_requests``, -1: unbounded; past it a call is refused and the
API answers 503 with Retry-After), and the resources of each replica.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from config.section import Section
from data.rle import MAX_MASK_PIXELS


class AutoscalingOptions(Section):
    """Ray Serve's autoscaling_config (the keys segrl sets; the rest keep Serve's defaults)."""

    min_replicas: NonNegativeInt = 1
    max_replicas: PositiveInt = 1
    target_ongoing_requests: float = Field(2.0, gt=0, description="ongoing requests per replica the autoscaler "
                                           "aims at")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingOptions:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} exceeds max_replicas {self.max_replicas}")
        return self


class DeploymentOptions(Section):
    num_replicas: PositiveInt | None = Field(None, description="fixed replicas (None: 1, or autoscaling_config's)")
    autoscaling_config: AutoscalingOptions | None = None
    max_ongoing_requests: PositiveInt = 8
    max_queued_requests: int = Field(-1, ge=-1, description="requests queued beyond max_ongoing_requests (-1: "
                                     "unbounded); past it: 503 with Retry-After")
    num_cpus: float = Field(0.25, ge=0)
    num_gpus: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _one_scaling(self) -> DeploymentOptions:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("give num_replicas or autoscaling_config, not both")
        return self

    def serve_options(self) -> dict:
        """Keyword arguments of ``Deployment.options``."""
        options = {"max_ongoing_requests": self.max_ongoing_requests, "max_queued_requests": self.max_queued_requests,
                   "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}}
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config.model_dump()
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options


class IngressOptions(DeploymentOptions):
    """The FastAPI ingress: light, many requests at once (each mostly waits on the two below)."""

    max_ongoing_requests: PositiveInt = 64
    num_cpus: float = Field(0.1, ge=0)


class SegmentOptions(DeploymentOptions):
    max_ongoing_requests: PositiveInt = 16
    max_queued_requests: int = Field(64, ge=-1)


class PolicyDeploymentOptions(SegmentOptions):
    generator: Literal["vllm", "transformers"] = Field(
        "vllm", description="how answers are decoded (models.generators): the rollout's vLLM engine, or eval's "
        "transformers generate (what `segrl eval` decodes with; no engine start)")
    max_batch_size: PositiveInt = Field(8, description="@serve.batch: requests generated together")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="@serve.batch: longest wait to fill a batch")

    @model_validator(mode="after")
    def _batch_fits(self) -> PolicyDeploymentOptions:
        if self.max_batch_size > self.max_ongoing_requests:
            raise ValueError(f"max_batch_size {self.max_batch_size} exceeds max_ongoing_requests "
                             f"{self.max_ongoing_requests}: a batch could never fill")
        return self


class ServeConfig(Section):
    """`segrl serve`: where it listens, what a request may hold, the three deployments."""

    host: str = Field("127.0.0.1", description="HTTP bind address (loopback unless set)")
    port: int = Field(8000, ge=1, le=65535)
    request_timeout_s: float = Field(60.0, gt=0, description="a request running longer is answered 408")
    retry_after_s: PositiveInt = Field(1, description="Retry-After of a 503")
    max_image_bytes: PositiveInt = Field(8 << 20, description="413 above it (the encoded image file)")
    max_image_pixels: int = Field(16 << 20, ge=1, le=MAX_MASK_PIXELS, description="413 above it (height x width)")
    max_aspect_ratio: float = Field(32.0, ge=1, description="400 above it: the encoders' resize would lose a side")
    max_query_chars: PositiveInt = Field(1000, description="422 above it")
    max_new_tokens: PositiveInt | None = Field(None, description="a request's cap and default (None: the eval's, "
                                               "eval.max_new_tokens or data.max_response_length)")
    feature_cache_size: NonNegativeInt = Field(64, description="images whose encoder features a segmentation "
                                               "replica keeps (by content hash)")
    follow_interval_s: float = Field(5.0, gt=0, description="--follow: how often the run folder is looked at")
    ingress: IngressOptions = IngressOptions()
    policy: PolicyDeploymentOptions = PolicyDeploymentOptions()
    segment: SegmentOptions = SegmentOptions()
