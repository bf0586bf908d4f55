"""A llava-hf checkpoint (tiny, built offline) splits into our vision tower, projector and LM exactly."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer
from upstream_fixtures import write_tiny_llava

from models.policy import load_policy
from models.vision import load_vision_tower


@pytest.fixture(scope="module")
def tiny_llava(tiny_workspace, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava-hf")
    tok = AutoTokenizer.from_pretrained(tiny_workspace["tiny"]["path"])
    return folder, write_tiny_llava(folder, tok), tok


def test_split_model_reproduces_llava_logits(tiny_llava):
    folder, reference, tok = tiny_llava
    tower = load_vision_tower("llava", str(folder))
    policy, ptok = load_policy("llava", str(folder), "<REF_POS>", sae_layer=1)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    ids = tok("<|im_start|>user\n<image>\nfind it<|im_end|>", add_special_tokens=False)["input_ids"]
    image_id = tok.convert_tokens_to_ids("<image>")
    at = ids.index(image_id)
    expanded = ids[:at] + [image_id] * 16 + ids[at + 1:]
    with torch.no_grad():
        want = reference(input_ids=torch.tensor([expanded]), pixel_values=pixels).logits[0]
        feats = tower.feature_fn(tower.encoder, pixels)[0]
        assert feats.shape == (16, 32)  # 4x4 patches, CLS dropped
        got = policy.lm(inputs_embeds=policy.prompt_embeds(ids, feats)[None]).logits[0]
    torch.testing.assert_close(got[:, : want.shape[-1]], want, atol=1e-5, rtol=1e-5)


def test_missing_ref_token_is_added(tiny_llava):
    folder, reference, _ = tiny_llava
    policy, tok = load_policy("llava", str(folder), "<REF_POS>", sae_layer=2)
    assert tok.convert_tokens_to_ids("<REF_POS>") == policy.ref_token_id == reference.config.text_config.vocab_size
    assert policy.lm.get_input_embeddings().weight.shape[0] == len(tok)


def test_unreadable_parts_are_named(tiny_llava, tmp_path):
    folder, _, _ = tiny_llava
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    for shard in broken.glob("*.safetensors"):
        from safetensors.torch import load_file, save_file

        state = {k: v for k, v in load_file(shard).items() if "multi_modal_projector.linear_2" not in k}
        save_file(state, shard)
    with pytest.raises(ValueError, match="projector weights do not fit"):
        load_policy("llava", str(broken), "<SEG>", sae_layer=1)
