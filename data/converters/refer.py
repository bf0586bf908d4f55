"""RefCOCO / RefCOCO+ / RefCOCOg (REFER layout) -> canonical Samples.

A refs file (`refs(unc).p`, refcocog `refs(umd).p`) sits beside the COCO
`instances.json` it points into. One Sample per referring sentence; the target
is the ref's single annotation with its polygon parts merged. `ref_samples` is
shared with gRefCOCO, whose refs differ only in how they name their targets.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from data.converters.coco import CocoInstances
from data.converters.sources import get, image_ref, read_json, read_pickle
from data.schema import DataError, Sample

REFS_FILES = {"refcoco": "refs(unc).p", "refcoco+": "refs(unc).p", "refcocog": "refs(umd).p"}

# (ref, its image entry, record name) -> target masks; [] means no target.
MaskFn = Callable[[dict, dict, str], list[np.ndarray]]


def load_refs(path: Path) -> list:
    """A refs list from a pickle (REFER) or JSON (gRefCOCO) file."""
    refs = read_json(path) if path.suffix == ".json" else read_pickle(path)
    if not isinstance(refs, list):
        raise DataError(path, None, None, f"expected a list of refs, got {type(refs).__name__}")
    return refs


def require_image_root(image_root: Path | None, dataset: str) -> Path:
    """Checked before the big files load: REFER refs point into COCO images stored elsewhere."""
    if image_root is None:
        raise ValueError(f"{dataset} needs image_root, the COCO image folder (e.g. mscoco/images/train2014)")
    return image_root


def ref_samples(
    refs_path: Path,
    refs: list,
    coco: CocoInstances,
    split: str,
    dataset: str,
    image_root: Path,
    out_dir: Path,
    masks: MaskFn,
) -> list[Sample]:
    """One Sample per sentence of each ref in `split`; images resolved under image_root."""
    image_paths: dict[int, str] = {}
    samples = []
    for ref_id, ref in _in_split(refs, split, refs_path):
        record = f"ref_id={ref_id}"
        image = coco.image(get(ref, "image_id", refs_path, record, int), refs_path, record)
        if image["id"] not in image_paths:
            image_paths[image["id"]] = image_ref(image_root / image["file_name"], out_dir, refs_path, record)
        targets = masks(ref, image, record)
        for sent_id, text in _sentences(ref, refs_path, record):
            samples.append(
                Sample(
                    sample_id=f"{ref_id}:{sent_id}",
                    image_id=str(image["id"]),
                    image_path=image_paths[image["id"]],
                    height=image["height"],
                    width=image["width"],
                    question=text,
                    split=split,
                    dataset=dataset,
                    masks=list(targets),
                    no_target=not targets,
                )
            )
    return samples


def _in_split(refs: list, split: str, path: Path) -> list[tuple[int, dict]]:
    """(ref_id, ref) for the refs of one split; an empty split is an error, not an empty file."""
    chosen, seen = [], set()
    for i, ref in enumerate(refs):
        ref_id = get(ref, "ref_id", path, f"refs[{i}]", int)
        ref_split = get(ref, "split", path, f"ref_id={ref_id}", str)
        seen.add(ref_split)
        if ref_split == split:
            chosen.append((ref_id, ref))
    if not chosen:
        raise DataError(path, None, "split", f"no refs in split {split!r}; the file has {sorted(seen)}")
    return chosen


def _sentences(ref: dict, path: Path, record: str) -> list[tuple[int, str]]:
    sentences = get(ref, "sentences", path, record, list)
    if not sentences:
        raise DataError(path, record, "sentences", "no sentences")
    out = []
    for i, s in enumerate(sentences):
        sent_id = get(s, "sent_id", path, record, int, f"sentences[{i}].sent_id")
        text = get(s, "sent", path, record, str, f"sentences[{i}].sent")
        if not text.strip():
            raise DataError(path, record, f"sentences[{i}].sent", "empty sentence")
        out.append((sent_id, text))
    return out


def convert_split(src: Path, split: str, out_dir: Path, image_root: Path | None, dataset: str) -> list[Sample]:
    """`src` is the dataset folder, or a refs file itself (e.g. refcocog's refs(google).p)."""
    image_root = require_image_root(image_root, dataset)
    refs_path = src if src.is_file() else src / REFS_FILES[dataset]
    refs = load_refs(refs_path)
    coco = CocoInstances(refs_path.parent / "instances.json")

    def masks(ref: dict, image: dict, record: str) -> list[np.ndarray]:
        return [coco.mask(get(ref, "ann_id", refs_path, record, int), image, refs_path, record)]

    return ref_samples(refs_path, refs, coco, split, dataset, image_root, out_dir, masks)
