"""Autoscaling the rollout pool on the simulated 7B cluster: fixed pools against the policy, side by side.

Usage: python bench/autoscale.py [--quick] [--eta 4] [--growth 2] [--shrink 1] [--policy-window 2]
       [--settle 2] [--plot work/bench/autoscale.png]
(~4 min on 2 cores; --quick ~2.5 min: a shorter, noisier run)

What runs: the real Scheduler + StalenessController over ``bench.sim_stages.SimStages``
(bench/scheduler.py's simulated cluster: a 7B model on H100s, long-CoT responses), with the
learner, reference and reward stages and the batch FIXED, sized for 16 rollout engines (8
learner GPUs, a batch of 128 groups of 8), and only the rollout engines varying: fixed pools
of 8, 16, 32 and 64 engines, then the scaling policy from 8 engines within [8, 64]. A rollout
call carries 8 groups, 64 responses (an engine's decode slots), and an engine runs one call
at a time, as segrl's rollout actor does: what the driver assumes when it turns calls in
flight into engine utilisation and queue depth.

The policy runs use the training driver's own code: ``pipelines.grpo.elastic.ElasticRollouts``
as the scheduler's ``on_step`` hook, with ``cluster.rollout_scaling.RolloutScalingPolicy``,
over ``bench.sim_elastic.SimPool``: an added engine serves once its node has arrived and it
has loaded the weights (``Profile.node_start_s + engine_start_s``, 4 simulated minutes), a
retired one first finishes the calls it holds. Three settings: the defaults (one engine per
decision), doubling and halving, and the command line's (by default double up, one engine
down, window 2, the first 2 steps at a new size not counted).

Per run: responses/s at steady state (over the last ``--window`` of ``--steps`` steps:
trained or generated responses per simulated second, whichever is lower; the run goes
eta + 1 steps further so that admission never stops inside the window), the learner's idle
fraction in those steps, the staleness s - v of every group trained in the first ``--steps``
steps, the engine-hours they took (engines paid for: starting, serving or retiring, over
simulated time), and the steady rate against the best fixed pool's. The simulated stages
have no model, hence no reward: reward against time is not reported. Criteria, per policy
run: its steady rate is >= 90% of the best fixed pool's, and it uses fewer engine-hours
than the largest fixed pool over the same steps. Time runs scaled (1/400; --quick 1/600) on
a shared machine, so a busy CPU makes the simulated stages slower than their profile: the
figures vary between runs, more under load and with --quick's faster clock.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.sim_elastic import SimPlacement, SimPool, sim_plan  # noqa: E402
from bench.sim_profile import Profile  # noqa: E402
from bench.sim_stages import SimStages  # noqa: E402
from cluster.local import connect  # noqa: E402
from cluster.rollout_scaling import RolloutScalingPolicy  # noqa: E402
from config.schema import RolloutAutoscaleConfig  # noqa: E402
from pipelines.grpo.admission import StalenessController  # noqa: E402
from pipelines.grpo.elastic import ElasticRollouts  # noqa: E402
from pipelines.grpo.handoff import StepRecord  # noqa: E402
from pipelines.grpo.scheduler import Scheduler  # noqa: E402

ACTORS = 16  # the learner side is sized for this many engines (as bench/scheduler.py's profile counts them)
FIXED_POOLS = (8, 16, 32, 64)
MIN_ENGINES, MAX_ENGINES = 8, 64
RATE_TARGET = 0.90  # of the best fixed pool's steady rate
PROFILE = dataclasses.replace(Profile(), groups_per_call=8, time_scale=1 / 400)


@dataclass(frozen=True)
class Sample:
    """The cluster at the end of one learner step (simulated seconds)."""

    step: int
    now: float
    finished: int  # responses generated so far
    engines: int  # serving
    paid: int  # starting, serving or retiring
    engine_s: float
    wait_s: float  # the learner's wait before this step (wall)
    learn_s: float
    staleness: dict[int, int]


@dataclass
class Run:
    name: str
    samples: list[Sample] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)  # the policy run's scale events, with the step


def steady_rate(samples: list[Sample], responses_per_step: int, window: int) -> float:
    """Responses per simulated second over the last ``window`` steps: trained or generated, the lower."""
    a, b = samples[-window - 1], samples[-1]
    span = b.now - a.now
    return min(window * responses_per_step, b.finished - a.finished) / span


def learner_idle(samples: list[Sample]) -> float:
    """The fraction of the steps' time the learner waited for data."""
    wait = sum(s.wait_s for s in samples)
    return wait / (wait + sum(s.learn_s for s in samples))


def staleness_histogram(samples: list[Sample]) -> dict[int, int]:
    total: Counter[int] = Counter()
    for s in samples:
        total.update(s.staleness)
    return dict(sorted(total.items()))


