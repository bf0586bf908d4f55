"""Per-phase breakdown of GRPO steps with eta = 0 and eta = 1 on the tiny config, side by side.

Usage: python bench/step.py [--steps 6] [KEY=VALUE ...]
Needs `make main` (or the steps up to `segrl sft`) first: it trains from the SFT checkpoint into
work/runs/bench-step-eta{0,1}. Prints, per eta: wall time per step, each phase's busy fraction,
the learner's idle time, and the eta=1 / eta=0 throughput ratio.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from config import load_config  # noqa: E402
from pipelines.train import train  # noqa: E402

PHASES = ("rollout", "reference", "reward", "learn", "sync")


def run(eta: int, steps: int, overrides: list[str]) -> dict:
    config = load_config("configs/tiny.yaml", [f"train.staleness={eta}", f"train.steps={steps}",
                                               f"train.output={{runs_dir}}/bench-step-eta{eta}",
                                               "train.eval_samples=8", *overrides])
    summary = train(config)
    return {"wall_s": summary["wall_s"], "steps": steps, "phases": summary["phases"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results = {eta: run(eta, args.steps, args.overrides) for eta in (0, 1)}
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}")
    for eta, r in results.items():
        busy = "  ".join(f"{p} {r['phases'].get(p, {}).get('busy_fraction', 0):.2f}" for p in PHASES)
        idle = r["phases"].get("learn", {}).get("idle_s", float("nan"))
        print(f"eta={eta}: {r['wall_s'] / r['steps']:.1f} s/step; busy: {busy}; learner idle {idle:.1f} s")
    ratio = (results[0]["wall_s"] / results[0]["steps"]) / (results[1]["wall_s"] / results[1]["steps"])
    print(f"eta=1 / eta=0 step throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()
