"""The autoscaling experiment on real tiny runs: fixed rollout pools against the scaling policy, each
run on a fake multi-node Ray cluster whose autoscaler really launches a node per engine.

Each variant is the main job's GRPO run (``configs/tiny.yaml``, from its SFT model: run
``make main`` first) for ``--steps`` steps, driven by ``segrl train`` in a process of its own
against a fresh fake cluster (``bench.fake_cluster``): the head holds the learner, reference
and reward actors; every rollout engine needs an ``engine-node`` (1 logical CPU), which the
autoscaler launches on demand, so a fixed pool waits for its nodes as the policy's additions do.
Printed per variant: steady-state responses/s (the second half of the steps), the learner's
idle fraction there, the staleness histogram, the last rewards, engine-hours, wall time; a PNG
shows engines, responses/s and reward against wall-clock time.

What it measures is this machine: every engine shares its 2 physical cores with the learner,
so more engines cannot generate faster here (the simulated 7B cluster of ``bench/autoscale.py``
is where engines are GPUs); the point is the path: nodes launched on request, engines joining
and leaving mid-run, nothing lost (each run's ledger is checked).

    python bench/autoscale_real.py [--quick] [--steps N] [--out DIR] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

from bench.fake_cluster import FakeAutoscalingCluster  # noqa: E402
from config import load_config  # noqa: E402
from pipelines.grpo.ledger import Ledger  # noqa: E402
from pipelines.grpo.metrics_log import read_metrics  # noqa: E402

ENGINE_NODE = "engine-node"
HEAD = ["cluster.learner.num_cpus=0.5", "cluster.reference.num_cpus=0.25", "cluster.reward.num_cpus=0.25",
        "cluster.rollout.num_cpus=1", "cluster.placement_timeout_s=600", "train.eval_samples=0",
        "train.checkpoint_every=1000"]
HEAD_CPUS = 2  # 2 learner ranks x 0.5 + reference 0.25 + reward 0.25 = 1.5: no room for a 1-CPU engine


def variants(max_engines: int, fixed: list[int], window: int) -> dict[str, list[str]]:
    out = {f"fixed {n}": [f"cluster.rollout_actors={n}"] for n in fixed}
    start = min(2, max_engines)  # from 2, so that the policy can move either way
    out[f"policy 1..{max_engines}"] = [f"cluster.rollout_actors={start}", "cluster.rollout_autoscale.min=1",
                                       f"cluster.rollout_autoscale.max={max_engines}",
                                       f"cluster.rollout_autoscale.window={window}"]
    return out


def run_variant(name: str, overrides: list[str], out: Path, steps: int, max_engines: int) -> dict:
    """One ``segrl train`` on a fresh fake cluster; its figures from the run folder."""
    run_dir = out / name.replace(" ", "-").replace(".", "")
    log = out / f"{run_dir.name}.log"
    node_types = {ENGINE_NODE: {"resources": {"CPU": 1}, "max_workers": max_engines}}
    start = time.perf_counter()
    with FakeAutoscalingCluster(HEAD_CPUS, node_types) as cluster, open(log, "w") as sink:
        command = [sys.executable, "-m", "pipelines.cli", "train", f"cluster.address={cluster.address}",
                   f"train.output={run_dir}", f"train.steps={steps}", *HEAD, *overrides]
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, **cluster.environment()}, stdout=sink,
                              stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name}: segrl train failed (exit {done.returncode}); see {log}")
    return {"name": name, "wall_s": time.perf_counter() - start, **figures(run_dir, steps)}


def figures(run_dir: Path, steps: int) -> dict:
    """Steady state = the second half of the steps; engine-hours over the whole run."""
    rows = read_metrics(run_dir)
    config = load_config(str(run_dir / "config.yaml"))
    fixed = config.cluster.rollout_actors
    per_step = config.grpo.prompts_per_step * config.rollout.group_size
    t = [r["time/elapsed_s"] for r in rows]
    engines = [r.get("rollout/engines", fixed) for r in rows]
    half = len(rows) // 2
    window = rows[half:]
    wait = sum(r["time/learner_wait_s"] for r in window)
    busy = wait + sum(r["time/learn_s"] for r in window)
    staleness: dict[str, int] = {}
    for r in rows:
        for key, n in r.items():
            if key.startswith("staleness/"):
                staleness[key.split("/")[1]] = staleness.get(key.split("/")[1], 0) + n
    ledger = Ledger.load(run_dir / "ledger.json")
    ledger.check(config.train.staleness, batch_size=config.grpo.prompts_per_step)
    return {
        "rate": per_step * (len(rows) - half) / max(t[-1] - t[half - 1], 1e-9) if half else float("nan"),
        "idle": wait / busy if busy else 0.0, "staleness": dict(sorted(staleness.items())),
        "reward_last": sum(r["reward/total"] for r in rows[-5:]) / min(5, len(rows)),
        "engine_hours": sum(e * (b - a) for e, a, b in zip(engines, [0.0, *t], t)) / 3600,
        "max_engines": max(engines), "events": [e for r in rows for e in r.get("rollout/scale_events", [])],
        "series": {"t": t, "engines": engines, "reward": [r["reward/total"] for r in rows],
                   "rate": [per_step / max(b - a, 1e-9) for a, b in zip([0.0, *t], t)]},
        "steps": len(rows), "requeued": sum(ledger.summary()["requeued_by_reason"].values()),
    }


def table(results: list[dict]) -> list[str]:
    best = max(r["rate"] for r in results)
    lines = [f"{'pool':<14}{'resp/s':>8}{'vs best':>8}{'idle':>7}{'engine-h':>10}{'max eng':>8}{'reward':>8}"
             f"{'wall s':>8}  staleness"]
    for r in results:
        lines.append(f"{r['name']:<14}{r['rate']:>8.2f}{r['rate'] / best:>8.2f}{r['idle']:>7.2f}"
                     f"{r['engine_hours']:>10.4f}{r['max_engines']:>8}{r['reward_last']:>8.3f}{r['wall_s']:>8.0f}  "
                     + " ".join(f"{k}:{v}" for k, v in r["staleness"].items()))
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in results:
        s = r["series"]
        axes[0].step(s["t"], s["engines"], where="post", label=r["name"])
        axes[1].plot(s["t"], s["rate"], label=r["name"])
        axes[2].plot(s["t"], s["reward"], label=r["name"])
    for ax, what in zip(axes, ("rollout engines", "responses/s (per step)", "reward")):
        ax.set(xlabel="wall-clock s since the run's first step", title=what)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--max-engines", type=int, default=3)
    parser.add_argument("--fixed", type=int, nargs="+", default=[1, 2, 3], help="fixed pool sizes to compare")
    parser.add_argument("--window", type=int, default=3, help="the policy's window (steps at one size)")
    parser.add_argument("--quick", action="store_true", help="10 steps, fixed 1 and 2, policy up to 2, window 2")
    parser.add_argument("--out", default=str(ROOT / "work" / "bench" / "autoscale-real"))
    parser.add_argument("--work", help="the main job's work folder (paths.work_dir; default the config's)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.fixed, args.max_engines, args.window = 10, [1, 2], 2, 2
    work = [f"paths.work_dir={Path(args.work).resolve()}"] if args.work else []
    model = load_config("configs/tiny.yaml", work).resolve_path("{runs_dir}/sft/model")
    if not Path(model, "manifest.json").is_file():
        raise SystemExit(f"no SFT model at {model}: run `make main` (or `segrl main`) first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs; {args.steps} steps a run")
    results = []
    for name, overrides in variants(args.max_engines, args.fixed, args.window).items():
        print(f"running {name} ...", flush=True)
        results.append(run_variant(name, work + overrides, out, args.steps, args.max_engines))
        print("\n".join(table(results[-1:])[1:]), flush=True)
    print("\n".join(table(results)))
    for r in results:
        for e in r["events"]:
            print(f"  {r['name']}: {e['event']} {e['engine']}: {e['reason']}")
    plot(results, out / "autoscale_real.png")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    print(f"plot {out / 'autoscale_real.png'}; figures {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
