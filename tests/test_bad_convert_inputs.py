"""`segrl convert` on careless and hostile upstream files (ReasonSeg, RefCOCO, gRefCOCO): each is
refused with exit status 2 and one line naming the file, the record or the field; an existing
output is kept and nothing is written half-way."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from refusals import nothing_written, png_header, refuse
from upstream_fixtures import (
    H,
    W,
    grefs,
    instances,
    reasonseg_ann,
    refer_refs,
    write_grefcoco,
    write_reasonseg,
    write_refer,
)

from pipelines.cli import main

TINY_FILE = Path("configs/tiny.yaml").resolve()

def _convert(fmt, src, out, image_root=None, *extra):
    argv = ["convert", fmt, str(src), *extra, "--split", "train", "--out", str(out), "--config", str(TINY_FILE)]
    return argv + (["--image-root", str(image_root)] if image_root is not None else [])


def test_convert_reasonseg_with_an_image_root(tmp_path, capsys):
    src = write_reasonseg(tmp_path, reasonseg_ann())
    refuse(_convert("reasonseg", src, tmp_path / "o.parquet", tmp_path), capsys, "--image-root", "not used")
    nothing_written(tmp_path, "o.parquet")


def test_convert_refcoco_without_an_image_root(tmp_path, capsys):
    src, _ = write_refer(tmp_path, refer_refs(), instances())
    refuse(_convert("refcoco", src, tmp_path / "o.parquet"), capsys, "--image-root", "required")
    nothing_written(tmp_path, "o.parquet")


def test_convert_out_is_a_folder(tmp_path, capsys):
    src = write_reasonseg(tmp_path, reasonseg_ann())
    (tmp_path / "out").mkdir()
    refuse(_convert("reasonseg", src, tmp_path / "out"), capsys, "out", "--out", "is a folder")
    (tmp_path / "file").write_text("x")
    refuse(_convert("reasonseg", src, tmp_path / "file" / "o.parquet"), capsys, "--out", "is a file, not a folder")


@pytest.mark.parametrize("width, height, fragment", [(30000, 30000, "DecompressionBombError"),
                                                     (12000, 12000, "exceeds the cap")])
def test_convert_an_image_header_claiming_a_huge_size(tmp_path, capsys, width, height, fragment):
    src = write_reasonseg(tmp_path, reasonseg_ann(), split="train")
    (src / "train" / "img1.jpg").write_bytes(png_header(width, height))
    refuse(_convert("reasonseg", src, tmp_path / "o.parquet"), capsys, "img1.json", "record img1", "image", fragment)
    nothing_written(tmp_path, "o.parquet")


def test_the_pixel_cap_is_configurable(tmp_path, capsys):
    src = write_reasonseg(tmp_path, reasonseg_ann())
    refuse(_convert("reasonseg", src, tmp_path / "o.parquet", None, f"data.max_mask_pixels={H * W}"), capsys,
           "img1.json", f"exceeds the cap of {H * W}", "data.max_mask_pixels")
    assert main(_convert("reasonseg", src, tmp_path / "o.parquet", None, f"data.max_mask_pixels={2 * H * W}")) == 0


def _instances(mutate) -> dict:
    inst = instances()
    mutate(inst)
    return inst


def _image(i, **fields):
    return lambda inst: inst["images"][i].update(fields)


def _polygon(i, flat):
    return lambda inst: inst["annotations"][i].update(segmentation=[flat])


BAD_INSTANCES = {
    "10^6 x 10^6 image": (_image(0, height=10**6, width=10**6), "record image 1", "height/width", "exceeds the cap"),
    "size disagrees with the image": (_image(0, height=H + 1), "record image 1", "height/width",
                                      f"is {H}x{W} (height x width) but instances.json says {H + 1}x{W}"),
    "boolean height": (_image(0, height=True), "record image 1", "field 'height'"),
    "coordinates 4e8": (_polygon(0, [10, 5, 4e8, 5, 30, 20, 10, 20]), "record annotation 10", "segmentation[0]",
                        "point 1 (4e+08, 5) lies off the 64x48 image"),
    "negative coordinates": (_polygon(0, [10, 5, -1e6, 5, 30, 20]), "record annotation 10", "point 1"),
    "nan as string": (_polygon(0, [10, 5, "nan", 5, 30, 20]), "record annotation 10", "expected two finite numbers"),
    "file name out of the image root": (_image(0, file_name="../../../etc/hostname"), "record image 1",
                                         "field 'file_name'", "not a path inside --image-root"),
}


@pytest.mark.parametrize("case", BAD_INSTANCES)
def test_convert_hostile_instances(case, tmp_path, capsys):
    mutate, *fragments = BAD_INSTANCES[case]
    src, images = write_refer(tmp_path, refer_refs(), _instances(mutate))
    refuse(_convert("refcoco", src, tmp_path / "o.parquet", images), capsys, "instances.json", *fragments)
    nothing_written(tmp_path, "o.parquet")


def test_convert_duplicate_grefcoco_annotations(tmp_path, capsys):
    refs = grefs()
    refs[1]["ann_id"] = [11, 12, 11]
    src, images = write_grefcoco(tmp_path, refs)
    refuse(_convert("grefcoco", src, tmp_path / "o.parquet", images), capsys, "grefs(unc).json", "record ref_id=201",
           "field 'ann_id'", "[11] listed more than once")
    nothing_written(tmp_path, "o.parquet")


@pytest.mark.parametrize("repeat", ["ref_id", "sent_id"])
def test_convert_repeated_ids(repeat, tmp_path, capsys):
    refs = refer_refs()
    if repeat == "ref_id":
        refs[3]["ref_id"] = 100
        fragments = ("record refs[3]", "field 'ref_id'", "100 is also refs[0]'s")
    else:
        refs[0]["sentences"][1]["sent_id"] = 1000
        fragments = ("record ref_id=100", "field 'sentences[1].sent_id'", "1000 is also sentences[0]'s")
    src, images = write_refer(tmp_path, refs, instances())
    refuse(_convert("refcoco", src, tmp_path / "o.parquet", images), capsys, "refs(unc).p", *fragments)
    nothing_written(tmp_path, "o.parquet")


@pytest.mark.parametrize("damage", ["truncated", "bit flip", "code", "not a list"])
def test_convert_damaged_refs_pickle(damage, tmp_path, capsys, monkeypatch):
    raw = pickle.dumps(refer_refs(), protocol=2)
    payload = {"truncated": raw[: len(raw) // 2],
               "bit flip": raw[:2] + bytes([raw[2] ^ 0xFF]) + raw[3:],
               "code": b"cos\nsystem\n(S'touch pwned'\ntR.",
               "not a list": pickle.dumps({"refs": 1})}[damage]
    src, images = write_refer(tmp_path, payload, instances())
    monkeypatch.chdir(tmp_path)
    refuse(_convert("refcoco", src, tmp_path / "o.parquet", images), capsys, "refs(unc).p")
    assert not (tmp_path / "pwned").exists()
    nothing_written(tmp_path, "o.parquet")


@pytest.mark.parametrize("damage", ["truncated", "nested 10^5 deep"])
def test_convert_unparseable_instances(damage, tmp_path, capsys):
    text = json.dumps(instances())
    text = text[: len(text) // 2] if damage == "truncated" else "[" * 10**5 + "]" * 10**5
    src, images = write_refer(tmp_path, refer_refs(), text)
    refuse(_convert("refcoco", src, tmp_path / "o.parquet", images), capsys, "instances.json", "invalid JSON")


def test_convert_keeps_an_existing_output_when_it_fails(tmp_path, capsys):
    src = write_reasonseg(tmp_path, reasonseg_ann())
    out = tmp_path / "o.parquet"
    assert main(_convert("reasonseg", src, out)) == 0
    before = out.read_bytes()
    (src / "train" / "img2.json").write_text("{ truncated")
    capsys.readouterr()
    refuse(_convert("reasonseg", src, out), capsys, "img2.json", "invalid JSON")
    assert out.read_bytes() == before
    nothing_written(tmp_path, "unused")


