"""Weight sync of the ~50M model to a rollout worker vs a plain memory copy of the same bytes.

Usage: python bench/weight_sync.py [--work-dir work/bench-rollout] [--repeats 8]

One sync = export (the learner's state dict as `lm.*` / `projector.*` names, packed as raw
numpy views by `data.weight_transport.pack_state`) + push (`ray.put` once, the actor
receives the ref) + in-place load into the worker's vLLM engine (`reload_weights`) and its
projector / embedding copies. The baseline clones every tensor once (`torch.clone`). Each
phase is the best of `--repeats` (the first sync also writes fresh object-store pages: shown
apart); receive = call time minus the actor's own load time. The same sync with a plain
tensor dict (Ray pickles tensors through torch.save) is shown for comparison. On vLLM-CPU the
load rebuilds each linear layer's oneDNN packed weight (`create_onednn_mm_handler`, about
half the load time in a profile): a re-layout a plain copy does not do. A clone's cost
depends on whether the allocator hands out fresh pages (2 GB/s here) or reused ones
(12 GB/s), so a copy into warm buffers is printed too.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import ray
import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.rollout import build_50m, workspace  # noqa: E402
from data.weight_transport import pack_state  # noqa: E402
from models.policy import load_policy  # noqa: E402


def export(policy) -> dict[str, torch.Tensor]:
    """What the learner hands over: full weights under the names the rollout worker expects."""
    state = {f"lm.{k}": v.detach() for k, v in policy.lm.state_dict().items()}
    return state | {f"projector.{k}": v.detach() for k, v in policy.projector.state_dict().items()}


def sync(worker, policy, version: int, packed: bool) -> dict[str, float]:
    start = time.perf_counter()
    state = export(policy)
    payload = pack_state(state) if packed else state
    exported = time.perf_counter()
    ref = ray.put(payload)
    put = time.perf_counter()
    inside = ray.get(worker.update_weights.remote(ref, version))
    done = time.perf_counter()
    return {"export": exported - start, "put": put - exported, "receive": done - put - inside["total_s"],
            "load": inside["total_s"], "engine": inside["engine_s"], "total": done - start}


def clone_seconds(state: dict[str, torch.Tensor]) -> float:
    """The brief's baseline: clone every tensor (new buffers, so it may pay page faults)."""
    start = time.perf_counter()
    copies = {k: v.clone() for k, v in state.items()}
    seconds = time.perf_counter() - start
    del copies
    return seconds


def warm_copy_seconds(state: dict[str, torch.Tensor], repeats: int) -> float:
    """Copy into buffers already written once: memory bandwidth alone, the lowest bound."""
    copies = {k: v.clone() for k, v in state.items()}
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for k, v in state.items():
            copies[k].copy_(v)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work-dir", default="work/bench-rollout")
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    from actors.rollout import RolloutWorker
    from cluster.local import connect, disconnect

    torch.set_num_threads(1)
    config, _ = workspace(args.work_dir, 1)
    folder = build_50m(config, Path(config.resolve_path("{models_dir}/bench-50m")))
    policy, _ = load_policy("tiny", str(folder), config.model.ref_token, 1)
    state = export(policy)
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    connect(num_cpus=2)
    try:
        worker = RolloutWorker.options(num_cpus=1).remote(config, str(folder), {"max_model_len": 512})
        ray.get(worker.ping.remote())
        print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
              f"cpu_count={os.cpu_count()}, torch {torch.__version__}, ray {ray.__version__}")
        print(f"state: {len(state)} tensors, {nbytes / 1e6:.1f} MB "
              f"({sum(v.numel() for v in state.values()) / 1e6:.1f}M parameters)")
        runs = [sync(worker, policy, v, packed=True) for v in range(1, args.repeats + 1)]
        best = {k: min(r[k] for r in runs) for k in runs[0]}
        clone = min(clone_seconds(state) for _ in range(args.repeats))
        warm = warm_copy_seconds(state, args.repeats)
        tensors = sync(worker, policy, args.repeats + 1, packed=False)
        assert ray.get(worker.version.remote()) == args.repeats + 1
    finally:
        disconnect()
    print(f"{'phase':<22}{'packed (s)':>12}{'tensor dict (s)':>17}")
    for key, label in [("export", "export"), ("put", "put"), ("receive", "receive"), ("load", "load"),
                       ("engine", "  of which vLLM"), ("total", "total")]:
        print(f"{label:<22}{best[key]:>12.3f}{tensors[key]:>17.3f}")
    print(f"first sync (cold)     {runs[0]['total']:>12.3f}")
    print(f"clone (new buffers)   {clone:>12.3f}   ({nbytes / clone / 1e9:.2f} GB/s)")
    print(f"copy into warm buffers{warm:>12.3f}   ({nbytes / warm / 1e9:.2f} GB/s)")
    print(f"ratio sync / clone: packed {best['total'] / clone:.2f}x (target <= 3x), "
          f"tensor dict {tensors['total'] / clone:.2f}x; sync / warm copy: packed {best['total'] / warm:.2f}x")

if __name__ == "__main__":
    main()
