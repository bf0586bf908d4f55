"""On a fake multi-node cluster whose autoscaler really launches nodes (``bench.fake_cluster``: its own
process group, so the suite's cluster is untouched), the elastic rollout driver's request for one more
engine makes the autoscaler launch a GPU node, the engine joins there with the GPU Ray gave it, and a
retired engine's placement group is freed. The driver side runs in a process of its own
(``tests/fake_autoscaling_probe.py``): one process can only be connected to one cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.fake_cluster import FakeAutoscalingCluster, FakeCannotStart

ROOT = Path(__file__).resolve().parents[1]
GPU_NODE = {"resources": {"CPU": 1, "GPU": 1}, "max_workers": 2}


@pytest.fixture(scope="module")
def probe():
    cluster = FakeAutoscalingCluster(head_cpus=2, node_types={"gpu-node": GPU_NODE})
    try:
        cluster.start()
    except FakeCannotStart as exc:
        pytest.skip(f"this platform cannot start a fake autoscaling cluster: {exc}")
    try:
        env = {**os.environ, **cluster.environment()}
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "fake_autoscaling_probe.py"), cluster.address],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=400, check=False)
    finally:
        cluster.shutdown()
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_asking_for_an_engine_launches_a_gpu_node_and_the_engine_joins_there(probe):
    (head,) = probe["head"]
    assert len(probe["nodes_one"]) == 2 and probe["first"]["node"] != head  # the first engine's node came too
    assert len(probe["nodes_two"]) == 3
    assert probe["second"]["node"] not in probe["nodes_one"]  # a node launched for the added engine
    assert len(probe["first"]["gpus"]) == len(probe["second"]["gpus"]) == 1  # each engine got its GPU from Ray
    gpu_bundles = [b for b in probe["requests"][0] if b.get("GPU")]
    assert len(gpu_bundles) == 2  # the hint asked for the whole run at two engines
    assert [e["event"] for e in probe["events"]] == ["add", "joined", "retire", "removed"]
    assert probe["groups_after"] == 1  # the retired engine's placement group was freed
    print(f"first node {probe['first_node_s']:.1f} s, added engine serving {probe['joined_s']:.1f} s after the ask")
