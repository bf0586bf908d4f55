"""Policy + segmentation head (SegCompass or READ) as one model, and its checkpoint folder.

A checkpoint folder has the layout of make-tiny's folder, so it can be named
as `model.name_or_path` again (and served by vLLM as is):

    config.json, model.safetensors, tokenizer*   the LM (HF format)
    projector/                                   trainable projector
    vision/, sam/                                frozen encoders, copied unchanged (feature-cache identity)
    head/model.safetensors, head/config.json     trainable head weights (no SAE); config.json names the kind
    manifest.json                                written last: every other file with its size and SHA-256

Loading checks the folder first (``verify_model_folder``): a file missing, damaged, or
added later (other than `segrl eval`'s ``eval-*.json``) is an error naming it, so a lost
head or tokenizer never becomes a fresh one and flipped weights never load. Every file
is hashed on every load (about what reading it costs; the loader then reads it from the
page cache): the folder is small enough for a tiny model, and for a 7B one the few
seconds of hashing run on each actor in parallel, while the load itself takes longer.
A make-tiny folder has no manifest and no head (the head starts fresh); without a
manifest only the presence of the files a loader needs is checked.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from data.atomic import atomic_folder
from data.integrity import IntegrityError, describe, files_under, verify
from models.policy import Policy, PolicyOutput
from models.projector import save_projector
from models.seghead import SegHeadOutput

DEFAULT_KIND = "segcompass"
"""Head kind of a head/config.json without a "kind" key: checkpoints written before READ was a head."""
MANIFEST = "manifest.json"
EVAL_FILE = "eval-{split}.json"
WRITTEN_LATER = (EVAL_FILE.format(split="*"),)
"""Files that may join a checkpoint folder after it was written: `segrl eval` saves its metrics there."""
NEEDED = (("config.json",), ("model.safetensors", "model.safetensors.index.json"), ("tokenizer.json",),
          ("tokenizer_config.json",), ("projector/config.json",), ("projector/model.safetensors",))
"""What a segrl folder without a manifest must hold (one of each group) for the loaders not to
fall back on something else (a missing tokenizer.json gives a wrong tokenizer, not an error)."""


class NonFiniteError(IntegrityError):
    """NaN or inf where a model's numbers must be finite; the message names the sample."""


@dataclass(frozen=True)
class HeadSpec:
    num_slots: int = 1
    codebook_dim: int = 128
    act_threshold: float = 0.0
    top_k: int = 8


class Segmenter(nn.Module):
    """One forward: policy logprobs + hidden states, then masks for every response with a reference token.

    The head names the per-sample PolicyOutput fields it reads (`policy_inputs`),
    called once per batch as head.decode_batch(*field lists, sam_embeddings, sam_input_sizes=...) over the
    responses with a reference token: SegCompass the layer-k reference states, READ
    the image-token states, both from the same forward.
    """

    def __init__(self, policy: Policy, head: nn.Module):
        super().__init__()
        self.policy, self.head = policy, head

    def param_modules(self) -> dict[str, nn.Module]:
        """Trainable modules by learning-rate role (see models.optim.param_groups)."""
        return {"lm": self.policy.lm, "projector": self.policy.projector, **self.head.param_modules()}

    def forward(self, prompt_ids: list[list[int]], vision: list[torch.Tensor], response_ids: list[list[int]],
                sam_embeddings: list[torch.Tensor], sam_input_sizes: list[tuple[int, int]] | None = None,
                ) -> tuple[PolicyOutput, list[SegHeadOutput | None]]:
        """``sam_input_sizes``: each image's extent in SAM's frame (the feature cache's
        ``sam_input_size``); None takes every image to fill the square frame."""
        out = self.policy(prompt_ids, vision, response_ids)
        rows = [i for i, ref in enumerate(out.ref_hidden) if ref.shape[0]]
        fields = [[getattr(out, name)[i] for i in rows] for name in self.head.policy_inputs]
        sizes = [tuple(sam_input_sizes[i]) for i in rows] if sam_input_sizes is not None else None
        decoded = (self.head.decode_batch(*fields, [sam_embeddings[i] for i in rows], sam_input_sizes=sizes)
                   if rows else [])
        masks: list[SegHeadOutput | None] = [None] * len(out.ref_hidden)
        for i, head_out in zip(rows, decoded):
            masks[i] = head_out
        return out, masks


