"""Fault injection on the tiny config: actors killed mid-run, the driver killed, a torn checkpoint.

Each scenario ends with the ledger's exactly-once check (every admitted sample trained
once, re-queued, or dropped with a reason; no step beyond the staleness bound; every step
a full batch), the metrics numbered 1..N once each, and the same weights version in the
rollout pool, the scorer and the learner. Beside the ledger, the learner's own record of
the groups each surviving step trained (``learner_inputs.jsonl``) is counted against the
prompts admitted. Kill points are drawn from the session's fault seed (printed in the test
header; SEGRL_FAULT_SEED=N repeats them).
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from ray.exceptions import RayError
from tests_support import assert_exactly_once, tiny_grpo_config

import pipelines.train as train_module
from config import dump_config
from pipelines.grpo.ledger import Ledger
from pipelines.grpo.metrics_log import read_metrics
from pipelines.train import train

STEP_TIMEOUT_S = 600


class Injector:
    """Captures the run's actors as they start and records their weights versions at the end."""

    def __init__(self, monkeypatch):
        self.topologies, self.versions = [], []
        start = train_module.start_actors

        def capture(*args, **kwargs):
            topology = start(*args, **kwargs)
            stop = topology.stop

            def record_and_stop():
                try:
                    self.versions.append({
                        "pool": ray.get([w.version.remote() for w in topology.rollout.workers], timeout=60),
                        "reference": [max(v) for v in ray.get([w.versions.remote() for w in topology.reference.workers],
                                                           timeout=60)],
                        "learner": topology.learner.version(),
                    })
                except RayError:  # a failed attempt's learner is gone
                    self.versions.append(None)
                stop()

            topology.stop = record_and_stop
            self.topologies.append(topology)
            return topology

        monkeypatch.setattr(train_module, "start_actors", capture)


def faulty_run(workspace: dict, out: Path, steps: int, checkpoint_every: int, inject) -> tuple[dict, Injector]:
    """A tiny GRPO run into ``out`` while ``inject(injector)`` runs beside it in a thread."""
    config = tiny_grpo_config(workspace, out, steps=steps, checkpoint_every=checkpoint_every)
    config.train.eval_samples = 0
    failures: list[BaseException] = []

    def guarded(injector: Injector) -> None:
        try:
            inject(injector)
        except BaseException as exc:  # re-raised in the test's thread below
            failures.append(exc)

    with pytest.MonkeyPatch.context() as patch:
        injector = Injector(patch)
        thread = threading.Thread(target=guarded, args=(injector,), daemon=True)
        thread.start()
        summary = train(config)
        thread.join(timeout=5)
    if failures:
        raise failures[0]
    assert not thread.is_alive(), "the run ended before the injector reached its kill points"
    return summary, injector


def wait_for(condition, what: str, timeout_s: float = STEP_TIMEOUT_S, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(interval_s)


def steps_logged(out: Path) -> int:
    return len(read_metrics(out))


def assert_versions_agree(versions: dict, steps: int) -> None:
    assert versions["learner"] == steps
    assert set(versions["pool"]) == {steps} and set(versions["reference"]) == {steps}


@pytest.fixture(scope="module")
def actor_kills(tiny_workspace, tiny_sae, ray_cluster, tmp_path_factory, fault_seed):
    """Kill the rollout engine, the reference scorer and a reward worker, each in the middle of a call
    after a step drawn from the fault seed, in one run."""
    out = tmp_path_factory.mktemp("faults-actors")
    rng = random.Random(f"{fault_seed}:actors")
    kills = sorted(zip(rng.sample([1, 2, 3, 4], 3), ["rollout", "reference", "reward"]))

    def inject(injector):
        wait_for(lambda: injector.topologies, "the actors")
        topology = injector.topologies[0]
        for step, kind in kills:
            pool = {"rollout": topology.rollout, "reference": topology.reference, "reward": topology.reward}[kind]
            wait_for(lambda: steps_logged(out) >= step, f"step {step}")
            time.sleep(rng.uniform(0.0, 0.5))
            # mid-call, so that work is lost and must be re-queued (an idle actor killed after its
            # last call of the run would never be noticed)
            wait_for(lambda pool=pool: pool.in_flight() > 0, f"a {kind} call in flight", interval_s=0.005)
            ray.kill(pool.workers[0])

    summary, injector = faulty_run(tiny_workspace, out, 6, 3, inject)
    return out, summary, injector, kills


def test_killed_actors_are_replaced_and_no_sample_is_lost_or_trained_twice(actor_kills):
    out, summary, injector, kills = actor_kills
    ledger = assert_exactly_once(out, 6)
    assert_versions_agree(injector.versions[0], 6)
    faults = {k: v for k, v in read_metrics(out)[-1].items() if k.startswith("faults/")}
    assert faults["faults/restarts"] == 3 and faults["faults/actor_failures"] >= 3, (kills, faults)
    requeued = ledger.summary()["requeued_by_reason"]
    assert sum(requeued.values()) == faults["faults/retries"] >= 1
    assert all(reason.split(":")[0] in ("rollout", "reference", "reward") for reason in requeued)
    assert any(reason.startswith("rollout") for reason in requeued), (kills, requeued)  # killed mid-generation


@pytest.fixture(scope="module")
def driver_killed(tiny_workspace, tiny_sae, ray_cluster, tmp_path_factory, fault_seed):
    """`segrl train` in a subprocess on this cluster, SIGKILLed after its step-2 or step-4 checkpoint
    (drawn from the fault seed): (config, run folder, the checkpoint's step)."""
    rng = random.Random(f"{fault_seed}:driver")
    killed_after = rng.choice([2, 4])
    out = tmp_path_factory.mktemp("faults-driver")
    config = tiny_grpo_config(tiny_workspace, out, steps=6, checkpoint_every=2)
    config.train.eval_samples = 0
    config.cluster.address = ray.get_runtime_context().gcs_address
    config_file = out.parent / f"{out.name}.yaml"
    config_file.write_text(dump_config(config))
    log = open(out.parent / f"{out.name}.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", "--config", str(config_file)],
                              stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1])
    try:
        wait_for(lambda: (out / "checkpoints" / f"step{killed_after}.manifest.json").is_file()
                 or driver.poll() is not None, f"the step-{killed_after} checkpoint")
        time.sleep(rng.uniform(0.0, 0.5))
        assert driver.poll() is None, (out.parent / f"{out.name}.log").read_text()[-3000:]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        driver.kill()
        log.close()
    return config, out, killed_after


