"""bench/grpo_memorize.py: GRPO on a fixed handful of training prompts, every step each of them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import grpo_memorize
from data.schema import read_samples, resolve_image
from pipelines.grpo.reward_trend import RewardTrend


def _train_file(config) -> Path:
    return Path(config.resolve_path(config.data.root)) / "train.parquet"


def test_the_split_holds_the_first_k_samples_with_their_images_wherever_it_lies(tiny_workspace, tmp_path):
    config = tiny_workspace["config"]
    train = read_samples(_train_file(config))
    written = grpo_memorize.prompt_split(_train_file(config), 5, tmp_path / "elsewhere")
    assert written == tmp_path / "elsewhere" / "memorize.parquet"
    got = read_samples(written)
    assert [s.sample_id for s in got] == [s.sample_id for s in train[:5]]
    for mine, theirs in zip(got, train):
        assert Path(mine.image_path).is_absolute()
        assert resolve_image(written, mine.image_path).read_bytes() == \
            resolve_image(_train_file(config), theirs.image_path).read_bytes()
        assert (mine.question, mine.reasoning, mine.no_target) == (theirs.question, theirs.reasoning, theirs.no_target)
        assert len(mine.masks) == len(theirs.masks)
        assert all(np.array_equal(a, b) for a, b in zip(mine.masks, theirs.masks))


@pytest.mark.parametrize("k", [0, 41])
def test_a_prompt_count_outside_the_training_split_is_refused(tiny_workspace, tmp_path, k):
    with pytest.raises(ValueError, match=r"--prompts must lie in \[1, 40\]"):
        grpo_memorize.prompt_split(_train_file(tiny_workspace["config"]), k, tmp_path)
    assert not (tmp_path / "memorize.parquet").exists()


def test_every_step_trains_one_group_of_each_prompt_and_nothing_else_changes(tmp_path):
    config = grpo_memorize.variant_config("configs/tiny.yaml", ["seed=3"], ("seg_loss.seg_coef=0",), tmp_path, 12,
                                          30, "no-seg-loss")
    assert config.data.root == str(tmp_path) and config.data.train_split == "memorize"
    assert config.grpo.prompts_per_step == 12
    assert config.train.steps == config.optim.total_steps == 30
    assert config.train.eval_samples == 0
    assert config.train.output == str(tmp_path / "no-seg-loss")
    assert config.seg_loss.seg_coef == 0 and config.seed == 3
    assert config.train.init_from == "{runs_dir}/sft/model"  # the main job's SFT model


def test_a_row_shows_the_reward_trend_then_the_four_scores_under_their_headers():
    trend = RewardTrend(8, 0.490, 0.567, 0.008, 0.007)
    metrics = {"prompts": {"giou": 0.574, "reasoning_acc": 0.375}, "val": {"giou": 0.372, "reasoning_acc": 0.165}}
    line = grpo_memorize.row("no-seg-loss", trend, metrics)
    assert "0.490 -> 0.567 (+0.077 ± 0.011)" in line
    assert line.split()[-4:] == ["0.574", "0.375", "0.372", "0.165"]
    assert len(grpo_memorize.HEADERS) == 4
    assert grpo_memorize.row("sft", None, metrics).split() == ["sft", "0.574", "0.375", "0.372", "0.165"]
