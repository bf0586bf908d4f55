"""READ as a selectable head: call contract, gradients, build, SFT steps, checkpoints (no Ray)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests_support import encode_images, overrides_for
from torch.nn import functional as F

from config import load_config
from config.builders import build_segmenter, feature_store, head_spec
from data.loader import SegDataset
from data.schema import read_samples, resolve_image
from data.synthetic import sft_target
from models.heads import HEADS
from models.image_grid import TokenGrid, token_grid
from models.optim import build_optimizer, param_groups
from models.prompt import prompt_ids
from models.read import similarity_map
from models.read_head import ReadHead
from models.sae import SparseAutoencoder
from models.sam import TinySamSpec, build_tiny_sam, load_sam
from models.seghead import SegCompassHead
from models.segmenter import Segmenter, save_segmenter
from pipelines.sft import sft_step

LM_DIM = 48
N_ITEMS = 6
SQUARE = TokenGrid(8, 8, padded_square=True)  # the tiny tower's 64 tokens


def _head():
    torch.manual_seed(0)
    sam = build_tiny_sam(TinySamSpec())
    return ReadHead(sam, LM_DIM), sam


# ------------------------------------------------------------------ the head alone


@pytest.mark.parametrize("n_ref, grid", [(1, SQUARE), (3, SQUARE), (1, TokenGrid(4, 16, padded_square=False))])
def test_output_shapes_and_heatmap_is_the_upsampled_similarity_map(n_ref, grid):
    head, _ = _head()
    ref, image = torch.randn(n_ref, LM_DIM), torch.randn(64, LM_DIM)
    out = head(ref, image, torch.randn(32, 8, 8), grid)
    assert out.mask_logits.shape == out.heatmaps.shape == (1, 32, 32)
    assert out.conf_logits.shape == out.iou_pred.shape == (1,)
    assert out.sae_ids.shape == out.sae_acts.shape == (n_ref, 0)
    sim = similarity_map(ref[0], image, (grid.rows, grid.cols))
    expected = F.interpolate(sim[None, None], size=(32, 32), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out.heatmaps, expected)


def test_gradients_reach_projection_decoder_and_lm_side_not_sam_encoder():
    head, sam = _head()
    ref = torch.randn(1, LM_DIM, requires_grad=True)
    out = head(ref, torch.randn(64, LM_DIM), torch.randn(32, 8, 8), SQUARE)
    out.mask_logits.mean().backward()
    for part in (head.projection, head.mask_decoder, head.prompt_encoder.point_embeddings):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert ref.grad.abs().sum() > 0  # the LM is trained through the projected <SEG> state
    assert all(p.grad is None for p in sam.image_encoder.parameters())
    assert not any(p is q for p in head.parameters() for q in sam.image_encoder.parameters())


def test_no_reference_token_and_non_square_grid_are_clear_errors():
    head, _ = _head()
    with pytest.raises(ValueError, match="no reference token"):
        head(torch.zeros(0, LM_DIM), torch.randn(64, LM_DIM), torch.randn(32, 8, 8), SQUARE)
    assert token_grid(torch.randn(60, LM_DIM)) is None
    with pytest.raises(ValueError, match="60 image tokens are not a square grid"):
        head(torch.randn(1, LM_DIM), torch.randn(60, LM_DIM), torch.randn(32, 8, 8), None)


def test_the_mask_follows_the_similarity_points():
    head, _ = _head()
    ref, embedding = torch.randn(1, LM_DIM), torch.randn(32, 8, 8)
    image = torch.randn(64, LM_DIM)
    with torch.no_grad():
        base = head(ref, image, embedding, SQUARE).mask_logits
        again = head(ref, image.clone(), embedding, SQUARE).mask_logits
        moved = head(ref, torch.roll(image, 9, dims=0), embedding, SQUARE).mask_logits  # the peaks move elsewhere
    torch.testing.assert_close(base, again)
    assert not torch.allclose(base, moved)


def test_a_non_square_image_gets_its_points_inside_its_part_of_the_frame(monkeypatch):
    """Qwen2.5-VL's 4 x 6 token grid of a wide image, and a square-padding tower's 8 x 8 one: SAM's
    prompt encoder sees points only inside the image's 64 x 40 part of its 64-pixel frame."""
    head, _ = _head()
    seen = []
    encode = head.prompt_encoder.forward
    monkeypatch.setattr(head.prompt_encoder, "forward",
                        lambda points, boxes, masks: seen.append(points) or encode(points, boxes, masks))
    with torch.no_grad():
        head(torch.randn(1, LM_DIM), torch.randn(24, LM_DIM), torch.randn(32, 8, 8),
             TokenGrid(4, 6, padded_square=False), (40, 64))
        head(torch.randn(1, LM_DIM), torch.randn(64, LM_DIM), torch.randn(32, 8, 8), SQUARE, (40, 64))
    for coords, labels in seen:
        placed = coords[0][labels[0] >= 0]
        assert len(placed) and (placed[:, 0] <= 63).all() and (placed[:, 1] <= 39).all() and (placed >= 0).all()


