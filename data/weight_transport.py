"""Weights through the Ray object store as raw numpy bytes: stored once, read without a copy.

Ray pickles a torch tensor through `torch.save`, a copy on `ray.put` and another on every
read (measured here: 1.5 s put + 0.44 s get for 200 MB), while numpy arrays go out of band
and are mapped back zero-copy (0.19 s put, < 1 ms get). numpy has no bfloat16, so each
tensor travels as its bytes (uint8) with its dtype and shape. The sender does
`ray.put(pack_state(state))` once per sync and hands the ref to every receiver.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PackedState:
    """name -> (raw bytes, dtype name, shape); what `pack_state` builds."""

    tensors: dict[str, tuple[np.ndarray, str, tuple[int, ...]]]

    @property
    def nbytes(self) -> int:
        return sum(raw.nbytes for raw, _, _ in self.tensors.values())


def pack_state(state: dict[str, torch.Tensor]) -> PackedState:
    """Views of the tensors' bytes (no copy for contiguous CPU tensors; `ray.put` copies once)."""
    packed = {}
    for name, tensor in state.items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        packed[name] = (flat.view(torch.uint8).numpy(), str(flat.dtype).removeprefix("torch."), tuple(tensor.shape))
    return PackedState(packed)


def unpack_state(packed: PackedState) -> dict[str, torch.Tensor]:
    """Read-only tensor views of the stored bytes (zero-copy out of the object store)."""
    out = {}
    with warnings.catch_warnings():  # the store's buffers are read-only; receivers only copy from them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, (raw, dtype, shape) in packed.tensors.items():
            out[name] = torch.from_numpy(raw).view(getattr(torch, dtype)).reshape(shape)
    return out
