"""What a learner rank trains on, chosen from the GPUs Ray gave it: a pure function, no Ray, no DeepSpeed.

A rank with a GPU computes on it with NCCL and DeepSpeed's CUDA accelerator, in bf16 when
the model's dtype is bfloat16 (fp32 master weights stay in the optimizer). float16 trains
in fp32: fp16 needs loss scaling, whose skipped steps would still count as weights
versions. A rank without one runs the CPU path: gloo, DeepSpeed's CPU accelerator, fp32,
and no offload (everything already lives in host memory). Gradient checkpointing applies
on both.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

ZERO_OFFLOADS = ("none", "optimizer", "optimizer_and_params")
OFFLOAD_TO_CPU = {"device": "cpu", "pin_memory": True}


@dataclass(frozen=True)
class LearnerBackend:
    """One rank's device, process group, precision and memory savers."""

    accelerator: str  # DeepSpeed's accelerator (DS_ACCELERATOR): "cuda" or "cpu"
    dist_backend: str  # torch.distributed backend: "nccl" or "gloo"
    device: str  # where the rank computes: "cuda:<index among CUDA_VISIBLE_DEVICES>" or "cpu"
    dtype: str  # the parameters' compute dtype: "bfloat16" or "float32"
    gradient_checkpointing: bool
    env: dict[str, str] = field(default_factory=dict)  # set before DeepSpeed is imported
    ds_config: dict = field(default_factory=dict)  # top-level DeepSpeed config entries
    zero: dict = field(default_factory=dict)  # zero_optimization entries

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"


def gpu_index(gpu_id: str, visible_devices: str | None) -> int:
    """The device index of Ray's GPU ``gpu_id`` in this process.

    Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs, so its GPU is index 0 of them; when
    the variable is unset (Ray told not to set it) the id is the index itself.
    """
    if not visible_devices:
        return int(gpu_id)
    visible = [d.strip() for d in visible_devices.split(",")]
    if str(gpu_id) not in visible:
        raise ValueError(f"GPU {gpu_id} given by Ray is not in CUDA_VISIBLE_DEVICES={visible_devices}")
    return visible.index(str(gpu_id))


def choose_backend(gpu_ids: Sequence[str | int], visible_devices: str | None, dtype: str,
                   gradient_checkpointing: bool = False, zero_offload: str = "none") -> LearnerBackend:
    """The backend of a rank that Ray gave ``gpu_ids`` (``ray.get_gpu_ids()``), under ``visible_devices``
    (its CUDA_VISIBLE_DEVICES), for a model of ``dtype`` (``model.dtype``)."""
    if zero_offload not in ZERO_OFFLOADS:
        raise ValueError(f"zero_offload must be one of {ZERO_OFFLOADS}, got {zero_offload!r}")
    if len(gpu_ids) > 1:
        raise ValueError(f"a learner rank drives one GPU, Ray gave it {len(gpu_ids)}: "
                         "set cluster.learner.num_gpus to 1 and raise cluster.learner_world_size instead")
    if not gpu_ids:
        return LearnerBackend("cpu", "gloo", "cpu", "float32", gradient_checkpointing, {"DS_ACCELERATOR": "cpu"},
                              {"bf16": {"enabled": False}, "fp16": {"enabled": False}})
    index = gpu_index(str(gpu_ids[0]), visible_devices)
    bf16 = dtype == "bfloat16"
    ds_config = {"bf16": {"enabled": bf16}, "fp16": {"enabled": False}}
    zero = {}
    if zero_offload != "none":
        zero["offload_optimizer"] = dict(OFFLOAD_TO_CPU)
        ds_config["zero_force_ds_cpu_optimizer"] = False  # the client's AdamW steps on the CPU partitions
    if zero_offload == "optimizer_and_params":
        zero["offload_param"] = dict(OFFLOAD_TO_CPU)
    return LearnerBackend("cuda", "nccl", f"cuda:{index}", "bfloat16" if bf16 else "float32", gradient_checkpointing,
                          {"DS_ACCELERATOR": "cuda", "LOCAL_RANK": str(index)}, ds_config, zero)
