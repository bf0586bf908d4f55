"""Converters on tiny fixtures in each upstream format, and on broken ones."""
from __future__ import annotations

import json
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from upstream_fixtures import (
    COMPRESSED,
    CROWD,
    H2,
    W2,
    H,
    W,
    grefs,
    instances,
    reasonseg_ann,
    rect,
    refer_refs,
    write_grefcoco,
    write_reasonseg,
    write_refer,
)

from data.converters import CONVERTERS, convert
from data.converters.grefcoco import convert_split as grefcoco_split
from data.schema import DataError, read_samples, resolve_image


def box(mask):
    """(x0, y0, x1, y1) of the set pixels, inclusive."""
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max(), ys.max()


def raises_naming(fn, *fragments):
    """Call fn, expect a DataError whose message holds every fragment."""
    with pytest.raises(DataError) as err:
        fn()
    msg = str(err.value)
    assert all(f in msg for f in fragments), msg


# ---------------------------------------------------------------- ReasonSeg


def test_reasonseg_masks_ignore_and_flag(tmp_path):
    src = write_reasonseg(tmp_path, reasonseg_ann())
    out = convert("reasonseg", src, "train", tmp_path / "out" / "train.parquet")
    samples = read_samples(out)
    assert [(s.sample_id, s.question) for s in samples] == [
        ("img1:0", "what keeps the papers together?"),
        ("img1:1", "segment the stapler"),
    ]
    s = samples[0]
    assert (s.height, s.width, s.is_sentence, s.answer_type, s.no_target) == (H, W, True, "single", False)
    (target,) = s.masks
    assert target.sum() == 300 - 16 and box(target) == (10, 5, 29, 19)
    assert s.ignore_mask.sum() == 16 and box(s.ignore_mask) == (12, 7, 15, 10)
    assert not (target & s.ignore_mask).any()
    assert not target[30:41, 40:51].any() and not s.ignore_mask[30:41, 40:51].any()  # flag dropped
    assert not Path(s.image_path).is_absolute()
    assert resolve_image(out, s.image_path).resolve() == (src / "train" / "img1.jpg").resolve()


def test_reasonseg_smaller_shape_wins_over_larger(tmp_path):
    ann = reasonseg_ann()
    ann["shapes"] = [
        {"label": "target", "points": rect(20, 10, 23, 13)},  # 16 px, painted last
        {"label": "ignore", "points": rect(0, 0, 39, 29)},  # 1200 px, painted first
    ]
    (s, _) = read_samples(convert("reasonseg", write_reasonseg(tmp_path, ann), "train", tmp_path / "t.parquet"))
    assert s.masks[0].sum() == 16 and s.ignore_mask.sum() == 1200 - 16


def test_reasonseg_eval_split_keeps_first_text_and_null_ignore(tmp_path):
    ann = reasonseg_ann()
    ann["shapes"] = ann["shapes"][:1]
    ann["is_sentence"] = False
    src = write_reasonseg(tmp_path, ann, split="val")
    samples = read_samples(convert("reasonseg", src, "val", tmp_path / "v.parquet"))
    assert [(s.sample_id, s.question, s.split, s.is_sentence) for s in samples] == [
        ("img1:0", "what keeps the papers together?", "val", False)
    ]
    assert samples[0].ignore_mask is None and samples[0].masks[0].sum() == 300


def test_reasonseg_reads_cp1252_json(tmp_path):
    ann = reasonseg_ann()
    ann["text"] = ["the caf\u00e9\u2019s sign"]
    src = write_reasonseg(tmp_path, ann)
    (src / "train" / "img1.json").write_bytes(json.dumps(ann, ensure_ascii=False).encode("cp1252"))
    (s,) = read_samples(convert("reasonseg", src, "train", tmp_path / "t.parquet"))
    assert s.question == "the caf\u00e9\u2019s sign"


def test_reasonseg_rejects_image_root(tmp_path):
    with pytest.raises(DataError, match="--image-root"):
        convert("reasonseg", write_reasonseg(tmp_path, reasonseg_ann()), "train", tmp_path / "t.parquet", tmp_path)


