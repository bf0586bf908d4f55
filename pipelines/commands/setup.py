"""Commands that prepare a run: the resolved config, the placement plan, data, tiny models, features."""
from __future__ import annotations

import argparse
from pathlib import Path

from config import Config, ConfigError, dump_config
from pipelines.commands.registry import address_flag, command, force_flag, positive_int


@command("config", "print the resolved configuration as YAML")
def cmd_config(config: Config, args: argparse.Namespace) -> None:
    print(dump_config(config), end="")
def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--cluster", metavar="SPEC", help="check against nodes described as gpu=16,cpu=96 (totals) or "
                       "2x(gpu=8,cpu=64)+cpu=16 (per node), or a KubeRay RayCluster/RayJob/RayService YAML file "
                       "(its pods at their initial replicas)")
    where.add_argument("--address", help="check against the live Ray cluster at this address (its total resources)")


@command("plan", "the actors a GRPO run starts, their GPUs, CPUs, memory estimate and placement groups, and "
         "whether they fit a cluster", _plan_args)
def cmd_plan(config: Config, args: argparse.Namespace) -> dict:
    import json

    from cluster import placement

    p, nodes, where = placement.plan(config), None, args.cluster
    if args.cluster and Path(args.cluster).is_file():
        nodes = placement.raycluster_nodes(_raycluster(Path(args.cluster)))
    elif args.cluster:
        nodes = placement.parse_cluster(args.cluster)
    elif args.address:
        import ray

        from cluster.local import connect, disconnect

        connect(args.address)
        nodes, where = placement.nodes_from_ray(ray.nodes()), f"at {args.address}"
        disconnect()
    result = None if nodes is None else placement.fit(p, nodes)
    out = placement.plan_json(p, result)
    print(json.dumps(out) if args.json else "\n".join(placement.plan_lines(p, result, where)))
    if result is not None and not result.fits:
        raise placement.PlacementError(result.error)
    return out


def _raycluster(path: Path) -> dict:
    """The manifest at ``path``: one YAML document of kind RayCluster, RayJob or RayService."""
    import yaml

    from cluster import placement
    from config.load import parse_yaml, yaml_problem

    try:
        manifest = parse_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"--cluster {path}: not one YAML document ({yaml_problem(exc)})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") not in placement.CLUSTER_SPEC:
        raise ConfigError(f"--cluster {path}: not a KubeRay RayCluster, RayJob or RayService manifest")
    key, spec = placement.CLUSTER_SPEC[manifest["kind"]], manifest.get("spec")
    if key and not (isinstance(spec, dict) and isinstance(spec.get(key), dict)):
        raise ConfigError(f"--cluster {path}: this {manifest['kind']} has no spec.{key} (the cluster it starts)")
    return manifest


@command("make-data", "generate the synthetic reasoning-segmentation dataset", force_flag)
def cmd_make_data(config: Config, args: argparse.Namespace) -> dict:
    from pipelines.build import build_synthetic

    return build_synthetic(config, force=args.force)


@command("make-tiny", "build the tiny tokenizer, LM, vision encoder, projector and SAM", force_flag)
def cmd_make_tiny(config: Config, args: argparse.Namespace) -> dict:
    from pipelines.build import build_tiny

    return build_tiny(config, force=args.force)


def precompute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--splits", nargs="+", help="split names (default: train + eval splits)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--concurrency", type=positive_int, default=1, help="encoder actors")
    address_flag(p)


@command("precompute", "cache frozen vision/SAM encoder features per image (Ray Data)", precompute_args)
def cmd_precompute(config: Config, args: argparse.Namespace) -> dict:
    from cluster.local import connect
    from pipelines.precompute import precompute

    connect(args.address)
    report = precompute(config, args.splits, batch_size=args.batch_size, concurrency=args.concurrency)
    print("\n".join(report.lines()))
    return {"encoded": report.encoded, "cached": report.cached, "failed": len(report.failures)}


def _convert_args(p: argparse.ArgumentParser) -> None:
    from data.converters import CONVERTERS

    p.add_argument("format", choices=sorted(CONVERTERS), help="upstream dataset format")
    p.add_argument("src", help="upstream file or folder (see README: Datasets)")
    p.add_argument("--split", required=True, help="split to convert (train, val, test, testA, ...)")
    p.add_argument("--out", required=True, help="canonical Parquet file to write")
    p.add_argument("--image-root", help="folder of the images (REFER/gRefCOCO: COCO train2014)")


@command("convert", "convert ReasonSeg / RefCOCO(+/g) / gRefCOCO into the canonical schema", _convert_args)
def cmd_convert(config: Config, args: argparse.Namespace) -> None:
    from data.converters import Limits, convert
    from data.schema import read_table

    limits = Limits(config.data.max_mask_pixels, config.data.polygon_margin)
    out = convert(args.format, args.src, args.split, args.out, image_root=args.image_root, limits=limits)
    print(f"wrote {read_table(out).num_rows} samples to {out}")
