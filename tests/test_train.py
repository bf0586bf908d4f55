"""End to end on the tiny workspace: all four actor kinds, the scheduler, checkpoints, eval, and the model
published as the run goes (`serve --follow` takes each one).

The driver must only ever fetch small metadata; the staleness bound must hold on every step.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import ray
import torch
from tests_support import tiny_grpo_config

from data.weight_transport import PackedState
from models.segmenter import verify_model_folder
from pipelines.grpo.metrics_log import read_metrics
from pipelines.grpo.publish import Publisher, publishes
from pipelines.serve.follow import Follower
from pipelines.train import train


@pytest.fixture(scope="module")
def run(tiny_workspace, tiny_sae, ray_cluster, tmp_path_factory, request):
    out = tmp_path_factory.mktemp("grpo")
    config = tiny_grpo_config(tiny_workspace, out, steps=3, checkpoint_every=2)
    config.train.publish_every = 1

    fetched = []
    real_get = ray.get

    def spy(refs, *args, **kwargs):
        value = real_get(refs, *args, **kwargs)
        fetched.extend(value if isinstance(value, list) else [value])
        return value

    follower, published, real_publish = Follower(out, print), [], Publisher.__call__

    def publish_then_poll(self, step):
        """What `serve --follow` finds right after each mid-run publish (it polls on its own otherwise)."""
        real_publish(self, step)
        if publishes(step, self.every, self.total):
            published.append((step, follower.poll()))

    ray.get = spy
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Publisher, "__call__", publish_then_poll)
            summary = train(config)
    finally:
        ray.get = real_get
    yield config, out, summary, fetched, (follower, published)
    follower.close()


def test_steps_are_logged_with_rewards_and_staleness(run):
    config, out, summary, *_ = run
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert 0.0 <= r["reward/total"] <= 1.0 and 0.0 <= r["reward/mask"] <= 1.0
        assert all(int(k) <= config.train.staleness
                   for k in (key.split("/")[1] for key in r if key.startswith("staleness/")))
        assert r["loss/kl"] >= 0 and r["grad_norm"] >= 0
        assert 0 <= r["rollout/interrupted_updates"] <= config.cluster.rollout_actors
    # The tiny policy before SFT never writes the format: every reward is 0 and step 1, still at the
    # reference's weights, has no gradient; the KL term gives the later steps one.
    assert rows[-1]["grad_norm"] > 0 and rows[-1]["loss/kl"] > 0
    assert len(summary["rewards"]) == 3
    assert summary["admission"]["trained"] == 3 * config.grpo.prompts_per_step


def test_model_checkpoint_and_eval(run):
    config, out, summary, *_ = run
    model = Path(summary["model"])
    assert (model / "model.safetensors").is_file() and (model / "head" / "model.safetensors").is_file()
    state = json.loads((out / "checkpoints" / "step2.state.json").read_text())
    assert state["step"] == 2 and state["prompts"]["epoch"] == 0
    assert (out / "checkpoints" / "step2.manifest.json").is_file() and (out / "ledger.json").is_file()
    listed = json.loads((out / "checkpoints" / "step2.manifest.json").read_text())["files"]
    assert sum(n.startswith("step2/") for n in listed) == 4 and all(len(e["sha256"]) == 64 for e in listed.values())
    assert json.loads((out / "run.json").read_text()) == {"kind": "segrl-grpo-run"}
    assert (model / "manifest.json").is_file()
    verify_model_folder(model)  # the final model with its eval-*.json beside the files its manifest lists
    assert summary["ledger"]["trained_samples"] == 3 * config.grpo.prompts_per_step
    assert summary["eval"]["count"] == 4 and 0.0 <= summary["eval"]["giou"] <= 1.0
    from safetensors.torch import load_file

    start = load_file(Path(config.train.init_from) / "model.safetensors")
    trained = load_file(model / "model.safetensors")
    assert any(not torch.equal(start[k], trained[k]) for k in start)


def test_driver_never_fetches_bulk_data(run):
    _, _, _, fetched, _ = run
    bulky = [type(v).__name__ for v in fetched if isinstance(v, (pa.RecordBatch, pa.Table, torch.Tensor, PackedState))
             or (isinstance(v, dict) and any(isinstance(x, torch.Tensor) for x in v.values()))]
    assert fetched and not bulky


def test_the_running_run_publishes_its_model_and_a_follower_serves_each(run):
    """publish_every 1 of 3 steps: RUN/model after steps 1 and 2 (the end-of-run save writes step 3), each
    a verified model folder, each a new weights version for `serve --follow`; the final one is the third."""
    _, out, summary, _, (follower, published) = run
    assert [(step, found[1]) for step, found in published] == [(1, 1), (2, 2)]
    (_, (first, _)), (_, (second, _)) = published
    for folder in (first, second):
        verify_model_folder(folder)  # still whole, though RUN/model was replaced after it
    manifests = [json.loads((Path(f) / "manifest.json").read_text())["files"] for f in (first, second)]
    assert manifests[0]["model.safetensors"] != manifests[1]["model.safetensors"]  # step 2 changed the LM
    final, version = follower.poll()
    assert version == 3 and Path(summary["model"]) == out / "model"
    assert json.loads((Path(final) / "manifest.json").read_text())["files"] == \
        json.loads((out / "model" / "manifest.json").read_text())["files"]
