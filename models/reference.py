"""The reference role's core (SegCompass A.1), Ray-free: the reference actor is a shell over it.

For a rollout batch: the frozen reference policy's forward over prompt +
response gives reference logprobs and the hidden states at `<SEG>`; the
segmentation modules *at the trajectory's weights version* decode K masks and
confidences from them. The output is the rollout batch plus `ref_logprobs` and
the scored columns the reward workers read (`data.trajectory`).

Masks of a response without the reference token are all zero with zero
confidence: "no such object" (READ). With one slot, a response that does emit
the token commits to its mask (confidence 1); with K > 1 the slot confidences
come from the head.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from data.features import FeatureStore, sam_input_size_of
from data.mask_frames import lowres_side
from data.reference_rows import mask_list_array
from data.trajectory import REF_LOGPROBS_FIELD, REFERENCE_FIELDS
from data.weight_transport import PackedState, unpack_state
from models.segmenter import Segmenter, head_state, slot_probabilities

HEAD_PREFIX = "head."


class ReferenceCore:
    """Frozen reference policy + versioned segmentation modules."""

    def __init__(self, model: Segmenter, store: FeatureStore, num_slots: int, keep_versions: int = 4,
                 micro_batch: int = 8):
        self.model = model.eval().requires_grad_(False)
        self.store, self.num_slots = store, num_slots
        self.keep_versions, self.micro_batch = keep_versions, micro_batch
        self.heads: dict[int, dict[str, torch.Tensor]] = {0: head_state(model.head)}
        self.loaded_version = 0

    def update_weights(self, state: dict[str, torch.Tensor] | PackedState, version: int) -> None:
        """Keep the head weights of `version`; the reference policy itself never changes.

        They are copied out: a packed state's tensors view the object store's buffer of
        the whole model, which must not stay pinned for as long as a version is kept.
        """
        state = unpack_state(state) if isinstance(state, PackedState) else state
        self.heads[version] = {k[len(HEAD_PREFIX):]: v.clone() for k, v in state.items() if k.startswith(HEAD_PREFIX)}
        for old in [v for v in self.heads if v <= version - self.keep_versions]:
            del self.heads[old]

    def _use_head(self, version: int) -> None:
        if version not in self.heads:
            raise KeyError(f"no segmentation weights for version {version}; kept: {sorted(self.heads)}")
        if version != self.loaded_version:
            self.model.head.load_state_dict(self.heads[version], strict=False)
            self.loaded_version = version

    @torch.no_grad()
    def forward(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        n = batch.num_rows
        prompts = batch.column("prompt_ids").to_pylist()
        responses = batch.column("response_ids").to_pylist()
        hashes = batch.column("image_hash").to_pylist()
        versions = batch.column("weights_version").to_numpy()
        feats = {h: self.store.get(h) for h in set(hashes)}
        ref_lp: list = [None] * n
        masks: list = [None] * n
        confs: list = [None] * n
        for version in sorted(set(versions.tolist())):
            self._use_head(version)
            rows = np.flatnonzero(versions == version).tolist()
            for start in range(0, len(rows), self.micro_batch):
                idx = rows[start:start + self.micro_batch]
                images = [feats[hashes[i]] for i in idx]
                out, heads = self.model([prompts[i] for i in idx], [f["vision"] for f in images],
                                        [responses[i] for i in idx], [f["sam"] for f in images],
                                        [sam_input_size_of(f) for f in images])
                for j, i in enumerate(idx):
                    ref_lp[i] = out.logprobs[j, : len(responses[i])].numpy()
                    side = lowres_side(feats[hashes[i]]["sam"])
                    masks[i], confs[i] = slot_probabilities(heads[j], self.num_slots, side)
        return self._append(batch, ref_lp, masks, confs)

    @staticmethod
    def _append(batch, ref_lp, masks, confs) -> pa.RecordBatch:
        mask_array, shapes = mask_list_array(masks)
        extra = {
            REF_LOGPROBS_FIELD.name: pa.array(ref_lp, REF_LOGPROBS_FIELD.type),
            "num_slots": pa.array([s[0] for s in shapes], pa.int32()),
            "mask_height": pa.array([s[1] for s in shapes], pa.int32()),
            "mask_width": pa.array([s[2] for s in shapes], pa.int32()),
            "mask_probs": mask_array,
            "confidences": pa.array(confs, pa.list_(pa.float32())),
        }
        scored_names = {f.name for f in REFERENCE_FIELDS}
        missing = [name for name in scored_names if name not in extra and name not in batch.schema.names]
        if missing:
            raise ValueError(f"rollout batch lacks columns the reward workers need: {missing}")
        columns = [batch.column(n) for n in batch.schema.names if n not in extra]
        names = [n for n in batch.schema.names if n not in extra]
        return pa.RecordBatch.from_arrays(columns + list(extra.values()), names=names + list(extra))
