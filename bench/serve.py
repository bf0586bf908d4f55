"""`segrl serve` under load: the policy batched (``@serve.batch``) vs one request per batch, side by side.

Usage: python bench/serve.py [--config configs/tiny.yaml] [--checkpoint DIR] [--requests 200]
       [--clients 16] [--batch 8] [--port 8000] [KEY=VALUE ...]

Deploys the app on a local Ray cluster (or $RAY_ADDRESS) serving ``--checkpoint`` (default
model.name_or_path), then for each policy ``max_batch_size`` (``--batch``, then 1; switched in
place through the deployment's user_config) sends ``--requests`` POST /v1/segment from
``--clients`` concurrent clients on 127.0.0.1 (val images and questions of the config's data,
in turn, greedy) after a short warm-up, and prints p50/p99 latency, requests/s and the count of
each status. 503 is the deliberate backpressure (the policy's ``max_queued_requests``); any other
non-200 is counted as a failure, and every 200 is checked to be well formed (masks at the image's
size). The policy's ``max_ongoing_requests`` is raised to fit ``--batch`` where it is lower.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import load_config
from data.rle import decode_rle
from data.schema import read_samples, resolve_image
from pipelines.serve.app import absolute_paths, deploy, serve_config, undeploy


def post(port: int, body: bytes) -> tuple[int, float, dict | None]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/segment", data=body,
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            status, raw = reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    elapsed = time.perf_counter() - start
    try:
        return status, elapsed, json.loads(raw)
    except ValueError:
        return status, elapsed, None


def well_formed(body: dict | None) -> bool:
    if not body or not isinstance(body.get("weights_version"), int):
        return False
    size = body["image_size"]
    return (body["has_target"] or not body["masks"]) and all(
        list(decode_rle(m["rle"]).shape) == size for m in body["masks"])


def run_case(port: int, bodies: list[bytes], requests: int, clients: int) -> dict:
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda i: post(port, bodies[i % len(bodies)]), range(clients)))  # warm-up
        start = time.perf_counter()
        replies = list(pool.map(lambda i: post(port, bodies[i % len(bodies)]), range(requests)))
        wall = time.perf_counter() - start
    ok = [t for s, t, _ in replies if s == 200]
    return {"statuses": Counter(s for s, _, _ in replies), "wall": wall,
            "p50": 1000 * float(np.percentile(ok, 50)) if ok else float("nan"),
            "p99": 1000 * float(np.percentile(ok, 99)) if ok else float("nan"),
            "ok_per_s": len(ok) / wall, "malformed": sum(not well_formed(b) for s, _, b in replies if s == 200)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--checkpoint")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from cluster.local import connect, disconnect

    config = absolute_paths(load_config(args.config, [*args.overrides, f"serve.port={args.port}"]))
    policy = config.serve.policy
    policy.max_ongoing_requests = max(policy.max_ongoing_requests, args.batch)
    policy.max_batch_size = args.batch
    model = str(Path(args.checkpoint or config.resolve_path(config.model.name_or_path)).resolve())
    split = Path(config.resolve_path(config.data.root)) / f"{config.data.eval_splits[0]}.parquet"
    bodies = [json.dumps({"image": base64.b64encode(resolve_image(split, s.image_path).read_bytes()).decode(),
                          "query": s.question}).encode() for s in read_samples(split)[:32]]
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"cpu_count={os.cpu_count()}, python {platform.python_version()}")
    print(f"model {model}; {args.requests} requests from {args.clients} clients on 127.0.0.1:{args.port}; "
          f"policy max_ongoing_requests {policy.max_ongoing_requests}, max_queued_requests "
          f"{policy.max_queued_requests}")
    connect(os.environ.get("RAY_ADDRESS"))
    results = {}
    try:
        for batch in (args.batch, 1):
            cfg = serve_config(config, model, 1)
            cfg["applications"][0]["deployments"][1]["user_config"]["max_batch_size"] = batch
            deploy(cfg)
            time.sleep(2.0)  # the policy's reconfigure (batch size only) lands
            results[batch] = run_case(args.port, bodies, args.requests, args.clients)
    finally:
        undeploy()
        disconnect()
    print(f"{'max_batch_size':>15}{'p50 ms':>10}{'p99 ms':>10}{'ok req/s':>10}{'200':>6}{'503':>6}{'other':>7}"
          f"{'malformed':>11}")
    failed = False
    for batch, r in results.items():
        other = sum(n for s, n in r["statuses"].items() if s not in (200, 503))
        failed |= bool(other or r["malformed"])
        print(f"{batch:>15}{r['p50']:>10.1f}{r['p99']:>10.1f}{r['ok_per_s']:>10.2f}{r['statuses'][200]:>6}"
              f"{r['statuses'][503]:>6}{other:>7}{r['malformed']:>11}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
