"""Prompt batches for the rollout pool, built once per split from the canonical dataset.

A prompt row is small metadata: token ids, the image's feature-store key and
the GT masks as RLE in SAM's low-res frame (merged into one mask when the
model has a single slot, as the SFT targets are). The driver `ray.put`s the
batches and from then on holds only their refs.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from data.features import FeatureStore, content_hash
from data.mask_frames import lowres_gt, slot_targets
from data.schema import encode_mask, read_samples, resolve_image
from data.trajectory import make_prompt_batch
from models.prompt import prompt_ids


def prompt_rows(split_file: str | Path, tokenizer, store: FeatureStore, sam_img_size: int, ref_token: str,
                num_slots: int, limit: int | None = None) -> list[dict]:
    """One PROMPT_SCHEMA row per sample of the split."""
    split_file = Path(split_file)
    rows = []
    for sample in read_samples(split_file)[:limit]:
        digest = content_hash(resolve_image(split_file, sample.image_path))
        low = slot_targets(lowres_gt(sample.gt_stack, store.get(digest), sam_img_size), num_slots).numpy() > 0
        rows.append({
            "sample_id": sample.sample_id,
            "image_hash": digest,
            "prompt_ids": prompt_ids(tokenizer, sample.question, ref_token),
            "gt_masks": [encode_mask(m) for m in low],
            "no_target": sample.no_target,
        })
    return rows


class PromptStream:
    """Endless shuffled epochs over prompt rows; ``take(group_ids)`` -> (prompt RecordBatch, sample keys).

    A sample key ``e<epoch>:<row>`` names one visit of one row, which the trajectory
    ledger follows. Keys handed back with ``requeue`` (their work was lost) come out
    again first. The cursor (epoch, position, requeued keys) is small state, so a run
    can resume where it stopped.
    """

    def __init__(self, rows: list[dict], seed: int):
        if not rows:
            raise ValueError("no prompt rows: the training split is empty")
        self.rows, self.seed = rows, seed
        self.epoch, self.position = 0, 0
        self.requeued: list[str] = []
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 100003 + epoch).shuffle(order)
        return order

    def take(self, group_ids: Sequence[int]) -> tuple[pa.RecordBatch, list[str]]:
        """One prompt row per admitted group, carrying its ``group_id``; and their sample keys."""
        n = len(group_ids)
        keys = self.requeued[:n]
        self.requeued = self.requeued[n:]
        while len(keys) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            keys.append(f"e{self.epoch}:{self._order[self.position]}")
            self.position += 1
        rows = [{**self.rows[int(key.split(":")[1])], "group_id": group_id} for key, group_id in zip(keys, group_ids)]
        return make_prompt_batch(rows), keys

    def requeue(self, keys: list[str]) -> None:
        """Give ``keys`` out again before any new sample (in this order)."""
        self.requeued = list(keys) + self.requeued

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "requeued": list(self.requeued)}

    def restore(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self.requeued = list(state.get("requeued", []))
        self._order = self._shuffled(self.epoch)