def _points(i, points):
    return lambda a: a["shapes"][i].__setitem__("points", points)


REASONSEG_BROKEN = {
    "missing text": (lambda a: a.pop("text"), "'text'"),
    "missing is_sentence": (lambda a: a.pop("is_sentence"), "'is_sentence'"),
    "shapes not a list": (lambda a: a.__setitem__("shapes", {"a": 1}), "'shapes'"),
    "missing label": (lambda a: a["shapes"][1].pop("label"), "'shapes[1].label'"),
    "two points": (_points(0, [[1, 1], [5, 5]]), "'shapes[0].points'"),
    "non-numeric point": (_points(0, [[1, 1], ["a", 5], [5, 9]]), "'shapes[0].points'"),
    "NaN point": (_points(0, [[1, 1], [float("nan"), 5], [5, 9]]), "'shapes[0].points'"),
    "empty text": (lambda a: a["text"].__setitem__(1, " "), "'text[1]'"),
    "only ignore": (lambda a: a["shapes"].pop(0), "'shapes'"),
}


@pytest.mark.parametrize("case", REASONSEG_BROKEN)
def test_reasonseg_malformed_record(tmp_path, case):
    mutate, field = REASONSEG_BROKEN[case]
    ann = reasonseg_ann()
    mutate(ann)
    src = write_reasonseg(tmp_path, ann)
    raises_naming(lambda: convert("reasonseg", src, "train", tmp_path / "t.parquet"), "img1.json", "record img1", field)


def test_reasonseg_malformed_files(tmp_path):
    out = tmp_path / "t.parquet"
    truncated = write_reasonseg(tmp_path / "a", json.dumps(reasonseg_ann())[:-20])
    raises_naming(lambda: convert("reasonseg", truncated, "train", out), "img1.json", "invalid JSON")
    no_image = write_reasonseg(tmp_path / "b", reasonseg_ann(), image=False)
    raises_naming(lambda: convert("reasonseg", no_image, "train", out), "img1.json: record img1: field 'image'")
    raises_naming(lambda: convert("reasonseg", no_image, "test", out), "test: split folder not found")


# ---------------------------------------------------------------- REFER


@pytest.mark.parametrize("fmt", ["refcoco", "refcoco+", "refcocog"])
def test_refer_splits_and_masks(tmp_path, fmt):
    refs_name = "refs(umd).p" if fmt == "refcocog" else "refs(unc).p"
    src, images = write_refer(tmp_path, refer_refs(), instances(), refs_name)
    out = {
        split: read_samples(convert(fmt, src, split, tmp_path / "out" / f"{split}.parquet", images))
        for split in ("train", "val", "testA")
    }
    assert [s.sample_id for s in out["train"]] == ["100:1000", "100:1001", "103:1030"]
    assert {k: len(v) for k, v in out.items()} == {"train": 3, "val": 1, "testA": 2}
    rectangle, two_part, crowd = out["train"][0], out["val"][0], out["testA"][1]
    assert (rectangle.dataset, rectangle.question, rectangle.image_id) == (fmt, "the thing 1000", "1")
    assert rectangle.masks[0].sum() == 300 and box(rectangle.masks[0]) == (10, 5, 29, 19)
    (merged,) = two_part.masks
    assert merged.shape == (H2, W2) and merged.sum() == 200
    assert merged[0:10, 0:10].all() and merged[20:30, 20:30].all()
    assert np.array_equal(crowd.masks[0], CROWD) and crowd.answer_type == "single" and not crowd.no_target
    image = resolve_image(tmp_path / "out" / "val.parquet", two_part.image_path)
    assert image.resolve() == (images / "COCO_train2014_000000000002.jpg").resolve()


def test_refer_accepts_a_refs_file_and_needs_image_root(tmp_path):
    src, images = write_refer(tmp_path, refer_refs(), instances(), "refs(google).p")
    assert len(read_samples(convert("refcocog", src / "refs(google).p", "val", tmp_path / "v.parquet", images))) == 1
    with pytest.raises(DataError, match="--image-root"):
        convert("refcoco", src, "val", tmp_path / "v.parquet")


