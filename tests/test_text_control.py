"""bench/text_control.py: the text-only control trains the tiny LM on scenes given as text and scores val."""
from __future__ import annotations

import math

import pytest
from transformers import AutoTokenizer

from bench import text_control
from data.synthetic.answers import conclusion


def test_the_prompt_holds_every_shape_of_the_scene_and_the_question(tiny_workspace):
    config = tiny_workspace["config"]
    tokenizer = AutoTokenizer.from_pretrained(config.resolve_path(config.model.name_or_path))
    for sample in text_control.text_samples("val", 12, config.seed, 64, "<SEG>"):
        text = tokenizer.decode(text_control.prompt_ids(tokenizer, sample, "<SEG>"))
        assert "<image>" not in text and sample["question"] in text
        for name in conclusion(sample["scene"]).names:  # the scene sentence lists every shape
            assert " ".join(name[:3]) + " at the " + name[3] in text
        answer_named = conclusion(sample["reasoning"]).names
        assert set(answer_named) <= set(conclusion(sample["scene"]).names)  # the answer is in the prompt


def test_a_short_control_run_scores_every_val_sample(tiny_workspace):
    config = tiny_workspace["config"]
    result = text_control.run(config, steps=3, n_train=24, n_val=10)
    assert result["steps"] == 3 and result["train_samples"] == 24
    assert math.isfinite(result["last_loss"]) and result["last_loss"] > 0
    assert sum(total for _, total in result["by_kind"].values()) == 10
    assert all(0 <= right <= total for right, total in result["by_kind"].values())
    assert result["reasoning_acc"] == pytest.approx(sum(r for r, _ in result["by_kind"].values()) / 10)