def resume(config, out: Path, mode: bool | str = True) -> tuple[str, dict]:
    """``train --resume`` (``mode`` True) or a rerun with ``train.resume=auto`` in this process:
    (what it printed, the actors' final versions)."""
    with pytest.MonkeyPatch.context() as patch:
        injector = Injector(patch)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            train(config, resume=mode)
    return printed.getvalue(), injector.versions[0]


@pytest.fixture(scope="module")
def driver_resumed(driver_killed):
    """The killed driver's command run again with train.resume=auto (a retried Kubernetes job)."""
    config, out, killed_after = driver_killed
    assert steps_logged(out) >= killed_after and not (out / "ledger.json").exists()
    printed, versions = resume(config, out, "auto")
    return out, printed, versions, Ledger.load(out / "ledger.json"), killed_after


def test_a_killed_driver_resumes_from_its_newest_checkpoint(driver_resumed):
    out, printed, versions, ledger, killed_after = driver_resumed
    assert f"train.resume=auto: continuing the run in {out}" in printed
    assert f"checkpoints/step{killed_after}: {killed_after} steps done" in printed and "skipping" not in printed
    assert_exactly_once(out, 6)
    assert_versions_agree(versions, 6)
    assert read_metrics(out)[-1]["faults/resumes"] == 1
    assert any(reason.startswith("resumed") for reason in ledger.summary()["requeued_by_reason"])


@pytest.fixture(scope="module")
def torn_resumed(driver_killed, driver_resumed, fault_seed):
    """The finished run's newest checkpoint (step 6) half written or with one bit flipped (drawn from the
    fault seed), then the run extended to 8 steps."""
    config, out, _ = driver_killed
    rng = random.Random(f"{fault_seed}:torn")
    newest = out / "checkpoints" / "step6"
    victim = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    if rng.random() < 0.5:
        data = data[: len(data) // 2]
        reason = f"{len(data)} bytes, step6.manifest"
    else:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        reason = "damaged (its SHA-256 differs"
    victim.write_bytes(bytes(data))
    config = config.model_copy(deep=True)
    config.train.steps = 8
    printed, versions = resume(config, out)
    return out, printed, versions, f"skipping checkpoint {newest}: {victim}: {reason}"


def test_a_torn_newest_checkpoint_is_skipped_for_the_previous_one(torn_resumed):
    out, printed, versions, skipped = torn_resumed
    assert skipped in printed and "checkpoints/step4: 4 steps done" in printed
    assert_exactly_once(out, 8)
    assert_versions_agree(versions, 8)


@pytest.fixture(scope="module")
def learner_killed(tiny_workspace, tiny_sae, ray_cluster, tmp_path_factory, fault_seed):
    """A learner rank killed after the step-2 checkpoint: the run resumes by itself."""
    out = tmp_path_factory.mktemp("faults-learner")
    rng = random.Random(f"{fault_seed}:learner")

    def inject(injector):
        wait_for(lambda: (out / "checkpoints" / "step2.manifest.json").is_file(), "the step-2 checkpoint")
        time.sleep(rng.uniform(0.0, 0.5))
        ray.kill(injector.topologies[0].learner.ranks[1])

    _, injector = faulty_run(tiny_workspace, out, 6, 2, inject)
    return out, injector


def test_a_learner_failure_resumes_from_the_last_checkpoint(learner_killed):
    out, injector = learner_killed
    assert len(injector.topologies) == 2  # the failed attempt's actors, then the resumed run's
    assert_exactly_once(out, 6)
    assert_versions_agree(injector.versions[-1], 6)
    assert read_metrics(out)[-1]["faults/resumes"] == 1