def slot_probabilities(head_out: SegHeadOutput | None, num_slots: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask probabilities [K, side, side], confidences [K]) as the rewards score them.

    No reference token: all-zero masks with zero confidence ("no such object", READ).
    With one slot, emitting the token commits to its mask (confidence 1); with K > 1
    the confidences are the head's.
    """
    if head_out is None:
        return np.zeros((num_slots, side, side), np.float32), np.zeros(num_slots, np.float32)
    probs = torch.sigmoid(head_out.mask_logits.detach()).float().numpy()
    conf = (np.ones(1, np.float32) if num_slots == 1
            else torch.sigmoid(head_out.conf_logits.detach()).float().numpy())
    return probs, conf


def eval_file(checkpoint: str | Path, split: str) -> Path:
    """Where an evaluation of ``checkpoint`` on ``split`` is saved beside it (``WRITTEN_LATER``)."""
    return Path(checkpoint) / EVAL_FILE.format(split=split)


def head_state(head: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable head weights; the frozen SAE is saved (and versioned) on its own."""
    return {k: v.contiguous() for k, v in head.state_dict().items() if not k.startswith("sae.")}


def save_segmenter(model: Segmenter, spec: HeadSpec, tokenizer, source: str | Path, out_dir: str | Path) -> Path:
    """Write a checkpoint folder; frozen encoders are copied from `source` (the folder loaded from)."""
    out, source = Path(out_dir), Path(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:
        model.policy.lm.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_projector(model.policy.projector, tmp / "projector")
        for frozen in ("vision", "sam"):
            if (source / frozen).exists():
                shutil.copytree(source / frozen, tmp / frozen)
        (tmp / "head").mkdir()
        save_file(head_state(model.head), tmp / "head" / "model.safetensors")
        (tmp / "head" / "config.json").write_text(json.dumps({"kind": model.head.kind, **asdict(spec)}, indent=2))
        write_manifest(tmp)
    return out


def write_manifest(folder: Path) -> None:
    """List every file of a model folder being written, last (``verify_model_folder`` checks against it)."""
    (folder / MANIFEST).write_text(json.dumps({"format": 1, "files": describe(folder, files_under(folder))}, indent=1))


def verify_model_folder(folder: str | Path) -> None:
    """Raise IntegrityError naming the first file of a segrl model folder that is missing, damaged or
    unlisted (see the module doc); a folder that is not a segrl one (an upstream checkpoint) passes."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            listed = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{manifest}: unreadable ({type(exc).__name__}: {exc})") from None
        present = [n for n in files_under(folder)
                   if n != MANIFEST and not any(fnmatch(n, pattern) for pattern in WRITTEN_LATER)]
        verify(folder, listed, present, manifest)
    elif (folder / "projector" / "config.json").is_file():
        for group in NEEDED:
            if not any((folder / name).is_file() for name in group):
                raise IntegrityError(f"{folder / group[0]}: missing (a segrl model folder needs it)")
        head = [(folder / "head" / name).is_file() for name in ("config.json", "model.safetensors")]
        if head[0] != head[1]:
            raise IntegrityError(f"{folder / 'head'}: holds only {'config.json' if head[0] else 'model.safetensors'} "
                                 "(a checkpoint's head has both; a make-tiny folder has neither)")


def require_finite(out: PolicyOutput, heads: list[SegHeadOutput | None], samples: list[str]) -> None:
    """Raise NonFiniteError naming the first of ``samples`` whose response log-probabilities or mask
    logits are NaN or inf (damaged weights or features would otherwise score as a plain miss)."""
    rows = torch.isfinite(out.logprobs.masked_fill(~out.response_mask, 0)).all(dim=1).tolist()
    for sample, row_ok, head in zip(samples, rows, heads):
        if not row_ok or (head is not None and not torch.isfinite(head.mask_logits).all()):
            raise NonFiniteError(f"sample {sample}: the model's logits are not finite (NaN or inf); its weights "
                                 "or this sample's cached features are damaged")


def saved_head_kind(folder: str | Path) -> str:
    """The head kind recorded in a checkpoint's head/config.json."""
    config = Path(folder) / "head" / "config.json"
    return json.loads(config.read_text()).get("kind", DEFAULT_KIND) if config.is_file() else DEFAULT_KIND


def load_head_weights(head: nn.Module, folder: str | Path) -> bool:
    """Load trained head weights if the folder has them (a make-tiny folder has none).

    A checkpoint of another head kind is an error, not a silent fresh start.
    """
    path = Path(folder) / "head" / "model.safetensors"
    if not path.is_file():
        return False
    saved = saved_head_kind(folder)
    if saved != head.kind:
        raise ValueError(f"{path.parent}: holds a '{saved}' head, but model.head.kind is '{head.kind}'; "
                         f"set model.head.kind={saved} or start from a folder without head weights")
    try:
        missing, unexpected = head.load_state_dict(load_file(path), strict=False)
    except RuntimeError as exc:  # torch names every size mismatch; the first says enough
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise ValueError(f"{path}: head weights of other shapes than this config's head ({first}); it was "
                         "saved by an older segrl or under another config (model.head, model.num_slots)") from None
    missing = [k for k in missing if not k.startswith("sae.")]
    if missing or unexpected:
        raise ValueError(f"{path}: head weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return True
