"""SegCompass head: shapes, gradients into every trainable part and none into frozen ones, and
heatmaps that keep following the <SEG> state and the SAE concepts whatever scale training gives either path."""
from __future__ import annotations

import pytest
import torch

from models.sae import SparseAutoencoder
from models.sam import TinySamSpec, build_tiny_sam
from models.seghead import SegCompassHead

LM_DIM = 48


def _head(num_slots):
    torch.manual_seed(0)
    sam = build_tiny_sam(TinySamSpec())
    sae = SparseAutoencoder(LM_DIM, 96)
    return SegCompassHead(sae, sam, LM_DIM, num_slots=num_slots, codebook_dim=32, top_k=4), sam


@pytest.mark.parametrize("num_slots, n_ref", [(1, 1), (4, 1), (4, 4), (3, 5)])
def test_output_shapes(num_slots, n_ref):
    head, sam = _head(num_slots)
    emb = torch.randn(32, 8, 8)
    out = head(torch.randn(n_ref, LM_DIM), torch.randn(n_ref, LM_DIM), emb)
    assert out.mask_logits.shape == (num_slots, 32, 32)
    assert out.heatmaps.shape == (num_slots, 32, 32)
    assert out.conf_logits.shape == (num_slots,) and out.iou_pred.shape == (num_slots,)
    assert out.sae_ids.shape == (n_ref, 4) and out.sae_acts.shape == (n_ref, 4)
    assert torch.all(out.sae_acts[:, :-1] >= out.sae_acts[:, 1:])


def test_gradients_reach_trainable_parts_only():
    head, sam = _head(2)
    ref = torch.randn(2, LM_DIM, requires_grad=True)
    layer = torch.randn(2, LM_DIM, requires_grad=True)
    out = head(ref, layer, torch.randn(32, 8, 8))
    (out.mask_logits.mean() + out.conf_logits.sum() + out.heatmaps.mean()).backward()
    for group, module in head.param_modules().items():
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), group
    assert not any(p.requires_grad for p in head.sae.parameters())
    assert all(p.grad is None for p in sam.image_encoder.parameters())
    assert ref.grad.abs().sum() > 0 and layer.grad.abs().sum() > 0  # the LM is trained through the head


def test_no_reference_token_is_a_clear_error():
    head, _ = _head(1)
    with pytest.raises(ValueError, match="no reference token"):
        head(torch.zeros(0, LM_DIM), torch.zeros(0, LM_DIM), torch.randn(32, 8, 8))


def test_weak_sae_activations_are_dropped():
    head, _ = _head(1)
    ref, emb = torch.randn(1, LM_DIM), torch.randn(32, 8, 8)
    layer_a, layer_b = torch.randn(1, LM_DIM) * 20, torch.randn(1, LM_DIM) * 20
    kept_a, kept_b = head(ref, layer_a, emb), head(ref, layer_b, emb)
    assert (kept_a.heatmaps - kept_b.heatmaps).abs().max() > 1e-4  # concepts steer the heatmaps
    head.act_threshold = 1e9
    gone_a, gone_b = head(ref, layer_a, emb), head(ref, layer_b, emb)
    assert torch.equal(gone_a.heatmaps, gone_b.heatmaps) and torch.equal(gone_a.mask_logits, gone_b.mask_logits)


def test_heatmap_prompts_reach_the_mask_logits():
    """A SAM mask prompt must steer the decoder (a 1-channel LayerNorm in its path would erase it)."""
    head, _ = _head(1)
    ref, layer = torch.randn(1, LM_DIM), torch.randn(1, LM_DIM)
    out = head(ref, layer, torch.randn(32, 8, 8))
    out.mask_logits.sum().backward()
    assert head.codebook.weight.grad.abs().sum() > 0
    assert head.slot_mapper.slots.grad.abs().sum() > 0


def test_decode_per_prompt_equals_sam_decoder_one_prompt_at_a_time():
    from models.sam import decode_per_prompt

    _, sam = _head(1)
    torch.manual_seed(1)
    emb, dense = torch.randn(3, 32, 8, 8), torch.randn(3, 32, 8, 8)
    sparse = torch.randn(3, 2, 32)
    pe = sam.prompt_encoder.get_dense_pe()
    masks, iou = decode_per_prompt(sam.mask_decoder, emb, pe, sparse, dense)
    for i in range(3):
        low, pred = sam.mask_decoder(image_embeddings=emb[i:i + 1], image_pe=pe,
                                     sparse_prompt_embeddings=sparse[i:i + 1],
                                     dense_prompt_embeddings=dense[i:i + 1], multimask_output=False)
        assert torch.allclose(masks[i], low[0, 0], atol=1e-5) and torch.allclose(iou[i], pred[0, 0], atol=1e-5)