def test_unknown_split_and_format(tmp_path):
    src, images = write_refer(tmp_path, refer_refs(), instances())
    out = tmp_path / "t.parquet"
    raises_naming(lambda: convert("refcoco", src, "testB", out, images), "refs(unc).p: field 'split'", "'testB'")
    with pytest.raises(ValueError, match="unknown dataset format 'coco'"):
        convert("coco", src, "val", out, images)
    assert set(CONVERTERS) == {"reasonseg", "refcoco", "refcoco+", "refcocog", "grefcoco"}


def _seg(i, mutate):
    return lambda refs, inst: mutate(inst["annotations"][i]["segmentation"])


REFS, INST = "refs(unc).p", "instances.json"
REFER_BROKEN = {
    "ann_id unknown": (lambda r, i: r[0].__setitem__("ann_id", 999), REFS, "ref_id=100", "'ann_id'", "train"),
    "image_id unknown": (lambda r, i: r[0].__setitem__("image_id", 77), REFS, "ref_id=100", "'image_id'", "train"),
    "ann on other image": (lambda r, i: r[0].__setitem__("ann_id", 11), REFS, "ref_id=100", "'image_id'", "train"),
    "no sentences": (lambda r, i: r[0].pop("sentences"), REFS, "ref_id=100", "'sentences'", "train"),
    "no sent": (lambda r, i: r[0]["sentences"][1].pop("sent"), REFS, "ref_id=100", "'sentences[1].sent'", "train"),
    "no ref_id": (lambda r, i: r[2].pop("ref_id"), REFS, "refs[2]", "'ref_id'", "train"),
    "two points": (
        _seg(0, lambda s: s.__setitem__(0, [1, 1, 5, 5])),
        INST,
        "annotation 10",
        "'segmentation[0]'",
        "train",
    ),
    "NaN": (_seg(0, lambda s: s[0].__setitem__(3, float("nan"))), INST, "annotation 10", "'segmentation[0]'", "train"),
    "non-numeric": (_seg(0, lambda s: s[0].__setitem__(2, "30")), INST, "annotation 10", "'segmentation[0]'", "train"),
    "odd length": (_seg(0, lambda s: s[0].pop()), INST, "annotation 10", "'segmentation[0]'", "train"),
    "no segmentation": (
        lambda r, i: i["annotations"][0].pop("segmentation"),
        INST,
        "annotation 10",
        "'segmentation'",
        "train",
    ),
    "no height": (lambda r, i: i["images"][0].pop("height"), INST, "image 1", "'height'", "train"),
    "no ann id": (lambda r, i: i["annotations"][1].pop("id"), INST, "annotations[1]", "'id'", "train"),
    "RLE size": (
        _seg(2, lambda s: s.__setitem__("size", [H2 + 1, W2])),
        INST,
        "annotation 12",
        "'segmentation.size'",
        "testA",
    ),
    "RLE runs": (_seg(2, lambda s: s["counts"].append(3)), INST, "annotation 12", "'segmentation.counts'", "testA"),
    "RLE garbage": (
        _seg(2, lambda s: s.__setitem__("counts", "")),
        INST,
        "annotation 12",
        "'segmentation.counts'",
        "testA",
    ),
}


@pytest.mark.parametrize("case", REFER_BROKEN)
def test_refer_malformed_record(tmp_path, case):
    mutate, file, record, field, split = REFER_BROKEN[case]
    refs, inst = refer_refs(), instances()
    mutate(refs, inst)
    src, images = write_refer(tmp_path, refs, inst)
    convert_it = lambda: convert("refcoco", src, split, tmp_path / "t.parquet", images)  # noqa: E731
    raises_naming(convert_it, file, f"record {record}", f"field {field}")


REFER_BROKEN_FILES = {
    "truncated pickle": (lambda: (pickle.dumps(refer_refs(), protocol=2)[:-30], instances()), "not a readable pickle"),
    "class in pickle": (lambda: (pickle.dumps([OrderedDict(ref_id=1)]), instances()), "collections.OrderedDict"),
    "refs not a list": (lambda: (pickle.dumps({"refs": []}), instances()), "expected a list of refs"),
    "truncated instances": (lambda: (refer_refs(), json.dumps(instances())[:-40]), "instances.json: invalid JSON"),
}


