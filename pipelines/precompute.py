"""`segrl precompute`: run the frozen encoders once per image, with Ray Data.

Images are deduplicated by path, hashed by content, and skipped when their
shard is cached and sound (a rerun only does what is missing). A damaged shard
(truncated, bit-flipped, non-finite: ``FeatureStore.check``) is encoded again
and listed by name. An unreadable image is reported and the run goes on; the
failures are listed at the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from config import Config
from config.builders import feature_store
from data.features import FeatureStore, content_hash
from data.schema import split_images

_LISTED = 20  # rebuilt shards named in the report (a cache written before checksums rebuilds all)


@dataclass
class PrecomputeReport:
    store: str
    images: int = 0
    encoded: int = 0
    cached: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    rebuilt: list[tuple[str, str]] = field(default_factory=list)  # (image, what was wrong with its shard)

    def lines(self) -> list[str]:
        head = (f"feature cache {self.store}: {self.images} images, {self.encoded} encoded "
                f"({len(self.rebuilt)} of them replacing a damaged shard), {self.cached} already cached, "
                f"{len(self.failures)} failed")
        out = [head]
        out += [f"  REBUILT shard of {path}: {why}" for path, why in self.rebuilt[:_LISTED]]
        if len(self.rebuilt) > _LISTED:
            out.append(f"  ... and {len(self.rebuilt) - _LISTED} more damaged shards rebuilt")
        out += [f"  FAILED {path}: {why}" for path, why in self.failures]
        return out


def dataset_images(config: Config, splits: list[str]) -> list[str]:
    """Unique image files referenced by the given split files, in first-seen order."""
    root = Path(config.resolve_path(config.data.root))
    seen: dict[str, None] = {}
    for split in splits:
        for image in split_images(root / f"{split}.parquet"):
            seen.setdefault(str(image), None)
    return list(seen)


class EncodeBatch:
    """Ray Data stateful UDF: loads the encoders once, writes one shard per image."""

    def __init__(self, family: str, model_path: str, sam_variant: str, sam_ckpt: str | None, cache_dir: str, key: str,
                 pixel_bounds: tuple[int | None, int | None] = (None, None)):
        from models.encoders import FrozenEncoders

        self.encoders = FrozenEncoders(family, model_path, sam_variant, sam_ckpt, pixel_bounds)
        self.store = FeatureStore(cache_dir, key)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        status, detail = ["cached"] * len(paths), [""] * len(paths)
        todo: list[tuple[int, str, np.ndarray]] = []
        for i, path in enumerate(paths):
            try:
                digest = content_hash(path)
                if (problem := self.store.check(digest)) is not None:
                    todo.append((i, digest, _read_rgb(path)))
                    if problem != "missing":
                        detail[i] = f"{self.store.path(digest)}: {problem}"
            except Exception as exc:  # one bad image must not stop the run
                status[i], detail[i] = "failed", f"{type(exc).__name__}: {exc}"
        if todo:
            for (i, digest, _), feats in zip(todo, self.encoders([img for _, _, img in todo])):
                try:
                    self.store.put(digest, feats)
                    status[i] = "encoded"
                except ValueError as exc:  # non-finite features: reported, never cached
                    status[i], detail[i] = "failed", str(exc)
        return {"path": np.array(paths), "status": np.array(status), "detail": np.array(detail)}


def _read_rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def precompute(config: Config, splits: list[str] | None = None, batch_size: int = 32, concurrency: int = 1):
    """Fill the feature cache for `splits` (default: train + eval splits) and report."""
    import ray.data

    splits = splits or [config.data.train_split, *config.data.eval_splits]
    images = dataset_images(config, splits)
    store = feature_store(config)
    report = PrecomputeReport(store=str(store.root), images=len(images))
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items([{"path": p} for p in images]).map_batches(
        EncodeBatch,
        fn_constructor_kwargs=dict(
            family=config.model.family,
            model_path=config.resolve_path(config.model.name_or_path),
            sam_variant=config.model.sam.variant,
            sam_ckpt=config.model.sam.checkpoint,
            cache_dir=config.resolve_path(config.paths.cache_dir),
            key=store.root.name,
            pixel_bounds=(config.data.image_min_pixels, config.data.image_max_pixels),
        ),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=1,
        batch_format="numpy",
    )
    with tqdm(total=len(images), desc="precompute", unit="img") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for path, status, detail in zip(batch["path"], batch["status"], batch["detail"]):
                if status == "encoded":
                    report.encoded += 1
                    if detail:
                        report.rebuilt.append((str(path), str(detail)))
                elif status == "cached":
                    report.cached += 1
                else:
                    report.failures.append((str(path), str(detail)))
            bar.update(len(batch["path"]))
    return report
