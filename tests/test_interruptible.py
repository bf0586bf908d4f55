"""Interruptible generation: weights land between engine steps of a running call.

The engine logic against a scripted fake engine (threads, no vLLM), then a real rollout
worker whose engine holds after step k until an update is pending: the update must land
inside the call, the running sequences go on with the new weights (KV recomputed), and
the batch keeps the version it began with.
"""
from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from actors.rollout import ACTOR_OPTIONS, Rollout
from data.features import content_hash
from data.schema import read_samples, resolve_image
from data.trajectory import make_prompt_batch
from data.weight_transport import pack_state
from models.interruptible import InterruptibleEngine
from models.prompt import prompt_ids


class FakeLLM:
    """Steps finish one request each; records what happened in order."""

    def __init__(self, fail_at: int | None = None):
        self.log, self.unfinished, self.fail_at, self.steps = [], [], fail_at, 0
        self.llm_engine = self

    def _add_completion_requests(self, prompts, params, use_tqdm):
        ids = [str(i) for i in range(len(prompts))]
        self.unfinished = list(reversed(ids))
        return ids

    def has_unfinished_requests(self):
        return bool(self.unfinished)

    def step(self):
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError("engine step failed")
        time.sleep(0.05)
        done = self.unfinished.pop()
        self.log.append(f"step {done}")
        return [type("Out", (), {"finished": True, "request_id": done})()]

    def abort_request(self, ids):
        self.log.append(f"abort {ids}")
        self.unfinished = []

    def reset_prefix_cache(self, reset_running_requests=False):
        self.log.append(f"reset running={reset_running_requests}")


def test_an_idle_engine_loads_at_once():
    llm = FakeLLM()
    engine = InterruptibleEngine(llm)
    assert engine.update(lambda: llm.log.append("load 3"), 3) is False
    assert engine.version == 3 and llm.log == ["load 3", "reset running=False"]


def test_an_update_lands_between_steps_of_a_running_call():
    llm = FakeLLM()
    engine = InterruptibleEngine(llm)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=engine.generate(lambda: [1, 2, 3, 4], [None] * 4)))
    thread.start()
    while "step 0" not in llm.log:
        time.sleep(0.005)
    assert engine.update(lambda: llm.log.append("load 1"), 1) is True
    assert thread.is_alive()  # returned while the call still generates
    thread.join()
    outputs, began = result["out"]
    assert began == 0 and [o.request_id for o in outputs] == ["0", "1", "2", "3"]
    landed = llm.log.index("load 1")
    assert 1 <= landed < len(llm.log) - 1 and llm.log[landed + 1] == "reset running=True"
    assert engine.version == 1


def test_a_call_waits_for_the_weights_it_was_submitted_after():
    llm = FakeLLM()
    engine = InterruptibleEngine(llm)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=engine.generate(lambda: [1], [None], min_version=2)))
    thread.start()
    time.sleep(0.2)
    assert thread.is_alive() and llm.steps == 0  # update 2 is not in yet
    engine.update(lambda: llm.log.append("load 2"), 2)
    thread.join()
    assert result["out"][1] == 2 and llm.log[:3] == ["load 2", "reset running=False", "step 0"]
    with pytest.raises(TimeoutError, match="weights version 3 never arrived .* engine has version 2"):
        engine.generate(lambda: [1], [None], min_version=3, wait_s=0.1)
    assert engine.generate(lambda: [1], [None], min_version=2)[1] == 2  # the lock was released


def _catch(errors: list, call, *args) -> None:
    try:
        call(*args)
    except OSError as exc:
        errors.append(exc)


def test_a_failed_load_raises_in_its_caller_and_a_failed_step_aborts_the_call():
    llm = FakeLLM(fail_at=2)
    engine = InterruptibleEngine(llm)

    def broken():
        raise OSError("weights unreadable")

    with pytest.raises(OSError, match="weights unreadable"):
        engine.update(broken, 5)
    assert engine.version == 0
    errors = []
    with engine._engine:  # busy: the second update replaces the first before either loads
        updaters = [threading.Thread(target=lambda load=load, v=v: _catch(errors, engine.update, load, v))
                    for load, v in ((lambda: llm.log.append("load 6"), 6), (broken, 7))]
        for thread in updaters:
            thread.start()
            time.sleep(0.1)
    for thread in updaters:
        thread.join()
    assert len(errors) == 2 and engine.version == 0 and "load 6" not in llm.log
    with pytest.raises(RuntimeError, match="engine step failed"):
        engine.generate(lambda: [1, 2, 3], [None] * 3)
    assert llm.log[-1] == "abort ['0', '1', '2']"
    assert engine.generate(lambda: [], [])[0] == []