def test_neutral_points_carry_no_location():
    """READ's neutral points (label -1) fill the budget; SAM's prompt encoder ignores where they are."""
    _, sam = _head()
    coords = torch.tensor([[[3.0, 4.0], [20.0, 9.0]]])
    labels = torch.tensor([[1, -1]])
    moved = coords.clone()
    moved[0, 1] = torch.tensor([60.0, 61.0])
    with torch.no_grad():
        base, _ = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        same, _ = sam.prompt_encoder(points=(moved, labels), boxes=None, masks=None)
        moved[0, 0] = torch.tensor([60.0, 61.0])
        other, _ = sam.prompt_encoder(points=(moved, labels), boxes=None, masks=None)
    torch.testing.assert_close(base, same)
    assert not torch.allclose(base, other)


def test_a_batch_decodes_each_sample_as_it_decodes_alone_in_one_decoder_call_per_point_count():
    """Batching is a speed-up only: a sample's mask, heatmap and IoU are the same in any batch, and
    samples whose grids give other point counts (25 cells: 25 points, not 30) are decoded apart."""
    head, _ = _head()
    grids = [SQUARE, TokenGrid(5, 5, padded_square=True), SQUARE, TokenGrid(4, 16, padded_square=False)]
    refs = [torch.randn(1 + i % 2, LM_DIM, requires_grad=True) for i in range(len(grids))]
    images = [torch.randn(g.rows * g.cols, LM_DIM) for g in grids]
    embeddings = [torch.randn(32, 8, 8) for _ in grids]
    calls = []
    hook = head.mask_decoder.transformer.register_forward_hook(lambda m, args, out: calls.append(args[2].shape))
    batch = head.decode_batch(refs, images, grids, embeddings)
    hook.remove()
    # tokens: SAM's 5 output tokens, the points, the padding point SAM adds without a box, the <SEG> projection
    assert sorted(tuple(c[:2]) for c in calls) == [(1, 5 + 25 + 1 + 1), (3, 5 + 30 + 1 + 1)]
    for i, out in enumerate(batch):
        alone = head(refs[i], images[i], embeddings[i], grids[i])
        for field in ("mask_logits", "heatmaps", "iou_pred", "conf_logits"):
            torch.testing.assert_close(getattr(out, field), getattr(alone, field), atol=1e-5, rtol=1e-5)
    sum(o.mask_logits.sum() for o in batch).backward()
    assert all(r.grad is not None and r.grad[0].abs().sum() > 0 for r in refs)


def test_param_groups_cope_with_reads_roles():
    head, _ = _head()
    multipliers = {"query_codebook": 25.0, "slot_mapper": 80.0, "mask_decoder": 10.0}
    groups = param_groups(head.param_modules(), 1e-3, multipliers)
    assert {g["name"].split("/")[0] for g in groups} == {"mask_decoder"}
    assert all(g["lr"] == pytest.approx(1e-2) for g in groups)


# ------------------------------------------------- config, build, SFT, checkpoints


def test_kind_registry_matches_the_config_key():
    assert set(HEADS.names()) == {"segcompass", "read"}
    assert load_config().model.head.kind == "segcompass"


@pytest.fixture(scope="module")
def read_config(tiny_workspace, tmp_path_factory):
    """kind=read on the tiny workspace; no SAE anywhere, features in a private cache."""
    tmp = tmp_path_factory.mktemp("read")
    base = tiny_workspace["config"]
    return load_config("configs/tiny.yaml", overrides_for(base) + [
        "model.head.kind=read", f"model.sae.path={tmp}/no-sae", f"paths.cache_dir={tmp}/cache"])