def engine_hours(samples: list[Sample]) -> float:
    return samples[-1].engine_s / 3600


def summarise(run: Run, steps: int, window: int, responses_per_step: int) -> dict:
    """The table's figures for one run's first ``steps`` steps."""
    counted = run.samples[:steps + 1]  # sample 0: the start
    return {"rate": steady_rate(counted, responses_per_step, window),
            "idle": learner_idle(counted[-window:]),
            "staleness": staleness_histogram(counted[1:]),
            "engine_hours": engine_hours(counted),
            "engines": counted[-1].engines,
            "hours": counted[-1].now / 3600}


def simulate(stages: SimStages, profile: Profile, name: str, engines: int, steps: int, eta: int,
             scaling: RolloutAutoscaleConfig | None = None, actors: int = ACTORS) -> Run:
    """``steps`` learner steps with ``engines`` rollout engines, the rest of the cluster sized for ``actors``;
    with ``scaling``, the pool is resized by the policy (the training driver's ``ElasticRollouts``)."""
    stages.configure(profile, actors, engines=engines, capacity=scaling.max if scaling else None, serial=True)
    run = Run(name)
    scheduler = Scheduler(stages, StalenessController(eta, profile.batch_groups(actors)),
                          groups_per_call=profile.groups_per_call, poll_s=0.02)
    elastic = None
    if scaling is not None:
        placement = SimPlacement(sim_plan(profile, actors, engines))
        start_s = (profile.node_start_s + profile.engine_start_s) * profile.time_scale
        elastic = ElasticRollouts(RolloutScalingPolicy(scaling, eta), SimPool(stages.pool, engines), placement,
                                  scheduler.timer, profile.groups_per_call, join_timeout_s=10 * start_s,
                                  request=placement.request)

    def sample(record: StepRecord | None) -> None:
        stats = stages.pool_stats()
        step = 0 if record is None else record.step + 1
        run.samples.append(Sample(step, stats["now"], stats["finished"], stats["engines"], stats["paid"],
                                  stats["engine_s"], record.wait_s if record else 0.0,
                                  record.learn_s if record else 0.0, dict(record.staleness) if record else {}))

    def on_step(record: StepRecord) -> None:
        if elastic is not None:
            run.events += [dict(e, step=record.step + 1) for e in elastic(record)["rollout"]["scale_events"]]
        sample(record)

    scheduler.on_step = on_step
    sample(None)
    scheduler.run(steps + eta + 1)
    if elastic is not None:
        elastic.close()
    return run


def histogram_text(histogram: dict[int, int]) -> str:
    total = sum(histogram.values())
    return " ".join(f"{k}:{n / total:.0%}" for k, n in histogram.items())


def decisions(events: list[dict]) -> list[str]:
    """One line per step that added or retired engines: how many, and the policy's reason."""
    moves: dict[int, list[dict]] = {}
    for e in events:
        if e["event"] in ("add", "retire"):
            moves.setdefault(e["step"], []).append(e)
    return [f"  after step {step}: {len(group)} x {group[0]['event']} ({group[0]['reason']})"
            for step, group in moves.items()]


def table(summaries: dict[str, dict], best_fixed: str) -> list[str]:
    best = summaries[best_fixed]["rate"]
    lines = [(f"{'pool':<20} {'resp/s':>7} {'vs best':>8} {'learner idle':>12} {'engine-h':>9} {'sim h':>6} "
              f"{'engines at end':>14}  staleness s-v (share of trained groups)")]
    for name, s in summaries.items():
        lines.append(f"{name:<20} {s['rate']:7.2f} {s['rate'] / best:8.0%} {s['idle']:12.0%} {s['engine_hours']:9.1f} "
                     f"{s['hours']:6.2f} {s['engines']:14d}  {histogram_text(s['staleness'])}")
    return lines


def criteria(policy: dict, best: dict, largest: dict) -> list[str]:
    share = policy["rate"] / best["rate"]
    hours = policy["engine_hours"] / largest["engine_hours"]
    return [(f"steady rate {share:.0%} of the best fixed pool's (target >= {RATE_TARGET:.0%}): "
             f"{'PASS' if share >= RATE_TARGET else 'FAIL'}"),
            (f"engine-hours {hours:.0%} of the largest fixed pool's (target < 100%): "
             f"{'PASS' if hours < 1 else 'FAIL'}")]


