"""Rollout worker on a local Ray cluster: one engine for the module (its start costs 5-60 s)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import ray
import torch

from actors.rollout import ACTOR_OPTIONS
from config.builders import feature_store, rollout_settings
from data.features import content_hash
from data.schema import read_samples, resolve_image
from data.trajectory import ROLLOUT_SCHEMA, make_prompt_batch
from data.weight_transport import pack_state, unpack_state
from models.generate import generate
from models.policy import load_policy
from models.prompt import prompt_ids

pytestmark = pytest.mark.timeout(600)
MAX_TOKENS = 20


def _policy(config):
    m = config.model
    policy, tokenizer = load_policy(m.family, config.resolve_path(m.name_or_path), m.ref_token, m.sae.layer)
    return policy.eval(), tokenizer


@pytest.fixture(scope="module")
def pool(tiny_workspace, tiny_features, ray_cluster):
    from actors.rollout_pool import RolloutPool

    pool = RolloutPool(tiny_workspace["config"], 1, num_cpus=0.5)
    pool.ready()
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def worker(pool):
    return pool.workers[0]


@pytest.fixture(scope="module")
def prompts(tiny_workspace):
    """Three val prompts as a prompt batch, groups 10-12 (no GT masks needed here)."""
    config = tiny_workspace["config"]
    split = Path(config.resolve_path(config.data.root)) / "val.parquet"
    _, tokenizer = _policy(config)
    rows = [{"sample_id": s.sample_id, "image_hash": content_hash(resolve_image(split, s.image_path)),
             "prompt_ids": prompt_ids(tokenizer, s.question, config.model.ref_token), "gt_masks": [],
             "no_target": s.no_target, "group_id": 10 + i} for i, s in enumerate(read_samples(split)[:3])]
    return make_prompt_batch(rows)


def _vision(config, batch):
    store = feature_store(config)
    return [store.get(h)["vision"] for h in batch.column("image_hash").to_pylist()]


def test_rollout_logprobs_equal_learner_recomputation(tiny_workspace, pool, prompts):
    config = tiny_workspace["config"]
    ref, _ = pool.dispatch(ray.put(prompts), group_size=2, max_tokens=MAX_TOKENS)
    assert isinstance(ref, ray.ObjectRef)
    out = ray.get(ref)
    policy, _ = _policy(config)
    prompt_ids_, responses = out.column("prompt_ids").to_pylist(), out.column("response_ids").to_pylist()
    vision = _vision(config, out)
    with torch.no_grad():
        learner = policy(prompt_ids_, vision, responses)
    assert sum(map(len, responses)) > len(responses)
    for i, lp in enumerate(out.column("rollout_logprobs").to_pylist()):
        assert len(lp) == len(responses[i])
        got, want = torch.tensor(lp), learner.logprobs[i, : len(lp)]
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_schema_groups_version_and_eos(tiny_workspace, worker, prompts):
    config = tiny_workspace["config"]
    g = config.rollout.group_size
    out = ray.get(worker.generate.remote(prompts, max_tokens=MAX_TOKENS))
    assert out.schema.equals(ROLLOUT_SCHEMA)
    assert out.num_rows == prompts.num_rows * g
    rows = out.to_pylist()
    groups: dict[int, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group_id"], []).append(row)
    assert len(groups) == prompts.num_rows
    for prompt, (group_id, members) in zip(prompts.to_pylist(), groups.items()):
        assert [r["response_index"] for r in members] == list(range(g))
        assert all(r["group_size"] == g and r["sample_id"] == prompt["sample_id"] for r in members)
        assert group_id == prompt["group_id"]  # the prompt row's group id, on every response
    _, tokenizer = _policy(config)
    for row in rows:
        ids = row["response_ids"]
        assert row["weights_version"] == 0 and 1 <= len(ids) <= MAX_TOKENS
        if len(ids) < MAX_TOKENS:  # stopped early: on EOS, which is kept
            assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.eos_token_id not in ids[:-1]
        assert row["text"] == tokenizer.decode(ids, skip_special_tokens=True)
    assert ray.get(worker.version.remote()) == 0
    table = pa.Table.from_batches([prompts.slice(0, 1), prompts.slice(1, 1)])  # a Table is accepted too
    assert ray.get(worker.generate.remote(table, group_size=3, max_tokens=4)).num_rows == 6
    fixed = ray.get(worker.generate.remote(prompts, group_size=2, max_tokens=[2, 5, 3], ignore_eos=True))
    assert [len(ids) for ids in fixed.column("response_ids").to_pylist()] == [2, 2, 5, 5, 3, 3]


def _perturbed_state(policy, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {f"lm.{k}": v for k, v in policy.lm.state_dict().items()}
    state |= {f"projector.{k}": v for k, v in policy.projector.state_dict().items()}
    return {k: v * 1.5 + 0.05 * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def _load(policy, state):
    policy.lm.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("lm.")})
    policy.projector.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("projector.")})


def test_weight_push_gives_transformers_greedy_tokens(tiny_workspace, pool, worker, prompts):
    config = tiny_workspace["config"]
    policy, tokenizer = _policy(config)
    original = {f"lm.{k}": v.clone() for k, v in policy.lm.state_dict().items()}
    original |= {f"projector.{k}": v.clone() for k, v in policy.projector.state_dict().items()}

    def greedy():
        out = ray.get(pool.dispatch(ray.put(prompts), group_size=1, greedy=True, max_tokens=MAX_TOKENS)[0])
        return [ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids
                for ids in out.column("response_ids").to_pylist()], out

    before, _ = greedy()
    new = _perturbed_state(policy, seed=7)
    try:
        timings = ray.get([ack for ack, _ in pool.broadcast_named(ray.put(pack_state(new)), 7)])
        assert timings[0]["engine_s"] > 0
        after, out = greedy()
        assert set(out.column("weights_version").to_pylist()) == {7}
        assert ray.get(worker.version.remote()) == 7
    finally:
        # a plain dict works too (versions only grow)
        ray.get([ack for ack, _ in pool.broadcast_named(ray.put(original), 8)])
    _load(policy, new)
    with torch.no_grad():
        embeds = [policy.prompt_embeds(ids, v) for ids, v in
                  zip(prompts.column("prompt_ids").to_pylist(), _vision(config, prompts))]
    expected = [generate(policy, tokenizer, [e], MAX_TOKENS)[0] for e in embeds]
    assert after == expected
    assert after != before
    restored, _ = greedy()
    assert restored == before


def test_packed_state_round_trips_every_dtype_zero_copy():
    state = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.tensor(7),
             "d": torch.arange(6).reshape(2, 3).t()}  # non-contiguous
    back = unpack_state(ray.cloudpickle.loads(ray.cloudpickle.dumps(pack_state(state))))
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in state.items())
    packed = pack_state({"a": state["a"]})
    assert unpack_state(packed)["a"].data_ptr() == state["a"].data_ptr()


def test_engine_gets_the_config_vllm_settings_only_when_set(tiny_workspace, monkeypatch):
    """What reaches ``vllm.LLM`` (a stand-in here: a GPU engine cannot start on this machine)."""
    import vllm

    from models.rollout import ENGINE_KEYS, RolloutCore

    calls = []
    monkeypatch.setattr(vllm, "LLM", lambda model, **args: calls.append(args))
    config = tiny_workspace["config"].model_copy(deep=True)
    RolloutCore(rollout_settings(config), feature_store(config))
    assert not set(ENGINE_KEYS) & set(calls[-1])  # unset: vLLM's own defaults
    for key, value in (("max_num_seqs", 64), ("max_num_batched_tokens", 17408), ("gpu_memory_utilization", 0.85),
                       ("enable_chunked_prefill", False)):
        setattr(config.rollout, key, value)
    RolloutCore(rollout_settings(config), feature_store(config),
                {"tensor_parallel_size": 4, "distributed_executor_backend": "ray"})  # as the placement passes them
    assert {k: calls[-1][k] for k in ENGINE_KEYS} == {"max_num_seqs": 64, "max_num_batched_tokens": 17408,
                                                      "gpu_memory_utilization": 0.85, "enable_chunked_prefill": False}
    assert (calls[-1]["tensor_parallel_size"], calls[-1]["distributed_executor_backend"]) == (4, "ray")
    assert calls[-1]["enable_prompt_embeds"] and calls[-1]["dtype"] == config.model.dtype
    vllm.EngineArgs(model="unused", **{k: calls[-1][k] for k in ENGINE_KEYS})  # the installed vLLM's names


def test_bad_weight_update_is_refused_whole(tiny_workspace, worker):
    policy, _ = _policy(tiny_workspace["config"])
    state = {f"lm.{k}": v for k, v in policy.lm.state_dict().items()}
    version = ray.get(worker.version.remote())
    with pytest.raises(ValueError, match=r"missing keys \['projector"):
        ray.get(worker.update_weights.remote(state, version + 1))
    state |= {f"projector.{k}": v for k, v in policy.projector.state_dict().items()}
    state["lm.lm_head.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"wrong shapes \['lm.lm_head.weight'\]"):
        ray.get(worker.update_weights.remote(state, version + 1))
    assert ray.get(worker.version.remote()) == version


def test_calls_waiting_for_weights_cannot_starve_the_update(tiny_workspace, worker, prompts):
    """More calls than the actor has call threads, all waiting for weights not yet sent."""
    policy, _ = _policy(tiny_workspace["config"])
    state = {f"lm.{k}": v for k, v in policy.lm.state_dict().items()}
    state |= {f"projector.{k}": v for k, v in policy.projector.state_dict().items()}
    version = ray.get(worker.version.remote()) + 1
    waiting = [worker.generate.remote(prompts, group_size=1, max_tokens=2, min_version=version)
               for _ in range(ACTOR_OPTIONS["max_concurrency"] + 2)]
    assert not ray.wait(waiting, timeout=1.0)[0]  # none may begin with older weights
    ray.get(worker.update_weights.remote(ray.put(pack_state(state)), version), timeout=120)
    batches = ray.get(waiting, timeout=300)
    assert all(set(batch.column("weights_version").to_pylist()) == {version} for batch in batches)


def test_missing_features_raise_naming_the_sample(worker, prompts):
    from models.rollout import MissingFeaturesError

    rows = prompts.to_pylist()
    rows[1] |= {"sample_id": "lost-sample", "image_hash": "0" * 64}
    with pytest.raises(MissingFeaturesError, match="lost-sample"):
        ray.get(worker.generate.remote(make_prompt_batch(rows), max_tokens=4))
    assert ray.get(worker.ping.remote())


def test_prompt_rows_need_their_own_group_id(worker, prompts):
    rows = prompts.to_pylist()
    rows[2]["group_id"] = rows[0]["group_id"]
    with pytest.raises(ValueError, match="every row needs its own group_id"):
        ray.get(worker.generate.remote(make_prompt_batch(rows), max_tokens=4))
    rows[2]["group_id"] = None
    with pytest.raises(ValueError, match="every row needs its own group_id"):
        ray.get(worker.generate.remote(make_prompt_batch(rows), max_tokens=4))