@pytest.mark.parametrize("case", REFER_BROKEN_FILES)
def test_refer_malformed_files(tmp_path, case):
    make, fragment = REFER_BROKEN_FILES[case]
    src, images = write_refer(tmp_path, *make())
    raises_naming(lambda: convert("refcoco", src, "train", tmp_path / "t.parquet", images), str(src), fragment)


def test_refer_missing_image_file(tmp_path):
    src, images = write_refer(tmp_path, refer_refs(), instances(), images=False)
    raises_naming(lambda: convert("refcoco", src, "train", tmp_path / "t.parquet", images), "field '--image-root'",
                  "not a folder")
    images.mkdir(parents=True)
    raises_naming(
        lambda: convert("refcoco", src, "train", tmp_path / "t.parquet", images),
        "refs(unc).p: record ref_id=100: field 'image': image file not found",
        "COCO_train2014_000000000001.jpg",
    )


# ---------------------------------------------------------------- gRefCOCO


@pytest.mark.parametrize("name", ["grefs(unc).json", "grefs(unc).p"])
def test_grefcoco_single_multi_and_no_target(tmp_path, name):
    src, images = write_grefcoco(tmp_path, grefs(), name)
    samples = {s.sample_id: s for s in read_samples(convert("grefcoco", src, "train", tmp_path / "g.parquet", images))}
    assert list(samples) == ["200:2000", "201:2010", "201:2011", "202:2020"]
    single, multi, none = samples["200:2000"], samples["201:2011"], samples["202:2020"]
    assert single.answer_type == "single" and single.masks[0].sum() == 300
    assert multi.answer_type == "multi" and [m.sum() for m in multi.masks] == [200, 60, 50]  # per object
    assert np.array_equal(multi.masks[1], CROWD) and np.array_equal(multi.masks[2], COMPRESSED)
    assert none.no_target and none.masks == [] and none.answer_type == "no_target"
    assert (none.height, none.width, none.dataset) == (H, W, "grefcoco")


GREF_BROKEN = {
    "ann_id not a list": (lambda r: r[0].__setitem__("ann_id", 10), "ref_id=200", "'ann_id'"),
    "empty ann_id": (lambda r: r[0].__setitem__("ann_id", []), "ref_id=200", "'ann_id'"),
    "unknown ann in multi": (lambda r: r[1].__setitem__("ann_id", [11, 999]), "ref_id=201", "'ann_id'"),
    "[-1] but no_target false": (lambda r: r[2].__setitem__("no_target", False), "ref_id=202", "'no_target'"),
    "no_target with targets": (lambda r: r[0].__setitem__("no_target", True), "ref_id=200", "'no_target'"),
    "missing split": (lambda r: r[1].pop("split"), "ref_id=201", "'split'"),
}


@pytest.mark.parametrize("case", GREF_BROKEN)
def test_grefcoco_malformed_record(tmp_path, case):
    mutate, record, field = GREF_BROKEN[case]
    refs = grefs()
    mutate(refs)
    src, images = write_grefcoco(tmp_path, refs)
    convert_it = lambda: convert("grefcoco", src, "train", tmp_path / "t.parquet", images)  # noqa: E731
    raises_naming(convert_it, "grefs(unc).json", f"record {record}", f"field {field}")


def test_grefcoco_truncated_json(tmp_path):
    src, images = write_grefcoco(tmp_path, json.dumps(grefs())[:-15])
    convert_it = lambda: convert("grefcoco", src, "train", tmp_path / "t.parquet", images)  # noqa: E731
    raises_naming(convert_it, "grefs(unc).json: invalid JSON")


def test_round_trip_preserves_every_field(tmp_path):
    src, images = write_grefcoco(tmp_path, grefs())
    direct = list(grefcoco_split(src, "train", tmp_path, images))
    back = read_samples(convert("grefcoco", src, "train", tmp_path / "rt.parquet", images))
    assert [a.to_row() for a in direct] == [b.to_row() for b in back]
