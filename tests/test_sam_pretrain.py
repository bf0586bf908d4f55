"""Tiny SAM pretraining: prompt sampling and losses, the batched decode, determinism, and the
built SAM's quality, recorded by make-tiny and measured again here through the stock interface."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from data.synthetic.scene import random_scene, rasterise
from models.sam import build_tiny_sam, load_sam, sam_preprocess
from models.sam_pretrain import (
    BOX_JITTER_MAX_PX,
    decode_all,
    dice_loss,
    draw_objects,
    embed_prompts,
    focal_loss,
    jitter_box,
    mask_box,
    mask_iou,
    mask_loss,
    noisy_mask_prompts,
    pretrain_sam,
    prompt_losses,
    sample_point,
    train_step,
)
from models.tiny_specs import TinySamPretrainSpec, TinySamSpec

SMALL = TinySamSpec(image_size=48, patch_size=8, encoder_dim=16, encoder_depth=1, prompt_dim=16, decoder_mlp_dim=16)
masks = arrays(bool, st.tuples(st.integers(4, 40), st.integers(4, 40))).filter(lambda m: m.any())


@given(masks, st.integers(0, 2**32 - 1))
def test_sampled_point_lies_inside_the_mask(mask, seed):
    x, y = sample_point(mask, np.random.default_rng(seed))
    assert mask[int(y), int(x)]


@given(masks)
def test_box_is_the_masks_inclusive_extent(mask):
    x0, y0, x1, y1 = mask_box(mask).astype(int)
    ys, xs = np.nonzero(mask)
    assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())


@given(masks, st.integers(0, 2**32 - 1))
def test_jittered_box_stays_ordered_inside_the_image_and_near_the_box(mask, seed):
    size = max(mask.shape)
    box = mask_box(mask)
    jittered = jitter_box(box, np.random.default_rng(seed), size)
    assert (jittered >= 0).all() and (jittered <= size - 1).all()
    assert jittered[0] <= jittered[2] and jittered[1] <= jittered[3]
    assert np.abs(jittered - box).max() <= BOX_JITTER_MAX_PX + 1e-4


def test_box_jitter_is_about_a_tenth_of_the_side():
    mask = rasterise("square", 32, 32, 10, 64)  # 16 px wide
    box = mask_box(mask)
    rng = np.random.default_rng(0)
    noise = np.stack([jitter_box(box, rng, 64) - box for _ in range(2000)])
    assert abs(noise.mean()) < 0.1 and 1.3 < noise.std() < 1.9  # std 1.6 px: 10% of 16


@given(st.integers(0, 2**32 - 1))
@settings(max_examples=20, deadline=None)
def test_noisy_mask_prompt_is_a_coarse_mask_that_favours_the_object(seed):
    scene = random_scene(np.random.default_rng(seed), 64)
    target = torch.from_numpy(np.stack([s.mask for s in scene.shapes]))
    logits = noisy_mask_prompts(target, np.random.default_rng(seed), grid=8, side=32)
    assert logits.shape == (len(target), 32, 32) and torch.isfinite(logits).all()
    low = torch.nn.functional.adaptive_avg_pool2d(target[:, None].float(), 32)[:, 0] > 0.5
    inside = (logits * low).flatten(1).sum(1) / low.flatten(1).sum(1)
    outside = (logits * ~low).flatten(1).sum(1) / (~low).flatten(1).sum(1)
    assert (inside > outside).all()


@given(arrays(bool, (2, 12, 12)), arrays(np.float32, (2, 12, 12), elements=st.floats(-8, 8, width=32)))
def test_a_confident_right_mask_has_the_least_loss(target, logits):
    t, z = torch.from_numpy(target).float(), torch.from_numpy(logits)
    right = 30 * (2 * t - 1)
    assert (focal_loss(z, t) >= 0).all() and (dice_loss(z, t) >= 0).all()
    assert (mask_loss(right, t) <= mask_loss(z, t) + 1e-5).all()
    assert (mask_loss(right, t) < 1e-4).all()


@given(arrays(bool, (3, 10, 10)), arrays(bool, (3, 10, 10)))
def test_mask_iou_matches_the_set_definition(pred, gt):
    iou = mask_iou(torch.from_numpy(np.where(pred, 1.0, -1.0)), torch.from_numpy(gt).float())
    for i in range(3):
        union = (pred[i] | gt[i]).sum()
        assert iou[i].item() == pytest.approx((pred[i] & gt[i]).sum() / union if union else 1.0)


def test_ambiguous_prompts_train_their_best_output_and_the_iou_head_its_real_iou():
    target = torch.zeros(2, 16, 16)
    target[:, 4:12, 4:12] = 1
    right, wrong = 30 * (2 * target[0] - 1), -30 * (2 * target[0] - 1)
    masks = torch.stack([torch.stack([wrong, wrong, right, wrong]), torch.stack([right, wrong, wrong, wrong])])
    true_iou = torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    point, box = torch.tensor([[1, 2, 3]]), torch.tensor([[0, 0, 0]])
    loss = prompt_losses(masks, true_iou, target, torch.cat([point, box]), 16)
    assert loss.max() < 1e-4  # the point's best output (2) is right; the box trains output 0, right too
    off = prompt_losses(masks, true_iou + 0.5, target, torch.cat([point, box]), 16)
    assert off.tolist() == pytest.approx([0.25, 0.25], abs=1e-4)  # MSE of the IoU head
    wrong_box = prompt_losses(masks, true_iou, target, torch.tensor([[1, 2, 3], [1, 1, 1]]), 16)
    assert wrong_box[1] > 1


def test_batched_decode_equals_the_stock_decoder():
    torch.manual_seed(0)
    sam = build_tiny_sam(SMALL)
    embedding = sam.image_encoder(torch.randn(1, 3, 48, 48))
    sparse, dense = sam.prompt_encoder(points=None, boxes=torch.tensor([[3.0, 4, 20, 30], [10, 10, 40, 44]]),
                                       masks=None)
    stock, stock_iou = sam.mask_decoder.predict_masks(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense)
    ours, ours_iou = decode_all(sam.mask_decoder, embedding.expand(2, -1, -1, -1), sam.prompt_encoder.get_dense_pe(),
                                sparse, dense)
    torch.testing.assert_close(ours, stock)
    torch.testing.assert_close(ours_iou, stock_iou)


def test_prompts_are_boxes_then_points_and_embed_as_the_stock_encoder():
    rng = np.random.default_rng(3)
    scenes = [random_scene(rng, 48) for _ in range(4)]
    objs = draw_objects(scenes, rng)
    n, b = len(objs), objs.boxes.shape[0]
    assert n == sum(len(s.shapes) for s in scenes) and 0 < b < n
    for i in range(n):
        mask = objs.target[i].bool().numpy()
        if i >= b:
            x, y = objs.points[i - b, 0].int().tolist()
            assert mask[y, x]
    torch.manual_seed(0)
    sam = build_tiny_sam(SMALL)
    sparse, _ = embed_prompts(sam.prompt_encoder, objs, torch.arange(n))
    box_sparse, _ = sam.prompt_encoder(points=None, boxes=objs.boxes, masks=None)
    torch.testing.assert_close(sparse[:b], box_sparse)
    assert (objs.outputs()[:b] == 0).all() and (objs.outputs()[b:] == torch.tensor([1, 2, 3])).all()


def test_a_step_trains_all_three_parts_of_sam():
    torch.manual_seed(0)
    sam = build_tiny_sam(SMALL)
    rng = np.random.default_rng(0)
    loss = train_step(sam, [random_scene(rng, 48) for _ in range(3)], rng, TinySamPretrainSpec())
    loss.backward()
    assert torch.isfinite(loss)
    for part in ("image_encoder", "prompt_encoder.mask_downscaling", "prompt_encoder.point_embeddings.1",
                 "mask_decoder.transformer", "mask_decoder.iou_prediction_head"):
        grads = [p.grad for name, p in sam.named_parameters() if name.startswith(part)]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), part


def test_pretraining_is_deterministic_and_restores_threads():
    quick = replace(TinySamPretrainSpec(), steps=3, batch_images=2, eval_scenes=3)
    threads = torch.get_num_threads()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        sam = build_tiny_sam(SMALL)
        report = pretrain_sam(sam, quick, seed=5, progress=False)
        runs.append((report, sam.state_dict()))
    (a, wa), (b, wb) = runs
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a.box_iou, a.point_iou, a.eval_objects) == (b.box_iou, b.point_iou, b.eval_objects)
    assert a.steps == 3 and a.eval_objects >= 6
    assert torch.get_num_threads() == threads


# ---- the SAM make-tiny built for this session ------------------------------------------------------------------------

def test_make_tiny_records_a_promptable_sam(tiny_workspace):
    sam = tiny_workspace["tiny"]["sam"]
    assert sam["box_iou"] >= 0.90 and sam["point_iou"] >= 0.75
    assert sam["steps"] == tiny_workspace["config"].model.tiny.sam_pretrain.steps and sam["eval_objects"] > 500


@torch.no_grad()
def test_saved_sam_segments_fresh_scenes_from_their_boxes(tiny_workspace):
    """Independent of the pretraining code: the saved folder, SAM's own prompt encoder, mask decoder
    and postprocessing, on scenes from a stream the pretraining never drew from."""
    folder = Path(tiny_workspace["tiny"]["path"]) / "sam"
    sam = load_sam("tiny", folder)
    size = sam.image_encoder.img_size
    rng = np.random.default_rng(20250612)
    ious = []
    for _ in range(30):
        scene = random_scene(rng, size)
        pixels, input_size = sam_preprocess(scene.image, size)
        embedding = sam.image_encoder(pixels[None])
        gt = np.stack([s.mask for s in scene.shapes])
        boxes = torch.tensor([[xs.min(), ys.min(), xs.max(), ys.max()] for ys, xs in (np.nonzero(m) for m in gt)],
                             dtype=torch.float32)
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        low, _ = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=False)
        pred = (sam.postprocess_masks(low, input_size, scene.image.shape[:2]) > sam.mask_threshold)[:, 0].numpy()
        ious += [(p & g).sum() / (p | g).sum() for p, g in zip(pred, gt)]
    assert len(ious) > 80
    assert np.mean(ious) >= 0.88
    assert abs(np.mean(ious) - tiny_workspace["tiny"]["sam"]["box_iou"]) < 0.04
