"""Where a run's actors go, computed from the config alone (no Ray): the plan `segrl plan` prints,
`cluster.topology` reserves, and the fit check against a described or live cluster.

Each kind's actors sit in placement groups: a rollout engine's tensor-parallel ranks in one
STRICT_PACK group (one bundle per GPU: tensor parallelism needs its GPUs on one node), the
learner's ranks in one PACK group (one bundle per rank), the reference actors and the reward
workers in one PACK group of single bundles each. Bundles hold exactly what the actors ask,
so reserving them takes no more of the cluster than the actors alone would.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from config import Config, ConfigError

ACTOR = {"rollout": "rollout engine", "learner": "learner rank", "reference": "reference actor",
         "reward": "reward worker"}

LM_PARAMS = {"llava": 6.76e9, "qwen2_5_vl": 7.66e9}
"""Parameters of the policy LM and projector the actors load (the vision tower runs offline):
LLaVA-1.5-7B's Vicuna-7B + MLP projector; Qwen2.5-VL-7B's LM + patch merger."""
SAM_PARAMS = {"tiny": 0.0, "vit_b": 0.094e9, "vit_l": 0.312e9, "vit_h": 0.641e9}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RUNTIME_GIB = 1.0  # a torch (and vLLM) process before any weights
GIB = 2.0 ** 30


class PlacementError(ConfigError):
    """The config's actors cannot be placed on the cluster; the message names the kind and the shortfall."""


