"""Policy: one forward captures logprobs and hidden states that equal a plain second forward."""
from __future__ import annotations

import pytest
import torch

from models.policy import load_policy
from models.prompt import prompt_ids, prompt_text


@pytest.fixture(scope="module")
def policy(tiny_workspace):
    torch.manual_seed(0)
    return load_policy("tiny", tiny_workspace["tiny"]["path"], "<SEG>", sae_layer=2)


def _batch(policy_and_tok, n_patches=64, dv=64):
    pol, tok = policy_and_tok
    g = torch.Generator().manual_seed(1)
    questions = ["the shape that could roll", "every red square"]
    prompts = [prompt_ids(tok, q) for q in questions]
    feats = [torch.randn(n_patches, dv, generator=g) for _ in questions]
    responses = [
        tok("<think>The circle rolls.</think> <SEG>", add_special_tokens=False)["input_ids"],
        tok("<think>no</think> <SEG> and <SEG>", add_special_tokens=False)["input_ids"],
    ]
    return prompts, feats, responses


def test_prompt_has_one_image_token_and_question(policy):
    _, tok = policy
    text = prompt_text(tok, "what could roll?")
    assert text.count("<image>") == 1 and "what could roll?" in text and text.endswith("assistant\n")


def test_prompt_embeds_splice_projected_features(policy):
    pol, tok = policy
    ids = prompt_ids(tok, "find the ring")
    feats = torch.randn(64, 64)
    emb = pol.prompt_embeds(ids, feats)
    at = ids.index(pol.image_token_id)
    assert emb.shape == (len(ids) - 1 + 64, pol.lm.config.hidden_size)
    torch.testing.assert_close(emb[at : at + 64], pol.projector(feats))
    torch.testing.assert_close(emb[at + 64], pol.embed_tokens(torch.tensor(ids[at + 1])))
    with pytest.raises(ValueError, match="exactly one image token"):
        pol.prompt_embeds([t for t in ids if t != pol.image_token_id], feats)


def test_single_pass_capture_equals_second_forward(policy):
    pol, tok = policy
    prompts, feats, responses = _batch(policy)
    with torch.no_grad():
        out = pol(prompts, feats, responses)
        for i in range(2):
            full = torch.cat([pol.prompt_embeds(prompts[i], feats[i]),
                              pol.embed_tokens(torch.tensor(responses[i]))])[None]
            ref = pol.lm(inputs_embeds=full, output_hidden_states=True)
            logp = ref.logits[0].log_softmax(-1)
            plen = full.shape[1] - len(responses[i])
            expect = torch.stack([logp[plen - 1 + j, t] for j, t in enumerate(responses[i])])
            n = len(responses[i])
            torch.testing.assert_close(out.logprobs[i, :n], expect, atol=1e-5, rtol=1e-5)
            assert torch.all(out.logprobs[i, n:] == 0) and out.response_mask[i].sum() == n
            T = full.shape[1]
            torch.testing.assert_close(out.layer_hidden[i, :T], ref.hidden_states[2][0], atol=1e-5, rtol=1e-5)
            seg_pos = [plen + j for j, t in enumerate(responses[i]) if t == pol.ref_token_id]
            torch.testing.assert_close(out.ref_hidden[i], ref.hidden_states[-1][0, seg_pos], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.layer_ref_hidden[i], ref.hidden_states[2][0, seg_pos], atol=1e-5, rtol=1e-5)
            s, e = out.image_spans[i]
            torch.testing.assert_close(out.image_hidden[i], ref.hidden_states[-1][0, s:e], atol=1e-5, rtol=1e-5)
    assert [h.shape[0] for h in out.ref_hidden] == [1, 2]


def test_previous_ref_position_takes_the_predicting_state(tiny_workspace):
    pol, tok = load_policy("tiny", tiny_workspace["tiny"]["path"], "<SEG>", sae_layer=1, ref_position="previous")
    prompts, feats, responses = _batch((pol, tok))
    with torch.no_grad():
        out = pol(prompts[:1], feats[:1], responses[:1])
        full = torch.cat([pol.prompt_embeds(prompts[0], feats[0]), pol.embed_tokens(torch.tensor(responses[0]))])[None]
        last = pol.lm(inputs_embeds=full, output_hidden_states=True).hidden_states[-1][0]
    plen = full.shape[1] - len(responses[0])
    j = responses[0].index(pol.ref_token_id)
    torch.testing.assert_close(out.ref_hidden[0][0], last[plen + j - 1], atol=1e-5, rtol=1e-5)


def test_gradients_reach_projector_and_lm(policy):
    pol, _ = policy
    prompts, feats, responses = _batch(policy)
    pol.zero_grad()
    out = pol(prompts, feats, responses)
    (out.logprobs.sum() + out.ref_hidden[0].sum() + out.layer_ref_hidden[1].sum()).backward()
    assert pol.projector.net[0].weight.grad.abs().sum() > 0
    assert pol.lm.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert pol.lm.lm_head.weight.grad.abs().sum() > 0
    pol.zero_grad()


def test_bad_layer_and_family_are_named(tiny_workspace):
    with pytest.raises(ValueError, match="sae_layer 9 is outside 1..4"):
        load_policy("tiny", tiny_workspace["tiny"]["path"], "<SEG>", sae_layer=9)
    with pytest.raises(ValueError, match="no policy loader for model family 'gpt'"):
        load_policy("gpt", "x", "<SEG>", sae_layer=1)
