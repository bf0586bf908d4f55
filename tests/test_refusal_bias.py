"""bench/refusal_bias.py: a greedy eval with the conclusion's " no" pushed up by a constant."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import refusal_bias
from models.tokenizer import train_tokenizer

VOCAB = 12


@settings(max_examples=50, deadline=None, database=None)
@given(rows=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6), min_size=1, max_size=5),
       bias=st.floats(-5, 5, allow_nan=False))
def test_the_bias_lands_on_the_token_exactly_where_the_context_ends_a_row(rows, bias):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])  # left-padded, as generate does
    scores = torch.randn(len(rows), VOCAB)
    context, token = [3, 4], 5
    got = refusal_bias.RefusalBias(context, token, bias)(ids, scores.clone())
    for i, row in enumerate(ids.tolist()):
        expected = scores[i].clone()
        if row[-2:] == context:
            expected[token] += bias
        assert torch.equal(got[i], expected)


def test_the_decision_tokens_are_the_ones_the_reasoning_uses(tiny_workspace):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_workspace["tiny"]["path"])
    context, token = refusal_bias.decision_tokens(tokenizer)
    assert [tokenizer.decode([t]) for t in context] == [" There", " is"] and tokenizer.decode([token]) == " no"
    reasoning = tokenizer("The question asks for the star. There is no star in the image.",
                          add_special_tokens=False)["input_ids"]
    at = reasoning.index(token)
    assert reasoning[at - 2:at] == context


def test_a_tokenizer_that_splits_the_decision_otherwise_is_refused_by_name():
    tokenizer = train_tokenizer(["a b c"] * 4, vocab_size=300)
    with pytest.raises(ValueError, match="' There', ' is', ' no' expected"):
        refusal_bias.decision_tokens(tokenizer)


def test_without_a_bias_the_sweep_scores_what_the_eval_scores(tiny_workspace, tiny_sae, monkeypatch):
    """The bias is consulted at every generated token, and a zero bias changes no answer."""
    from config.builders import build_segmenter, feature_store
    from data.loader import SegDataset
    from pipelines.evaluate import evaluate_with_config

    consulted = []
    plain_call = refusal_bias.RefusalBias.__call__
    monkeypatch.setattr(refusal_bias.RefusalBias, "__call__",
                        lambda self, ids, scores: consulted.append(ids.shape) or plain_call(self, ids, scores))
    config, checkpoint = tiny_workspace["config"], tiny_workspace["tiny"]["path"]
    swept = refusal_bias.sweep(config, checkpoint, "val", 6, [0.0])
    assert consulted and consulted[0][0] == 6  # one batch of the 6 samples, from its first generated token
    model, tokenizer, img_size = build_segmenter(config, checkpoint)
    dataset = SegDataset(Path(config.resolve_path(config.data.root)) / "val.parquet", feature_store(config), img_size,
                         limit=6)
    plain = evaluate_with_config(config, model, tokenizer, dataset, img_size, progress=False).metrics
    assert swept[0.0] == pytest.approx(plain, nan_ok=True)