@dataclass(frozen=True)
class KindPlan:
    """One actor kind: ``count`` actors, each reserving ``bundles`` (``num_gpus``/``num_cpus`` in all).

    ``actor_gpus`` is what the actor process itself asks: a tensor-parallel engine asks none,
    its vLLM workers take one GPU of each bundle (``capture``: they join the actor's group).
    ``per_group`` actors share one placement group of ``strategy``.
    """

    kind: str
    count: int
    num_gpus: float
    num_cpus: float
    bundles: tuple[dict[str, float], ...]
    strategy: str
    per_group: int
    memory_gib: float
    actor_gpus: float
    capture: bool = False

    def groups(self) -> list[list[dict[str, float]]]:
        """The bundles of each placement group of this kind (none for actors that ask for nothing)."""
        if not self.bundles:
            return []
        return [list(self.bundles) * self.per_group for _ in range(self.count // self.per_group)]

    def slot(self, index: int) -> tuple[int, int]:
        """Actor ``index`` -> (its placement group, its first bundle there)."""
        return index // self.per_group, (index % self.per_group) * len(self.bundles)

    def to_json(self) -> dict:
        return {"kind": self.kind, "count": self.count, "num_gpus": float(self.num_gpus),
                "num_cpus": float(self.num_cpus), "memory_gib": round(self.memory_gib, 1),
                "strategy": self.strategy, "placement_groups": len(self.groups()), "bundles": list(self.bundles)}


@dataclass(frozen=True)
class Plan:
    kinds: tuple[KindPlan, ...]

    def kind(self, name: str) -> KindPlan:
        return next(k for k in self.kinds if k.kind == name)

    @property
    def totals(self) -> dict[str, float]:
        return {"num_gpus": float(sum(k.count * k.num_gpus for k in self.kinds)),
                "num_cpus": float(sum(k.count * k.num_cpus for k in self.kinds)),
                "memory_gib": round(sum(k.count * k.memory_gib for k in self.kinds), 1)}


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {name: float(v) for name, v in (("GPU", gpus), ("CPU", cpus)) if v}


def lm_params(config: Config) -> float:
    """The policy LM's parameter count: from the tiny spec, else the table of known families."""
    if config.model.family != "tiny":
        return LM_PARAMS[config.model.family]
    lm = config.model.tiny.lm
    kv = lm.num_kv_heads * lm.hidden_size // lm.num_heads
    layer = 2 * lm.hidden_size * (lm.hidden_size + kv) + 3 * lm.hidden_size * lm.intermediate_size
    return 2 * lm.vocab_size * lm.hidden_size + lm.num_layers * layer


def memory_gib(config: Config) -> dict[str, float]:
    """A rough per-actor memory estimate (GiB) from model sizes, not a measurement.

    Rollout: LM weights plus as much again of KV cache; reference: LM + SAM weights; learner
    rank: its ZeRO-3 share of 16 bytes per parameter (weights, gradients, AdamW state) plus a
    quarter of the weights for gathered layers and activations; each plus the process runtime.
    """
    lm, sam = lm_params(config), SAM_PARAMS[config.model.sam.variant]
    width = DTYPE_BYTES[config.model.dtype]
    ranks = config.cluster.learner_world_size
    return {"rollout": RUNTIME_GIB + 2 * lm * width / GIB,
            "reference": RUNTIME_GIB + (lm + sam) * width / GIB,
            "learner": RUNTIME_GIB + (16 * (lm + sam) / ranks + 0.25 * (lm + sam) * width) / GIB,
            "reward": 0.5}


def plan(config: Config) -> Plan:
    """The actors of a GRPO run on ``config``, their resources and placement groups."""
    c, tp, memory = config.cluster, config.rollout.tensor_parallel_size, memory_gib(config)
    rollout = ([_bundle(c.rollout.num_cpus, 1)] + [_bundle(0, 1)] * (tp - 1) if tp > 1
               else [_bundle(c.rollout.num_cpus, c.rollout.num_gpus)])
    kinds = [KindPlan("rollout", c.rollout_actors, c.rollout.num_gpus, c.rollout.num_cpus,
                      tuple(b for b in rollout if b), "STRICT_PACK", 1, memory["rollout"],
                      0.0 if tp > 1 else c.rollout.num_gpus, capture=tp > 1)]
    for kind, count in (("learner", c.learner_world_size), ("reference", 1), ("reward", c.reward_workers)):
        r = getattr(c, kind)
        bundle = _bundle(r.num_cpus, r.num_gpus)
        kinds.append(KindPlan(kind, count, r.num_gpus, r.num_cpus, (bundle,) if bundle else (), "PACK", count,
                              memory[kind], r.num_gpus))
    return Plan(tuple(kinds))


@dataclass(frozen=True)
class Node:
    gpus: float = 0.0
    cpus: float = 0.0


def parse_cluster(spec: str) -> list[Node]:
    """``gpu=16,cpu=96`` (one node: totals only) or per node, ``2x(gpu=8,cpu=64)+cpu=16``."""
    nodes: list[Node] = []
    for term in spec.split("+"):
        match = re.fullmatch(r"\s*(?:(\d+)\s*x\s*\((.*)\)|([^()x]*))\s*", term)
        if not match or not (match.group(2) or match.group(3) or "").strip():
            raise ConfigError(f"--cluster {spec!r}: cannot read {term.strip()!r}; expected e.g. "
                              "gpu=16,cpu=96 or 2x(gpu=8,cpu=64)+cpu=16")
        count = int(match.group(1) or 1)
        if count < 1:
            raise ConfigError(f"--cluster {spec!r}: a node count must be at least 1, got {count}")
        values: dict[str, float] = {}
        for item in (match.group(2) or match.group(3)).split(","):
            key, sep, raw = (s.strip() for s in item.partition("="))
            try:
                value = float(raw)
            except ValueError:
                value = -1.0
            if not sep or key.lower() not in ("gpu", "cpu") or key.lower() in values or not 0 <= value < math.inf:
                raise ConfigError(f"--cluster {spec!r}: cannot read {item.strip()!r}; expected gpu=N or cpu=N "
                                  "(each once, N >= 0)")
            values[key.lower()] = value
        nodes += [Node(values.get("gpu", 0.0), values.get("cpu", 0.0))] * count
    return nodes


def format_cluster(nodes: list[Node]) -> str:
    """The spec ``parse_cluster`` reads back as ``nodes`` (runs of equal nodes as ``Nx(...)``)."""
    terms, i = [], 0
    while i < len(nodes):
        j = i
        while j < len(nodes) and nodes[j] == nodes[i]:
            j += 1
        terms.append(f"{j - i}x(gpu={nodes[i].gpus:g},cpu={nodes[i].cpus:g})")
        i = j
    return "+".join(terms)


def nodes_from_ray(ray_nodes: list[dict]) -> list[Node]:
    """The alive nodes of ``ray.nodes()`` with their total (not free) GPUs and CPUs."""
    return [Node(n["Resources"].get("GPU", 0.0), n["Resources"].get("CPU", 0.0))
            for n in ray_nodes if n.get("Alive")]


def _quantity(value) -> float:
    text = str(value).strip()
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


CLUSTER_SPEC = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
"""Where each KubeRay kind keeps the spec of the RayCluster it runs on (None: its own spec)."""


def raycluster_spec(manifest: dict) -> dict:
    """The RayCluster spec of a RayCluster, RayJob or RayService manifest."""
    key = CLUSTER_SPEC[manifest["kind"]]
    return manifest["spec"] if key is None else manifest["spec"][key]


def raycluster_nodes(manifest: dict) -> list[Node]:
    """The nodes a KubeRay cluster starts (a RayCluster, or a RayJob's or RayService's): head plus
    ``replicas`` pods per worker group; a pod offers its ``rayStartParams`` num-cpus/num-gpus, else its
    container's cpu and nvidia.com/gpu limits."""

    def pod(group: dict) -> Node:
        params = group.get("rayStartParams") or {}
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        return Node(_quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
                    _quantity(params.get("num-cpus", limits.get("cpu", 0))))

    spec = raycluster_spec(manifest)
    return [pod(spec["headGroupSpec"])] + [pod(g) for g in spec.get("workerGroupSpecs", [])
                                           for _ in range(int(g.get("replicas", 1)))]


@dataclass(frozen=True)
class Fit:
    fits: bool
    error: str | None = None


def _amount(need: dict[str, float]) -> str:
    """``{"GPU": 4, "CPU": 8}`` -> ``4 GPUs, 8 CPUs``."""
    return ", ".join(f"{need[r]:g} {r}{'s' if need[r] != 1 else ''}" for r in ("GPU", "CPU") if need.get(r))


def fit(plan: Plan, nodes: list[Node]) -> Fit:
    """Whether every placement group of ``plan`` fits on ``nodes`` at once (their total resources).

    STRICT_PACK groups go first, whole, onto one node each; then the PACK bundles one by one,
    largest first, each onto the first node with room (a greedy packing). When one does not
    fit, the error names its kind and what the closest node lacks.
    """
    items = []
    for k in plan.kinds:
        for group in k.groups():
            parts = [group] if k.strategy == "STRICT_PACK" else [[b] for b in group]
            items += [(k, {r: sum(b.get(r, 0.0) for b in part) for r in ("GPU", "CPU")}) for part in parts]
    items.sort(key=lambda item: (item[0].strategy != "STRICT_PACK", -item[1]["GPU"], -item[1]["CPU"]))
    free = [{"GPU": n.gpus, "CPU": n.cpus} for n in nodes]
    for k, need in items:
        room = [f for f in free if all(f[r] >= need[r] - 1e-9 for r in need)]
        if room:
            for r in need:
                room[0][r] -= need[r]
            continue
        short = min(({r: need[r] - f[r] for r in need if need[r] > f[r] + 1e-9} for f in free),
                    key=lambda s: (s.get("GPU", 0.0), s.get("CPU", 0.0)), default=need)
        whole = ("all on one node (STRICT_PACK, for tensor parallelism)"
                 if k.strategy == "STRICT_PACK" and len(k.bundles) > 1 else "on one node")
        totals, have = plan.totals, {"GPU": sum(n.gpus for n in nodes), "CPU": sum(n.cpus for n in nodes)}
        return Fit(False, f"{k.kind} does not fit: a {ACTOR[k.kind]} needs {_amount(need)} {whole}; the closest "
                          f"node is {_amount(short)} short (the plan needs {totals['num_gpus']:g} GPUs and "
                          f"{totals['num_cpus']:g} CPUs in all, the cluster has {have['GPU']:g} and {have['CPU']:g})")
    return Fit(True)


def plan_json(p: Plan, result: Fit | None) -> dict:
    out = {"actors": [k.to_json() for k in p.kinds], "totals": p.totals,
           "fits": None if result is None else result.fits}
    if result is not None and result.error:
        out["error"] = result.error
    return out


def _bundle_text(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{r}: {v:g}" for r, v in bundle.items()) + "}"


def plan_lines(p: Plan, result: Fit | None, cluster: str | None) -> list[str]:
    """The plan as a table, the totals, and the fit (memory is a rough estimate from model sizes)."""
    lines = [f"{'kind':<10}{'actors':>7}{'GPUs':>7}{'CPUs':>7}{'~GiB':>7}  placement groups (bundles per actor)"]
    for k in p.kinds:
        groups, bundles = len(k.groups()), " ".join(_bundle_text(b) for b in k.bundles)
        where = ("no placement group (asks for nothing)" if not groups
                 else f"{groups} {k.strategy} group{'s, each' if groups > 1 else ':'} {bundles}" if k.per_group == 1
                 else f"{groups} {k.strategy} group of {k.per_group} x {bundles}")
        lines.append(f"{k.kind:<10}{k.count:>7}{k.num_gpus:>7g}{k.num_cpus:>7g}{k.memory_gib:>7.1f}  {where}")
    t = p.totals
    lines.append(f"{'total':<10}{'':>7}{t['num_gpus']:>7g}{t['num_cpus']:>7g}{t['memory_gib']:>7.1f}  "
                 "(GPUs, CPUs, ~GiB per actor above; memory is a rough estimate from model sizes)")
    if result is None:
        lines.append("fits: not checked (give --cluster SPEC or --address A)")
    else:
        lines.append(f"cluster {cluster}: " + ("fits" if result.fits else result.error))
    return lines
