"""Reference scorer: logprobs and masks equal the models' own on the same inputs, per weights version."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch

from config.builders import build_segmenter, feature_store
from data.mask_frames import lowres_side
from data.synthetic import sft_target
from data.trajectory import ROLLOUT_SCHEMA
from models.reference import ReferenceCore
from models.segmenter import head_state
from pipelines.grpo.prompts import prompt_rows


@pytest.fixture(scope="module")
def setup(tiny_workspace, tiny_sae):
    config = tiny_workspace["config"]
    model, tok, img_size = build_segmenter(config)
    root = Path(config.resolve_path(config.data.root))
    rows = prompt_rows(root / "val.parquet", tok, feature_store(config), img_size, "<SEG>", 1, limit=3)
    from data.schema import read_samples

    samples = {s.sample_id: s for s in read_samples(root / "val.parquet")}
    out = []
    for g, row in enumerate(rows):
        target = tok(sft_target(samples[row["sample_id"]]), add_special_tokens=False)["input_ids"]
        for r, resp in enumerate([target, target[:5]]):  # a full answer and a cut one (no <SEG>)
            out.append({**row, "group_id": g, "response_index": r, "group_size": 2, "response_ids": resp,
                        "rollout_logprobs": [0.0] * len(resp), "weights_version": r, "text": tok.decode(resp)})
    return config, model, pa.RecordBatch.from_pylist(out, schema=ROLLOUT_SCHEMA)


def test_scored_columns_equal_direct_model_outputs(setup):
    config, model, batch = setup
    core = ReferenceCore(model, feature_store(config), num_slots=1)
    core.update_weights({f"head.{k}": v for k, v in head_state(model.head).items()}, version=1)
    scored = core.forward(batch)
    store = feature_store(config)
    for i, row in enumerate(batch.to_pylist()):
        f = store.get(row["image_hash"])
        with torch.no_grad():
            out, heads = model([row["prompt_ids"]], [f["vision"]], [row["response_ids"]], [f["sam"]])
        got_lp = np.asarray(scored.column("ref_logprobs")[i].as_py())
        np.testing.assert_allclose(got_lp, out.logprobs[0, : len(row["response_ids"])].numpy(), atol=1e-5)
        side = lowres_side(f["sam"])  # 4x the SAM embedding grid: 64 for configs/tiny.yaml's 16x16
        assert (scored.column("mask_height")[i].as_py(), scored.column("mask_width")[i].as_py()) == (side, side)
        probs = np.asarray(scored.column("mask_probs")[i].as_py()).reshape(1, side, side)
        if heads[0] is None:
            assert not probs.any() and scored.column("confidences")[i].as_py() == [0.0]
        else:
            np.testing.assert_allclose(probs, torch.sigmoid(heads[0].mask_logits).numpy(), atol=1e-6)
            assert scored.column("confidences")[i].as_py() == [1.0]
    sam = config.model.tiny.sam
    assert scored.column("mask_height").to_pylist() == [4 * (sam.image_size // sam.patch_size)] * batch.num_rows


def test_each_row_uses_its_own_version(setup):
    config, model, batch = setup
    original = {f"head.{k}": v.clone() for k, v in head_state(model.head).items()}
    baseline = ReferenceCore(model, feature_store(config), num_slots=1)
    baseline.update_weights(original, version=1)
    plain = baseline.forward(batch)
    core = ReferenceCore(model, feature_store(config), num_slots=1)  # shares the model: v0 = original
    core.update_weights({k: v + 0.05 * torch.randn_like(v) for k, v in original.items()}, version=1)
    versions = batch.column("weights_version").to_pylist()
    scored = core.forward(batch)
    core._use_head(0)  # leave the shared model as it was
    for i, v in enumerate(versions):
        a, b = scored.column("mask_probs")[i].as_py(), plain.column("mask_probs")[i].as_py()
        if v == 0 or not any(a):
            assert a == b
        else:
            assert a != b
    with pytest.raises(KeyError, match="no segmentation weights for version 7"):
        core._use_head(7)


def test_actor_scores_by_ref(setup, ray_cluster):
    from actors.reference import Reference

    config, model, batch = setup
    scorer = Reference.remote(config)
    state = ray.put({f"head.{k}": v for k, v in head_state(model.head).items()})
    assert ray.get(scorer.update_weights.remote(state, 1)) == {"version": 1}
    scored = ray.get(scorer.forward.remote(ray.put(batch)))
    assert scored.num_rows == batch.num_rows and "ref_logprobs" in scored.schema.names
    assert ray.get(scorer.versions.remote()) == [0, 1]
    ray.kill(scorer)
