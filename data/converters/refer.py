"""RefCOCO / RefCOCO+ / RefCOCOg (REFER layout) -> canonical Samples.

A refs file (`refs(unc).p`, refcocog `refs(umd).p`) sits beside the COCO
`instances.json` it points into. One Sample per referring sentence; the target
is the ref's single annotation with its polygon parts merged. `ref_samples` is
shared with gRefCOCO, whose refs differ only in how they name their targets.
Each image's header is read once and must agree with instances.json's height
and width: masks are drawn at those, metrics compare them with the image's pixels.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from data.converters.coco import CocoInstances
from data.converters.sources import DEFAULT_LIMITS, Limits, get, image_ref, image_size, read_json, read_pickle
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
        raise DataError(dataset, None, "--image-root", "required: the COCO image folder (e.g. mscoco/images/train2014)")
    if not image_root.is_dir():
        raise DataError(image_root, None, "--image-root", "not a folder")
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
) -> Iterator[Sample]:
    """One Sample per sentence of each ref in `split`; images resolved under image_root."""
    image_paths: dict[int, str] = {}
    for ref_id, ref in _in_split(refs, split, refs_path):
        record = f"ref_id={ref_id}"
        image = coco.image(get(ref, "image_id", refs_path, record, int), refs_path, record)
        if image["id"] not in image_paths:
            image_paths[image["id"]] = _image_path(image, image_root, out_dir, coco, refs_path, record)
        targets = masks(ref, image, record)
        for sent_id, text in _sentences(ref, refs_path, record):
            yield (
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


def _image_path(image: dict, image_root: Path, out_dir: Path, coco: CocoInstances, refs_path: Path,
                record: str) -> str:
    """The stored path of a COCO image whose file exists and whose header has instances.json's size."""
    name = Path(image["file_name"])
    if name.is_absolute() or ".." in name.parts:
        raise DataError(coco.path, f"image {image['id']}", "file_name", f"{name} is not a path inside --image-root")
    path = image_root / name
    stored = image_ref(path, out_dir, refs_path, record)
    found = image_size(path, refs_path, record, coco.limits)
    if found != (image["height"], image["width"]):
        problem = (f"{path.name} is {found[0]}x{found[1]} (height x width) but {coco.path.name} says "
                   f"{image['height']}x{image['width']}")
        raise DataError(coco.path, f"image {image['id']}", "height/width", problem)
    return stored


def _in_split(refs: list, split: str, path: Path) -> list[tuple[int, dict]]:
    """(ref_id, ref) for the refs of one split; an empty split is an error, not an empty file."""
    chosen, seen, first = [], set(), {}
    for i, ref in enumerate(refs):
        ref_id = get(ref, "ref_id", path, f"refs[{i}]", int)
        if first.setdefault(ref_id, i) != i:
            raise DataError(path, f"refs[{i}]", "ref_id", f"{ref_id} is also refs[{first[ref_id]}]'s")
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
    out, first = [], {}
    for i, s in enumerate(sentences):
        sent_id = get(s, "sent_id", path, record, int, f"sentences[{i}].sent_id")
        if first.setdefault(sent_id, i) != i:
            raise DataError(path, record, f"sentences[{i}].sent_id", f"{sent_id} is also sentences[{first[sent_id]}]'s")
        text = get(s, "sent", path, record, str, f"sentences[{i}].sent")
        if not text.strip():
            raise DataError(path, record, f"sentences[{i}].sent", "empty sentence")
        out.append((sent_id, text))
    return out


def convert_split(src: Path, split: str, out_dir: Path, image_root: Path | None, limits: Limits = DEFAULT_LIMITS, *,
                  dataset: str) -> Iterator[Sample]:
    """`src` is the dataset folder, or a refs file itself (e.g. refcocog's refs(google).p)."""
    image_root = require_image_root(image_root, dataset)
    refs_path = src if src.is_file() else src / REFS_FILES[dataset]
    refs = load_refs(refs_path)
    coco = CocoInstances(refs_path.parent / "instances.json", limits)

    def masks(ref: dict, image: dict, record: str) -> list[np.ndarray]:
        return [coco.mask(get(ref, "ann_id", refs_path, record, int), image, refs_path, record)]

    return ref_samples(refs_path, refs, coco, split, dataset, image_root, out_dir, masks)