@pytest.fixture(scope="module")
def items(read_config):
    """The first train items, their features encoded here (no Ray Data); some have a target."""
    c = read_config
    split = Path(c.resolve_path(c.data.root)) / "train.parquet"
    encoders, _ = encode_images(c, [resolve_image(split, s.image_path) for s in read_samples(split)[:N_ITEMS]])
    data = SegDataset(split, feature_store(c), encoders.sam_size, limit=N_ITEMS)
    out = [data[i] for i in range(N_ITEMS)]
    assert sum(not it.sample.no_target for it in out) >= 2
    return out


def test_build_segmenter_makes_a_read_head_without_an_sae(read_config):
    model, _, _ = build_segmenter(read_config)
    assert isinstance(model.head, ReadHead) and not hasattr(model.head, "sae")
    assert set(model.param_modules()) == {"lm", "projector", "mask_decoder"}
    groups = param_groups(model.param_modules(), 1e-3, read_config.optim.lr_multipliers.model_dump())
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_segmenter_feeds_image_states_in_one_forward_and_skips_responses_without_ref(read_config, items):
    torch.manual_seed(0)
    model, tokenizer, _ = build_segmenter(read_config)
    ref = read_config.model.ref_token
    item = next(it for it in items if not it.sample.no_target)
    prompt = prompt_ids(tokenizer, item.sample.question, ref)
    with_ref = tokenizer(sft_target(item.sample, ref), add_special_tokens=False)["input_ids"]
    without = tokenizer("<think>nothing here</think> No such object.", add_special_tokens=False)["input_ids"]
    calls = []
    model.policy.lm.model.register_forward_hook(lambda *_: calls.append(1))
    out, heads = model([prompt, prompt], [item.vision] * 2, [with_ref, without], [item.sam_embedding] * 2)
    assert len(calls) == 1 and heads[1] is None and heads[0] is not None
    grid = out.image_grids[0]
    assert grid.padded_square and grid.rows * grid.cols == out.image_hidden[0].shape[0]
    sim = similarity_map(out.ref_hidden[0][0], out.image_hidden[0], (grid.rows, grid.cols))
    side = 4 * item.sam_embedding.shape[-1]
    expected = F.interpolate(sim[None, None], size=(side, side), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(heads[0].heatmaps, expected)
    heads[0].mask_logits.mean().backward()
    for module in (model.policy.lm, model.head.projection, model.head.mask_decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_sft_steps_lower_the_loss_then_checkpoint_round_trips(read_config, items, tmp_path):
    torch.manual_seed(0)
    model, tokenizer, _ = build_segmenter(read_config)
    optimizer = build_optimizer(param_groups(model.param_modules(), 1e-3, {"mask_decoder": 4.0}))
    losses = []
    for _ in range(6):
        loss, metrics = sft_step(model, tokenizer, items, read_config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(metrics)
    assert losses[-1]["loss"] < losses[0]["loss"] and losses[-1]["seg"] < losses[0]["seg"]

    source = read_config.resolve_path(read_config.model.name_or_path)
    ckpt = save_segmenter(model, head_spec(read_config), tokenizer, source, tmp_path / "ckpt")
    assert json.loads((ckpt / "head" / "config.json").read_text())["kind"] == "read"
    reloaded, _, _ = build_segmenter(read_config, str(ckpt))
    saved, loaded = model.head.state_dict(), reloaded.head.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_loading_a_head_of_the_other_kind_is_a_clear_error(read_config, tmp_path):
    model, tokenizer, _ = build_segmenter(read_config)
    source = read_config.resolve_path(read_config.model.name_or_path)
    sam = load_sam("tiny", Path(source) / "sam")
    hidden = model.policy.lm.config.hidden_size
    segcompass = Segmenter(model.policy, SegCompassHead(SparseAutoencoder(hidden, 2 * hidden), sam, hidden))
    ckpt = save_segmenter(segcompass, head_spec(read_config), tokenizer, source, tmp_path / "segcompass")
    with pytest.raises(ValueError, match=r"holds a 'segcompass' head, but model.head.kind is 'read'"):
        build_segmenter(read_config, str(ckpt))
    config = json.loads((ckpt / "head" / "config.json").read_text())
    del config["kind"]  # written before READ was a head (and before manifests): a SegCompass checkpoint
    (ckpt / "head" / "config.json").write_text(json.dumps(config))
    (ckpt / "manifest.json").unlink()
    with pytest.raises(ValueError, match="holds a 'segcompass' head"):
        build_segmenter(read_config, str(ckpt))
