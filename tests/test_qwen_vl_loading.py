"""A Qwen2.5-VL checkpoint (tiny, built offline) splits into cached tower states, merger and M-RoPE LM exactly."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from upstream_fixtures import qwen_style_tokenizer, write_tiny_qwen_vl

from models.policy import load_policy
from models.prompt import prompt_ids
from models.qwen_vl import mrope_positions
from models.vision import load_vision_tower

PIXELS = (64, 64 * 64)  # min, max pixels: 40x60 -> 40x64 px -> 10x16 patches (patch 4)


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_5_vl")
    tok = qwen_style_tokenizer()
    return folder, write_tiny_qwen_vl(folder, tok), tok


@pytest.fixture(scope="module")
def split(tiny_qwen):
    folder = str(tiny_qwen[0])
    policy, tok = load_policy("qwen2_5_vl", folder, "<SEG>", sae_layer=1)
    return policy, tok, load_vision_tower("qwen2_5_vl", folder, PIXELS)


def _reference(model, ids, image_token_id, img):
    """HF's own forward: processor pixels, the placeholder expanded to <|image_pad|> x N, its rope index."""
    batch = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=PIXELS[0],
                                     max_pixels=PIXELS[1])(images=[img], return_tensors="pt")
    pad = model.config.image_token_id
    at = ids.index(image_token_id)
    expanded = torch.tensor([ids[:at] + [pad] * int(batch["image_grid_thw"].prod() // 4) + ids[at + 1:]])
    with torch.no_grad():
        return model(input_ids=expanded, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                     mm_token_type_ids=(expanded == pad).int(), output_hidden_states=True), batch["image_grid_thw"][0]


def test_split_model_reproduces_qwen_logits(tiny_qwen, split):
    _, reference, _ = tiny_qwen
    policy, tok, tower = split
    img = _image(40, 60)
    feats = tower([img])[0]
    ids = prompt_ids(tok, "find the red ring")
    want, grid = _reference(reference, ids, policy.image_token_id, img)
    assert feats.shape == (1, 10, 16, 32) and grid.tolist() == [1, 10, 16]  # non-square grid, pre-merger dim
    with torch.no_grad():
        embeds = policy.prompt_embeds(ids, feats)[None]
        positions = policy.positions(ids, policy.image_token_id, feats)
        got = policy.lm(inputs_embeds=embeds, position_ids=positions[:, None]).logits
        flat = policy.lm(inputs_embeds=embeds).logits
    assert (got - want.logits).abs().max() <= 1e-5
    assert (flat - want.logits).abs().max() > 1e-4  # 1-D positions would not do


def test_policy_forward_passes_mrope_positions(tiny_qwen, split):
    _, reference, _ = tiny_qwen
    policy, tok, tower = split
    images = [_image(40, 60), _image(64, 24, seed=1)]  # wide and tall grids in one padded batch
    feats = tower(images)
    prompts = [prompt_ids(tok, "find the red ring"), prompt_ids(tok, "what could roll?")]
    responses = [tok("<think>it rolls</think> <SEG>", add_special_tokens=False)["input_ids"],
                 tok("<SEG>", add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        out = policy(prompts, feats, responses)
    for i, (ids, resp, img) in enumerate(zip(prompts, responses, images)):
        want, _ = _reference(reference, ids + resp, policy.image_token_id, img)
        n, length = len(resp), want.logits.shape[1]
        logp = want.logits[0, length - n - 1 : length - 1].log_softmax(-1)
        torch.testing.assert_close(out.logprobs[i, :n], logp[torch.arange(n), resp], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.layer_hidden[i, :length], want.hidden_states[1][0], atol=1e-5, rtol=1e-5)
        s, e = out.image_spans[i]
        assert e - s == feats[i].shape[1] * feats[i].shape[2] // 4
        grid = out.image_grids[i]  # READ's points: the merged grid over the whole image, not square
        assert (grid.rows, grid.cols, grid.padded_square) == (feats[i].shape[1] // 2, feats[i].shape[2] // 2, False)
        torch.testing.assert_close(out.image_hidden[i], want.hidden_states[-1][0, s:e], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid", [(1, 4, 4), (1, 6, 10), (1, 10, 4), (1, 2, 2)])
def test_positions_equal_hf_rope_index(tiny_qwen, grid):
    _, reference, tok = tiny_qwen
    image, pad = 400, reference.config.image_token_id  # any id not in the text stands for the placeholder
    text = tok("<|im_start|>user\nfind it", add_special_tokens=False)["input_ids"]
    after = tok(" please<|im_end|>\n<think>ok</think>", add_special_tokens=False)["input_ids"]
    ours = mrope_positions(text + [image] + after, image, grid, spatial_merge_size=2)
    expanded = torch.tensor([text + [pad] * (grid[1] * grid[2] // 4) + after])
    hf, _ = reference.model.get_rope_index(expanded, (expanded == pad).int(), torch.tensor([grid]))
    assert torch.equal(ours, hf[:, 0])


def test_cache_holds_the_patch_grid_per_image(split):
    from config import load_config
    from config.builders import encoder_sources

    _, _, tower = split
    images = [_image(40, 60), _image(64, 24, seed=1)]
    batch = tower(images)
    assert [tuple(f.shape) for f in batch] == [(1, 10, 16, 32), (1, 16, 6, 32)]
    for img, feats in zip(images, batch):  # packed together, the images do not see each other
        torch.testing.assert_close(tower([img])[0], feats, atol=1e-5, rtol=1e-5)
    config = load_config("configs/qwen25vl-7b-grefcoco.yaml")
    assert encoder_sources(config)[-1] == "pixels=3136,705600"  # bounds change the grid: part of the cache key


def test_missing_tokens_are_added_without_shrinking_the_padded_vocab(tiny_qwen, split):
    _, reference, tok = tiny_qwen
    policy, ptok, _ = split
    assert "<image>" not in tok.get_vocab() and "<SEG>" not in tok.get_vocab()
    assert (policy.image_token_id, policy.ref_token_id) == (len(tok), len(tok) + 1)
    rows = reference.config.text_config.vocab_size
    assert rows > len(ptok) and policy.lm.get_input_embeddings().weight.shape[0] == rows


def test_unpadded_tied_checkpoint_grows_and_stays_tied(tmp_path):
    tok = qwen_style_tokenizer()
    reference = write_tiny_qwen_vl(tmp_path, tok, vocab_padding=0, tie=True)
    policy, ptok = load_policy("qwen2_5_vl", str(tmp_path), "<SEG>", sae_layer=2)
    embed = policy.lm.get_input_embeddings().weight
    assert embed.shape[0] == len(ptok) == len(tok) + 2
    assert policy.lm.lm_head.weight.data_ptr() == embed.data_ptr()
    torch.testing.assert_close(embed[: len(tok)], reference.lm_head.weight, atol=0, rtol=0)


def test_transformers_4_key_layout_loads_the_same(tiny_qwen, split, tmp_path):
    """transformers 4.5x saved `model.visual.*` and `model.language_model.*`."""
    from safetensors.torch import load_file, save_file

    folder, _, _ = tiny_qwen
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    for shard in tmp_path.glob("*.safetensors"):
        state = load_file(shard)
        save_file({("model." + k if k.startswith("visual.") else
                    "model.language_model." + k[6:] if k.startswith("model.") else k): v for k, v in state.items()},
                  shard)
    policy, _ = load_policy("qwen2_5_vl", str(tmp_path), "<SEG>", sae_layer=1)
    tower = load_vision_tower("qwen2_5_vl", str(tmp_path), PIXELS)
    want_policy, _, want_tower = split
    for got, want in ((policy.lm, want_policy.lm), (policy.projector, want_policy.projector),
                      (tower.encoder, want_tower.encoder)):
        assert got.state_dict().keys() == want.state_dict().keys()
        assert all(torch.equal(got.state_dict()[k], v) for k, v in want.state_dict().items())


def test_unsupported_inputs_and_checkpoints_are_named(tiny_qwen, split, tmp_path):
    folder, _, _ = tiny_qwen
    policy, _, _ = split
    with pytest.raises(ValueError, match="only still images"):
        mrope_positions([1, 7, 2], 7, (2, 4, 4), 2)
    with pytest.raises(ValueError, match="not divisible by spatial_merge_size 2"):
        mrope_positions([1, 7, 2], 7, (1, 5, 4), 2)
    with pytest.raises(ValueError, match="exactly one image token"):
        mrope_positions([7, 7], 7, (1, 4, 4), 2)
    with pytest.raises(ValueError, match=r"\[t, h, w, D\] patch grid"):
        policy.projector(torch.zeros(16, 32))
    with pytest.raises(NotImplementedError, match="vLLM rollout"):
        policy.lm.generate(inputs_embeds=torch.zeros(1, 3, 64))

    other = tmp_path / "qwen2-vl"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"model_type": "qwen2_vl"}))
    with pytest.raises(ValueError, match="'qwen2_vl' is not a Qwen2.5-VL checkpoint"):
        load_policy("qwen2_5_vl", str(other), "<SEG>", sae_layer=1)

    broken = tmp_path / "no-merger"
    shutil.copytree(folder, broken)
    from safetensors.torch import load_file, save_file

    for shard in broken.glob("*.safetensors"):
        save_file({k: v for k, v in load_file(shard).items() if ".merger.mlp.2" not in k}, shard)
    with pytest.raises(ValueError, match=r"projector \(visual.merger\) weights do not fit"):
        load_policy("qwen2_5_vl", str(broken), "<SEG>", sae_layer=1)
