"""Weights that interrupt a running rollout call vs weights that wait for it to drain.

Usage: python bench/interrupt.py [--work-dir work/bench-rollout] [--prompts 8] [--group 4]
       [--tokens 192] [--at 0.25] [--repeats 3]

One real RolloutWorker actor (vLLM-CPU, the ~50M model of bench/rollout.py, one thread).
A call generates ``prompts x group`` responses of long-tailed lengths (log-normal, median
tokens/4, sigma 0.9, clipped to [8, tokens], EOS ignored: a few long responses hold the
call, as in GRPO). A weight update is submitted ``--at`` of the way into the call:
- drain: a non-interruptible engine loads it once the call has finished (what a rollout
  actor that runs its calls in order does);
- interrupt: ``models.interruptible`` loads it between two engine steps; the running
  sequences are preempted and their KV recomputed with the new weights.
Printed per arm, medians over ``--repeats`` alternating runs: the call's time, and the
weights' latency (from the update's submission until it has landed: until it serves).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import ray
import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.rollout import build_50m, prompt_batch, workspace  # noqa: E402
from bench.weight_sync import export  # noqa: E402
from data.weight_transport import pack_state  # noqa: E402
from models.policy import load_policy  # noqa: E402


def lengths(n: int, tokens: int, seed: int = 0) -> list[int]:
    draws = np.random.default_rng(seed).lognormal(np.log(tokens / 4), 0.9, n)
    return [int(x) for x in np.clip(draws, 8, tokens)]


def one_run(worker, batch, sizes, group: int, weights, version: int, at_s: float, interrupt: bool) -> dict:
    """Call seconds, weights latency seconds, whether the update interrupted the call."""
    start = time.perf_counter()
    call = worker.generate.remote(batch, group_size=group, max_tokens=sizes, ignore_eos=True)
    time.sleep(at_s)
    submitted = time.perf_counter()
    if interrupt:
        ack = ray.get(worker.update_weights.remote(weights, version))
        landed = time.perf_counter()
        ray.get(call)
        finished = time.perf_counter()
    else:
        ray.get(call)
        finished = time.perf_counter()
        ack = ray.get(worker.update_weights.remote(weights, version))
        landed = time.perf_counter()
    return {"call": finished - start, "latency": landed - submitted, "interrupted": ack["interrupted"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work-dir", default="work/bench-rollout")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=192)
    parser.add_argument("--at", type=float, default=0.25, help="fraction of a plain call's time")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from actors.rollout import RolloutWorker
    from cluster.local import connect, disconnect

    torch.set_num_threads(1)
    config, rows = workspace(args.work_dir, args.prompts)
    folder = build_50m(config, Path(config.resolve_path("{models_dir}/bench-50m")))
    policy, _ = load_policy("tiny", str(folder), config.model.ref_token, 1)
    batch = prompt_batch(rows)
    sizes = lengths(args.prompts, args.tokens)
    connect(num_cpus=2)
    try:
        worker = RolloutWorker.options(num_cpus=1).remote(config, str(folder), {"max_model_len": 1024})
        ray.get(worker.ping.remote())
        weights = ray.put(pack_state(export(policy)))
        ray.get(worker.generate.remote(batch, group_size=args.group, max_tokens=sizes, ignore_eos=True))  # warm
        start = time.perf_counter()
        ray.get(worker.generate.remote(batch, group_size=args.group, max_tokens=sizes, ignore_eos=True))
        plain = time.perf_counter() - start
        at_s = args.at * plain
        runs: dict[str, list[dict]] = {"drain": [], "interrupt": []}
        version = 0
        for _ in range(args.repeats):
            for arm in runs:
                version += 1
                runs[arm].append(one_run(worker, batch, sizes, args.group, weights, version, at_s, arm == "interrupt"))
    finally:
        disconnect()
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"cpu_count={os.cpu_count()}, torch {torch.__version__}, ray {ray.__version__}")
    print(f"call: {args.prompts} prompts x {args.group} responses, lengths {min(sizes)}-{max(sizes)} "
          f"(median {int(statistics.median(sizes))}); plain call {plain:.2f} s; update submitted at {at_s:.2f} s; "
          f"interrupted: {sum(r['interrupted'] for r in runs['interrupt'])}/{args.repeats} interrupt-arm calls, "
          f"{sum(r['interrupted'] for r in runs['drain'])}/{args.repeats} drain-arm calls")
    median = {arm: {k: statistics.median(r[k] for r in rs) for k in ("call", "latency")} for arm, rs in runs.items()}
    print(f"{'arm':<11}{'call (s)':>10}{'weights latency (s)':>21}")
    for arm, m in median.items():
        print(f"{arm:<11}{m['call']:>10.2f}{m['latency']:>21.2f}")
    print(f"weights latency drain / interrupt: {median['drain']['latency'] / median['interrupt']['latency']:.1f}x; "
          f"call time interrupt / plain: {median['interrupt']['call'] / plain:.2f}x (KV recompute + the load)")


if __name__ == "__main__":
    main()
