"""The synthetic dataset: masks match what the questions describe, judged from the pixels.

The checks do not trust the generator's own scene objects: they re-read every
image (palette colour -> connected components -> kind and size from geometry),
re-parse every question, and work the answer out again.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from data.schema import read_samples, resolve_image, samples_to_table
from data.synthetic import (
    COLOURS,
    NO_TARGET_ANSWER,
    QUERY_KINDS,
    SPLITS,
    WORDS,
    corpus,
    make_synthetic,
    query_kind,
    random_scene,
    sft_target,
    words,
)
from data.synthetic.generate import draws
from data.synthetic.templates import DIRECTIONS, EXTREMES, FUNCTIONS

N = 40  # per split


def _make(tmp_path_factory, name: str, **kwargs) -> Path:
    out = tmp_path_factory.mktemp(name)
    make_synthetic(out, n_train=N, n_val=N, n_test=N, progress=False, **kwargs)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return _make(tmp_path_factory, "seed0", seed=0)


@pytest.fixture(scope="module")
def samples(data_dir) -> list:
    return [s for split in SPLITS for s in read_samples(data_dir / f"{split}.parquet")]


# ---- an independent reading of the image -------------------------------------------------


@dataclass
class Obj:
    colour: str
    kind: str
    size: str
    mask: np.ndarray

    @property
    def box(self) -> tuple[int, int, int, int]:
        ys, xs = np.nonzero(self.mask)
        return xs.min(), xs.max(), ys.min(), ys.max()

    @property
    def centre(self) -> np.ndarray:
        return np.argwhere(self.mask).mean(axis=0)[::-1]

    @property
    def words(self) -> set[str]:
        return {self.colour, self.kind, self.size}


def classify_kind(m: np.ndarray) -> str:
    ys, xs = np.nonzero(m)
    fill = m.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    if fill > 0.95:
        return "square"
    if not m[(ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2]:
        return "ring"
    upper, lower = (ys < (ys.min() + ys.max()) / 2).sum(), (ys > (ys.min() + ys.max()) / 2).sum()
    return "triangle" if upper < 0.6 * lower else "circle"  # a triangle's apex half holds ~1/4 of it


def objects(image: np.ndarray) -> list[Obj]:
    """Connected components of each palette colour, with kind and size read from geometry."""
    out = []
    for colour, rgb in COLOURS.items():
        labels, n = ndimage.label((image == rgb).all(axis=-1), structure=np.ones((3, 3)))
        for k in range(1, n + 1):
            m = labels == k
            size = "large" if m.sum() > 0.03 * m.size else "small"
            out.append(Obj(colour, classify_kind(m), size, m))
    return out


def members(objs: list[Obj], noun: str) -> list[Obj]:
    if noun.startswith("shape that "):
        kinds = FUNCTIONS[noun.removeprefix("shape that ")][0]
        return [o for o in objs if o.kind in kinds]
    wanted = set(noun.split()) - {"shape"}
    return [o for o in objs if wanted <= o.words]


def _beyond(c: Obj, a: Obj, direction: str) -> bool:
    (cx0, cx1, cy0, cy1), (ax0, ax1, ay0, ay1) = c.box, a.box
    return {"left of": cx1 < ax0, "right of": cx0 > ax1, "above": cy1 < ay0, "below": cy0 > ay1}[direction]


def parse(question: str) -> tuple:
    """('the'|'every', noun) or ('relation', thing, direction, anchor)."""
    q = question.removeprefix("Find ").removesuffix(".")
    d = "|".join(DIRECTIONS)
    if m := re.fullmatch(rf"(?:the|Which) (\w+) (?:is )?({d}) the (.+?)\??", q):
        return ("relation", *m.groups())
    if m := re.fullmatch(rf"What is ({d}) the (.+)\?", q):
        return ("relation", "shape", *m.groups())
    if m := re.fullmatch(r"Which shape (.+)\?", q):
        return ("the", f"shape that {m.group(1)}")
    q = re.sub(r"^Which is (.+)\?$", r"\1", q)
    det, noun = q.split(" ", 1)
    assert det in ("the", "every"), question
    return det, noun


def expected_answer(objs: list[Obj], question: str) -> tuple[list[Obj], Obj | None]:
    """The objects the question asks for (empty: none exist) and the relation anchor, if any."""
    parsed = parse(question)
    if parsed[0] == "relation":
        _, thing, direction, anchor_noun = parsed
        anchors = members(objs, anchor_noun)
        assert len(anchors) <= 1, f"ambiguous anchor in {question!r}"
        if not anchors:
            return [], None
        (anchor,) = anchors
        cands = [o for o in objs if o is not anchor and thing in ("shape", o.kind) and _beyond(o, anchor, direction)]
        dist = [np.linalg.norm(o.centre - anchor.centre) for o in cands]
        return ([cands[int(np.argmin(dist))]] if cands else []), anchor
    det, noun = parsed
    first, _, rest = noun.partition(" ")
    if det == "the" and first in EXTREMES:
        group = members(objs, rest)
        winners = [o for o in group if o.size == EXTREMES[first]]
        assert len(group) >= 2 and len(winners) == 1, f"ambiguous superlative {question!r}"
        return winners, None
    return members(objs, noun), None


# ---- tests -------------------------------------------------------------------------------


def test_masks_match_the_described_objects(data_dir, samples):
    for s in samples:
        image = np.asarray(Image.open(resolve_image(data_dir / "train.parquet", s.image_path)))
        objs = objects(image)
        answer, anchor = expected_answer(objs, s.question)
        if s.no_target:
            assert answer == [] and s.masks == [], s.question
            continue
        det = parse(s.question)[0]
        assert len(answer) >= 2 if det == "every" else len(answer) == 1, s.question
        # Each GT mask is exactly one painted object, and they are the ones asked for.
        got = sorted(np.flatnonzero(m).tobytes() for m in s.masks)
        assert got == sorted(np.flatnonzero(o.mask).tobytes() for o in answer), s.question
        for o in answer:
            assert f"the {o.size} {o.colour} {o.kind} at the" in s.reasoning
        if anchor is not None:
            assert _beyond(answer[0], anchor, parse(s.question)[2])


def test_relation_answers_lie_beyond_their_anchor(data_dir, samples):
    relations = [s for s in samples if query_kind(s.sample_id) == "relation"]
    assert relations
    for s in relations:
        image = np.asarray(Image.open(data_dir / s.image_path))
        _, thing, direction, anchor_noun = parse(s.question)
        (anchor,) = members(objects(image), anchor_noun)
        (mask,) = s.masks
        ys, xs = np.nonzero(mask)
        ax0, ax1, ay0, ay1 = anchor.box
        beyond = {"left of": xs.max() < ax0, "right of": xs.min() > ax1,
                  "above": ys.max() < ay0, "below": ys.min() > ay1}
        assert beyond[direction], s.question


def test_every_query_has_one_mask_per_instance(data_dir, samples):
    multi = [s for s in samples if query_kind(s.sample_id) == "multi_object"]
    assert multi
    for s in multi:
        objs = objects(np.asarray(Image.open(data_dir / s.image_path)))
        assert s.answer_type == "multi"
        assert len(s.masks) == len(members(objs, parse(s.question)[1])) >= 2


def test_false_premises_have_no_mask_and_say_so(samples):
    negatives = [s for s in samples if s.no_target]
    assert negatives and all(query_kind(s.sample_id) == "false_premise" for s in negatives)
    for s in negatives:
        assert s.masks == [] and s.answer_type == "no_target"
        assert "There is no" in s.reasoning


def test_all_query_kinds_occur_and_splits_have_their_size(data_dir, samples):
    assert {query_kind(s.sample_id) for s in samples} == set(QUERY_KINDS)
    for split in SPLITS:
        rows = read_samples(data_dir / f"{split}.parquet")
        assert len(rows) == N and {s.split for s in rows} == {split}
        assert {s.dataset for s in rows} == {"synthetic"}


def test_images_are_relative_present_and_not_shared_across_splits(data_dir, samples):
    by_split = {split: {s.image_id for s in samples if s.split == split} for split in SPLITS}
    assert sum(map(len, by_split.values())) == len(set().union(*by_split.values())) == 3 * N
    for s in samples:
        assert not Path(s.image_path).is_absolute()
        with Image.open(data_dir / s.image_path) as im:
            assert im.size == (s.width, s.height) == (64, 64) and im.mode == "RGB"


def test_round_trip_through_parquet_is_lossless(data_dir):
    path = data_dir / "val.parquet"
    assert samples_to_table(read_samples(path)).equals(pq.read_table(path))


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path_factory, data_dir):
    again, other = _make(tmp_path_factory, "again", seed=0), _make(tmp_path_factory, "other", seed=1)
    files = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (data_dir / f).read_bytes() == (again / f).read_bytes(), f
    assert (data_dir / "train.parquet").read_bytes() != (other / "train.parquet").read_bytes()
    assert (data_dir / "images/train-00000.png").read_bytes() != (other / "images/train-00000.png").read_bytes()


def test_query_weights_select_kinds(tmp_path):
    make_synthetic(tmp_path, n_train=10, n_val=0, n_test=0, query_weights={"superlative": 1.0}, progress=False)
    rows = read_samples(tmp_path / "train.parquet")
    assert {query_kind(s.sample_id) for s in rows} == {"superlative"}
    assert read_samples(tmp_path / "val.parquet") == []
    with pytest.raises(ValueError, match="unknown query kind"):
        make_synthetic(tmp_path, query_weights={"colour": 1.0})
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic(tmp_path, image_size=16)


def test_sft_target_structure(samples):
    for s in samples:
        target = sft_target(s)
        m = re.fullmatch(r"<think>(.+)</think> (.+)", target)
        assert m and m.group(1) == s.reasoning
        assert target.count("<SEG>") == (0 if s.no_target else 1)
        assert m.group(2) == (NO_TARGET_ANSWER if s.no_target else "<SEG>")
    assert sft_target(samples[0], ref_token="[REF]").count("[REF]") == (0 if samples[0].no_target else 1)


def test_corpus_stays_inside_the_vocabulary(data_dir, samples):
    texts = corpus(data_dir)
    assert len(texts) == 3 * len(samples)
    assert {s.question for s in samples} <= set(texts)
    emitted = {w for t in texts for w in words(re.sub(r"</?think>|<SEG>", " ", t))}
    assert emitted <= set(WORDS), emitted - set(WORDS)


def test_corpus_reads_only_the_sets_own_splits(data_dir, tmp_path):
    """An experiment's extra split beside the set's files must not retrain the tokenizer."""
    for split in SPLITS:
        (tmp_path / f"{split}.parquet").write_bytes((data_dir / f"{split}.parquet").read_bytes())
    before = corpus(tmp_path)
    extra = [replace(s, question="an unseen question") for s in read_samples(data_dir / "train.parquet")[:5]]
    pq.write_table(samples_to_table(extra), tmp_path / "rl.parquet")
    assert corpus(tmp_path) == before == corpus(data_dir)
    for split in SPLITS:
        (tmp_path / f"{split}.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="train.parquet, val.parquet, test.parquet"):
        corpus(tmp_path)


@settings(max_examples=30, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1), image_size=st.integers(48, 128))
def test_rasterised_masks_are_disjoint_nonempty_and_exactly_painted(seed, image_size):
    scene = random_scene(np.random.default_rng(seed), image_size)
    assert 2 <= len(scene.shapes) <= 5
    cover = np.zeros((image_size, image_size), dtype=int)
    for shape in scene.shapes:
        assert shape.mask.any()
        cover += shape.mask
    assert cover.max() == 1
    for colour, rgb in COLOURS.items():
        painted = (scene.image == rgb).all(axis=-1)
        union = np.zeros_like(painted)
        for shape in scene.shapes:
            if shape.colour == colour:
                union |= shape.mask
        assert (painted == union).all()
    # Read back from the pixels alone, each shape has the kind and size it was drawn with.
    read = sorted((o.colour, o.kind, o.size) for o in objects(scene.image))
    assert read == sorted((s.colour, s.kind, s.size) for s in scene.shapes)


def test_the_draw_stream_is_the_written_split(data_dir):
    """`draws` is what make_synthetic writes, sample for sample, so a control built on the stream
    (bench/text_control.py) sees the dataset's own val questions and answers."""
    for split in SPLITS:
        written = read_samples(data_dir / f"{split}.parquet")
        drawn = list(itertools.islice(draws(split, seed=0), len(written)))
        assert [(query_kind(s.sample_id), s.question, s.reasoning) for s in written] == \
            [(kind, q.question, q.reasoning) for kind, _, q in drawn]
        assert all(np.array_equal(s.gt_stack, np.stack([scene.shapes[t].mask for t in q.targets]))
                   for s, (_, scene, q) in zip(written, drawn) if q.targets)