def test_versions_only_move_forward_whatever_order_updates_arrive_in():
    llm = FakeLLM()
    engine = InterruptibleEngine(llm)
    results = {}
    with engine._engine:  # busy: the replayed older update arrives after the newer broadcast
        updaters = [threading.Thread(target=lambda v=v: results.update({v: engine.update(
            lambda: llm.log.append(f"load {v}"), v)})) for v in (2, 1)]
        for thread in updaters:
            thread.start()
            time.sleep(0.1)
    for thread in updaters:
        thread.join()
    assert results == {2: False, 1: False} and engine.version == 2
    assert [line for line in llm.log if line.startswith("load")] == ["load 2"]
    assert engine.update(lambda: llm.log.append("load 1 again"), 1) is False  # older than what is in
    assert engine.version == 2 and "load 1 again" not in llm.log


HOLD_AFTER = 5
TOKENS = 24


@ray.remote(**ACTOR_OPTIONS)
class HeldRollout(Rollout):
    """A real rollout worker; its engine waits after step ``k`` until a weight update is pending."""

    def hold_after(self, k: int) -> None:
        engine, step, count = self.core.llm.llm_engine, self.core.llm.llm_engine.step, [0]
        self.holding = threading.Event()

        def held():
            out = step()
            count[0] += 1
            if count[0] == k:
                self.holding.set()
                while self.core.engine._pending is None:
                    time.sleep(0.01)
            return out

        engine.step = held

    def wait_holding(self, timeout_s: float) -> bool:
        """True once a call is held at its step ``k`` (so an update lands inside it)."""
        return self.holding.wait(timeout_s)


@pytest.fixture(scope="module")
def held(tiny_workspace, tiny_features, ray_cluster):
    config = tiny_workspace["config"]
    worker = HeldRollout.remote(config)
    ray.get(worker.ping.remote(), timeout=600)
    yield worker
    ray.kill(worker)


def flat_weights(config) -> dict:
    """The tiny policy with its final norm zeroed: every logit 0, so greedy picks token 0."""
    from models.policy import load_policy

    m = config.model
    policy, _ = load_policy(m.family, config.resolve_path(m.name_or_path), m.ref_token, m.sae.layer)
    state = {f"lm.{k}": v.clone() for k, v in policy.lm.state_dict().items()}
    state |= {f"projector.{k}": v for k, v in policy.projector.state_dict().items()}
    state["lm.model.norm.weight"] = torch.zeros_like(state["lm.model.norm.weight"])
    return state, policy.lm.config.vocab_size


def test_a_running_call_continues_with_new_weights_and_keeps_its_version(tiny_workspace, held):
    from transformers import AutoTokenizer

    config = tiny_workspace["config"]
    split = Path(config.resolve_path(config.data.root)) / "val.parquet"
    tokenizer = AutoTokenizer.from_pretrained(config.resolve_path(config.model.name_or_path))
    prompts = make_prompt_batch([
        {"sample_id": s.sample_id, "image_hash": content_hash(resolve_image(split, s.image_path)),
         "prompt_ids": prompt_ids(tokenizer, s.question, config.model.ref_token), "gt_masks": [],
         "no_target": s.no_target, "group_id": i} for i, s in enumerate(read_samples(split)[:2])])
    sampling = dict(group_size=1, greedy=True, max_tokens=TOKENS, ignore_eos=True)
    plain = ray.get(held.generate.remote(prompts, **sampling), timeout=300).column("response_ids").to_pylist()
    state, vocab = flat_weights(config)
    ray.get(held.hold_after.remote(HOLD_AFTER))
    batch_ref = held.generate.remote(prompts, **sampling)
    assert ray.get(held.wait_holding.remote(120), timeout=180)
    ack = ray.get(held.update_weights.remote(ray.put(pack_state(state)), 1), timeout=300)
    batch = ray.get(batch_ref, timeout=300)
    assert ack["interrupted"] is True
    assert set(batch.column("weights_version").to_pylist()) == {0}  # the version it began with
    for before, ids, logprobs in zip(plain, batch.column("response_ids").to_pylist(),
                                     batch.column("rollout_logprobs").to_pylist()):
        assert ids[:HOLD_AFTER] == before[:HOLD_AFTER] and any(before[HOLD_AFTER:])
        assert ids[HOLD_AFTER:] == [0] * (TOKENS - HOLD_AFTER)  # the flat weights' greedy token
        assert logprobs[HOLD_AFTER:] == pytest.approx([-math.log(vocab)] * (TOKENS - HOLD_AFTER), abs=1e-3)
        assert all(lp > -math.log(vocab) + 1e-3 for lp in logprobs[:HOLD_AFTER])
    after = ray.get(held.generate.remote(prompts, **sampling), timeout=300)
    assert set(after.column("weights_version").to_pylist()) == {1}
