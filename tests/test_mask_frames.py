"""Image <-> SAM low-res mask frames: a round trip keeps the object where it was."""
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data.features import sam_input_size_of
from data.mask_frames import gt_to_lowres, lowres_gt, lowres_side, lowres_to_image, slot_targets
from models.sam import TinySamSpec, build_tiny_sam


def _box_mask(h, w, y0, y1, x0, x1):
    m = np.zeros((1, h, w), bool)
    m[0, y0:y1, x0:x1] = True
    return m


def test_square_image_maps_by_plain_scaling():
    gt = _box_mask(64, 64, 16, 48, 0, 32)
    low = gt_to_lowres(gt, (64, 64), img_size=64, lowres=32)
    assert low.shape == (1, 32, 32)
    assert torch.all(low[0, 8:24, 0:16] == 1) and low.sum() == 16 * 16


def test_wide_image_is_padded_at_the_bottom():
    gt = _box_mask(32, 64, 0, 32, 32, 64)  # right half of a 32x64 image
    low = gt_to_lowres(gt, (32, 64), img_size=64, lowres=32)
    assert low[0, 16:].sum() == 0  # padding rows
    assert torch.all(low[0, :16, 16:] == 1) and low[0, :16, :16].sum() == 0


def test_round_trip_matches_sam_postprocess():
    sam = build_tiny_sam(TinySamSpec())
    gt = _box_mask(40, 60, 10, 30, 20, 50)
    low = gt_to_lowres(gt, (43, 64), img_size=64, lowres=32)
    logits = (low - 0.5) * 20
    ours = lowres_to_image(logits, (43, 64), (40, 60), img_size=64)
    theirs = sam.postprocess_masks(logits[:, None], (43, 64), (40, 60))[:, 0]
    torch.testing.assert_close(ours, theirs)
    iou = ((ours[0] > 0).numpy() & gt[0]).sum() / ((ours[0] > 0).numpy() | gt[0]).sum()
    assert iou > 0.85


def test_cached_features_give_the_frame():
    gt = _box_mask(40, 60, 10, 30, 20, 50)
    feats = {"sam": torch.zeros(16, 8, 8), "sam_input_size": torch.tensor([43, 64])}
    assert lowres_side(feats["sam"]) == lowres_side(feats["sam"][None]) == 32
    torch.testing.assert_close(lowres_gt(gt, feats, img_size=64), gt_to_lowres(gt, (43, 64), 64, 32))


@given(st.integers(1, 4096), st.integers(1, 4096))
def test_the_cached_input_size_reads_as_a_pair_of_python_ints(h, w):
    got = sam_input_size_of({"sam_input_size": torch.tensor([h, w], dtype=torch.int32)})
    assert got == (h, w) and all(type(v) is int for v in got)


def test_no_target_gives_empty_stack():
    assert gt_to_lowres(np.zeros((0, 10, 10), bool), (10, 10), 64, 32).shape == (0, 32, 32)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 4), st.integers(1, 4), st.integers(0, 2**16))
def test_slot_targets_union_for_one_slot_and_objects_for_many(n_objects, num_slots, seed):
    gen = torch.Generator().manual_seed(seed)
    soft = torch.rand(n_objects, 8, 8, generator=gen) * (torch.rand(n_objects, 1, 1, generator=gen) > 0.3)
    out = slot_targets(soft, num_slots)
    binary = soft >= 0.5
    kept = binary[binary.flatten(1).any(1)]
    assert set(out.unique().tolist()) <= {0.0, 1.0} and all(m.any() for m in out)
    if num_slots == 1 and n_objects > 1:
        assert out.shape[0] == int(binary.any()) and (out.shape[0] == 0 or torch.equal(out[0].bool(), binary.any(0)))
    else:
        assert torch.equal(out.bool(), kept)
