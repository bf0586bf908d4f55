"""The learner's backend choice (a pure function of Ray's GPUs and the config) and bf16 weights in transit."""
from __future__ import annotations

import itertools
import pickle

import pytest
import torch

from data.weight_transport import pack_state, unpack_state
from models.learner_backend import ZERO_OFFLOADS, choose_backend, gpu_index

DTYPES = ("float32", "bfloat16", "float16")


@pytest.mark.parametrize("dtype, checkpointing, offload",
                         list(itertools.product(DTYPES, (False, True), ZERO_OFFLOADS)))
def test_no_gpu_is_the_cpu_path_whatever_the_config(dtype, checkpointing, offload):
    b = choose_backend([], None, dtype, checkpointing, offload)
    assert (b.accelerator, b.dist_backend, b.device, b.dtype) == ("cpu", "gloo", "cpu", "float32")
    assert b.env == {"DS_ACCELERATOR": "cpu"} and not b.on_gpu
    assert b.ds_config == {"bf16": {"enabled": False}, "fp16": {"enabled": False}}
    assert b.zero == {}  # host memory already holds everything: nothing to offload
    assert b.gradient_checkpointing is checkpointing


@pytest.mark.parametrize("dtype, checkpointing, offload",
                         list(itertools.product(DTYPES, (False, True), ZERO_OFFLOADS)))
def test_a_gpu_rank_uses_cuda_nccl_and_the_config_precision_and_offload(dtype, checkpointing, offload):
    b = choose_backend(["3"], "3", dtype, checkpointing, offload)
    assert (b.accelerator, b.dist_backend, b.device) == ("cuda", "nccl", "cuda:0") and b.on_gpu
    assert b.env == {"DS_ACCELERATOR": "cuda", "LOCAL_RANK": "0"}
    bf16 = dtype == "bfloat16"  # float16 trains in fp32: no loss scaling, no skipped steps
    assert b.dtype == ("bfloat16" if bf16 else "float32")
    assert b.ds_config["bf16"] == {"enabled": bf16} and b.ds_config["fp16"] == {"enabled": False}
    assert b.gradient_checkpointing is checkpointing
    host = {"device": "cpu", "pin_memory": True}
    assert b.zero.get("offload_optimizer") == (None if offload == "none" else host)
    assert b.zero.get("offload_param") == (host if offload == "optimizer_and_params" else None)
    # a client AdamW (per-module learning rates) on offloaded state must be allowed explicitly
    assert b.ds_config.get("zero_force_ds_cpu_optimizer", True) is (offload == "none")


@pytest.mark.parametrize("gpu_id, visible, index", [("3", "3", 0), ("5", "0,1,5", 2), ("5", " 4, 5 ", 1),
                                                    ("2", None, 2), (2, "", 2), (7, "7", 0)])
def test_gpu_index_follows_cuda_visible_devices_as_ray_sets_it(gpu_id, visible, index):
    assert gpu_index(gpu_id, visible) == index
    assert choose_backend([gpu_id], visible, "bfloat16").device == f"cuda:{index}"


def test_bad_gpu_assignments_and_offload_names_are_refused():
    with pytest.raises(ValueError, match="not in CUDA_VISIBLE_DEVICES"):
        gpu_index("2", "0,1")
    with pytest.raises(ValueError, match="drives one GPU, Ray gave it 2"):
        choose_backend(["0", "1"], "0,1", "bfloat16")
    with pytest.raises(ValueError, match="zero_offload"):
        choose_backend([], None, "float32", zero_offload="params")


def test_backends_do_not_share_their_dicts():
    a, b = choose_backend(["0"], "0", "bfloat16", zero_offload="optimizer_and_params"), \
        choose_backend(["0"], "0", "bfloat16", zero_offload="optimizer_and_params")
    a.zero["offload_param"]["device"] = "nvme"
    assert b.zero["offload_param"]["device"] == "cpu"


def test_bf16_weights_cross_the_object_store_bit_exact_and_read_only():
    """A bf16 engine's export: packed once, serialised out of band as Ray does, read back zero-copy."""
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(64, 48, generator=gen) * 1e3).to(torch.bfloat16)
    weight[0, :4] = torch.tensor([float("inf"), -0.0, 1e-40, -3.0e38])  # inf, signed zero, subnormal, near max
    state = {"lm.weight": weight, "lm.t": weight.t(), "head.scale": torch.tensor(1.5, dtype=torch.bfloat16),
             "lm.bias": torch.zeros(0, dtype=torch.bfloat16), "fp32": torch.randn(5, generator=gen)}
    buffers = []
    data = pickle.dumps(pack_state(state), protocol=5, buffer_callback=buffers.append)
    stored = [memoryview(b.raw().tobytes()).toreadonly() for b in buffers]  # the store's read-only pages
    back = unpack_state(pickle.loads(data, buffers=stored))
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        got = back[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        if tensor.dtype == torch.bfloat16:  # bit for bit, not just numerically close
            assert torch.equal(got.view(torch.int16), tensor.contiguous().view(torch.int16)), name
        assert torch.equal(got, tensor), name
    target = torch.empty(64, 48, dtype=torch.bfloat16)
    target.copy_(back["lm.weight"])  # what a receiver does with the read-only view
    assert torch.equal(target, weight)