@pytest.mark.parametrize("num_slots", [1, 3])
def test_batch_decode_equals_one_sample_at_a_time(num_slots):
    """Uneven reference counts are padded in the slot mixer: a sample's result must not depend on its batch."""
    head, _ = _head(num_slots)
    torch.manual_seed(2)
    counts = [1, 3, 2]
    refs = [torch.randn(n, LM_DIM) for n in counts]
    layers = [torch.randn(n, LM_DIM) for n in counts]
    embs = [torch.randn(32, 8, 8) for _ in counts]
    batch = head.decode_batch(refs, layers, embs)
    for ref, layer, emb, out in zip(refs, layers, embs, batch):
        alone = head(ref, layer, emb)
        for field in ("mask_logits", "conf_logits", "heatmaps", "iou_pred", "sae_acts"):
            assert torch.allclose(getattr(out, field), getattr(alone, field), atol=1e-5), field
        assert torch.equal(out.sae_ids, alone.sae_ids)


def _rotated_change(head, rotate_ref: bool, rotate_layer: bool, field: str = "heatmaps") -> float:
    """How much ``field`` moves when four samples' reference states are rotated among them (each keeps its
    image): mean |change| over the mean spread of the field within a sample."""
    torch.manual_seed(3)
    refs = [torch.randn(1, LM_DIM) for _ in range(4)]
    layers = [torch.randn(1, LM_DIM) * 5 for _ in range(4)]  # strong enough to pass the SAE
    embs = [torch.randn(32, 8, 8) for _ in range(4)]
    turn = [1, 2, 3, 0]
    with torch.no_grad():
        own = head.decode_batch(refs, layers, embs)
        moved = head.decode_batch([refs[j] for j in turn] if rotate_ref else refs,
                                  [layers[j] for j in turn] if rotate_layer else layers, embs)
    change = sum((getattr(a, field) - getattr(b, field)).abs().mean() for a, b in zip(own, moved))
    return float(change / sum(getattr(a, field).std() for a in own))


def _grow(module: torch.nn.Module, factor: float) -> None:
    """Scale the first linear map in ``module`` (weight and bias): its output grows ``factor``-fold."""
    linear = next(m for m in module.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        linear.weight.mul_(factor)
        linear.bias.mul_(factor)


@pytest.mark.parametrize("grown, signal", [("slot path", "seg state"), ("seg state", "concepts")])
def test_neither_fusion_input_drowns_the_other_however_large_it_grows(grown, signal):
    """SFT grew the slot mapper's output from norm 8 to ~1,700 while the projected <SEG> state stayed
    near 17; under one LayerNorm shared by both, swapping <SEG> states between samples then moved the
    mask logits by 0.004 and GRPO's mask reward could not reward naming the right object. Here one
    path is grown 1,000-fold (the slot path through the mixer's last output layer, the <SEG> state
    through its projection): the other must keep at least half its pull on the heatmaps. A drowned
    path keeps under 1% of it (shared LayerNorm: 0.7% and 0.2%); a path the fusion sees at unit scale
    keeps all of it, give or take what the grown layer changes."""
    head, _ = _head(1)
    mapper = head.slot_mapper
    rotation = {"seg state": (True, False), "concepts": (False, True)}[signal]
    before = _rotated_change(head, *rotation)
    assert before > 0.1  # both paths steer the heatmaps of a fresh head
    _grow(mapper.mixer.layers[-1].linear2 if grown == "slot path" else mapper.ref_proj, 1000.0)
    assert _rotated_change(head, *rotation) >= 0.5 * before


def test_head_weights_of_other_shapes_are_a_one_line_error(tmp_path):
    import json

    from safetensors.torch import save_file

    from models.segmenter import load_head_weights

    class Head(torch.nn.Module):
        kind = "segcompass"

        def __init__(self, width: int):
            super().__init__()
            self.proj = torch.nn.Linear(width, 4)

    (tmp_path / "head").mkdir()
    (tmp_path / "head" / "config.json").write_text(json.dumps({"kind": "segcompass"}))
    save_file(Head(8).state_dict(), tmp_path / "head" / "model.safetensors")
    assert load_head_weights(Head(8), tmp_path)
    with pytest.raises(ValueError) as caught:
        load_head_weights(Head(6), tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "size mismatch for proj.weight" in message and "older segrl" in message