def plot(runs: list[Run], responses_per_step: int, path: Path) -> None:
    """Engines serving (and paid for) and throughput (responses/s per step) against simulated time, per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for run in runs:
        hours = [s.now / 3600 for s in run.samples]
        line, = top.step(hours, [s.engines for s in run.samples], where="post", label=run.name)
        if any(s.paid != s.engines for s in run.samples):  # starting or retiring engines, paid for
            top.step(hours, [s.paid for s in run.samples], where="post", linestyle=":", color=line.get_color())
        rates = [responses_per_step / (b.now - a.now) for a, b in zip(run.samples, run.samples[1:])]
        bottom.plot(hours[1:], rates, marker=".", label=run.name)
    top.set_ylabel("rollout engines serving (dotted: paid for)")
    bottom.set_ylabel("trained responses/s (per step)")
    bottom.set_xlabel("simulated hours")
    top.legend(fontsize=8)
    top.set_title(f"Rollout autoscaling, simulated 7B cluster (learner sized for {ACTORS} engines)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def policies(args: argparse.Namespace) -> dict[str, RolloutAutoscaleConfig]:
    """The defaults (one engine per decision, window 3), doubling and halving, and the command line's settings."""
    bounds = {"min": MIN_ENGINES, "max": MAX_ENGINES}
    given = RolloutAutoscaleConfig(**bounds, growth=args.growth, shrink=args.shrink, window=args.policy_window,
                                   settle=args.settle)
    return {"policy, defaults": RolloutAutoscaleConfig(**bounds),
            "policy, x2 /2": RolloutAutoscaleConfig(**bounds, growth=2.0, shrink=2.0),
            f"policy, x{given.growth:g} /{given.shrink:g} w{given.window} s{given.settle}": given}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer steps, faster clock (~2.5 min)")
    parser.add_argument("--steps", type=int, help="steps counted per run (default 40; --quick 32)")
    parser.add_argument("--window", type=int, help="steady-state steps at the end (default 8; --quick 5)")
    parser.add_argument("--eta", type=int, default=4, help="staleness bound")
    parser.add_argument("--growth", type=float, default=2.0, help="the last policy's growth per step up")
    parser.add_argument("--shrink", type=float, default=1.0, help="the last policy's shrink per step down")
    parser.add_argument("--policy-window", type=int, default=2, help="the last policy's window (steps)")
    parser.add_argument("--settle", type=int, default=2, help="the last policy's settle steps")
    parser.add_argument("--plot", type=Path, default=Path("work/bench/autoscale.png"))
    args = parser.parse_args()
    steps = args.steps or (32 if args.quick else 40)
    window = args.window or (5 if args.quick else 8)
    if not 1 <= window < steps:
        parser.error(f"need 1 <= --window < --steps, got {window} and {steps}")
    profile = dataclasses.replace(PROFILE, time_scale=1 / 600) if args.quick else PROFILE
    scalings = policies(args)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    connect(num_cpus=2)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs (load average "
          f"{os.getloadavg()[0]:.1f} at the start), Python {platform.python_version()}; simulated cluster: 7B on "
          f"H100s, time scale 1/{1 / profile.time_scale:.0f}")
    print(f"learner side fixed for {ACTORS} engines: batch {profile.batch_groups(ACTORS)} groups of "
          f"{profile.group_size}, {profile.groups_per_call} groups per call; eta {args.eta} (strict); an added engine "
          f"serves after {profile.node_start_s + profile.engine_start_s:.0f} s")
    for name, scaling in scalings.items():
        print(f"{name}: {scaling.model_dump()}")
    began = time.perf_counter()
    responses = profile.batch_groups(ACTORS) * profile.group_size
    stages = SimStages()
    runs = []
    try:
        for engines in FIXED_POOLS:
            runs.append(simulate(stages, profile, f"fixed {engines}", engines, steps, args.eta))
            print(f"  {runs[-1].name}: {time.perf_counter() - began:.0f} s", flush=True)
        for name, scaling in scalings.items():
            runs.append(simulate(stages, profile, name, MIN_ENGINES, steps, args.eta, scaling))
            print(f"  {name}: {time.perf_counter() - began:.0f} s", flush=True)
    finally:
        stages.shutdown()
    summaries = {run.name: summarise(run, steps, window, responses) for run in runs}
    fixed = [f"fixed {engines}" for engines in FIXED_POOLS]
    best = max(fixed, key=lambda n: summaries[n]["rate"])
    print(f"\n{steps} steps per run, steady state = the last {window}; the simulation has no reward (no model), "
          "so reward against time is not reported")
    print("\n".join(table(summaries, best)))
    for run in runs[len(fixed):]:
        print(f"\n{run.name}: engines serving per step: " + " ".join(str(s.engines) for s in run.samples))
        print("\n".join(decisions(run.events)))
        print("  " + "\n  ".join(criteria(summaries[run.name], summaries[best], summaries[fixed[-1]])))
    plot(runs, responses, args.plot)
    print(f"\nplot: {args.plot}; bench wall time {time.perf_counter() - began:.0f} s, load average "
          f"{os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
