"""total_reward, group_advantages and the reward preset registry."""

import math
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards import (
    RewardPreset,
    format_score,
    get_preset,
    group_advantages,
    multi_object_score,
    preset_names,
    presets,
    total_reward,
)
from rewards.advantages import ADVANTAGE_EPS, ADVANTAGE_ESTIMATORS

# --------------------------------------------------------------- total_reward


@pytest.mark.parametrize(
    "fmt, mask, weights, expected",
    [
        (1.0, 0.5, (0.3, 0.7), 0.65),
        (0.9, 1.0, (0.3, 0.7), 0.97),
        (0.0, 0.0, (0.3, 0.7), 0.0),
        (1.0, 1.0, (0.3, 0.7), 1.0),
        (0.9, 0.5, (1.0, 2.0), 1.9),
    ],
)
def test_total_reward_golden(fmt, mask, weights, expected):
    value = total_reward(fmt, mask, weights=weights)
    assert isinstance(value, float)
    assert value == pytest.approx(expected)


def test_total_reward_default_weights_are_segcompass():
    assert total_reward(0.9, 0.5) == pytest.approx(0.3 * 0.9 + 0.7 * 0.5)


def test_total_reward_vectorised():
    out = total_reward(np.array([1.0, 0.9, 0.0]), np.array([0.5, 1.0, 1.0]))
    np.testing.assert_allclose(out, [0.65, 0.97, 0.7])
    np.testing.assert_allclose(total_reward(1.0, np.array([0.0, 1.0])), [0.3, 1.0])


@pytest.mark.parametrize(
    "args, message",
    [
        ((1.5, 0.5), r"format must lie in \[0, 1\]"),
        ((0.5, float("nan")), "mask contains NaN"),
        ((0.5, -0.2), r"mask must lie in \[0, 1\]"),
        ((np.ones(2), np.ones(3)), "format has shape"),
        ((0.5, 0.5, (0.3,)), "weights must be a pair"),
        ((0.5, 0.5, (0.3, -0.7)), r"weights\[1\] must be >= 0.0"),
        ((0.5, 0.5, (float("inf"), 0.7)), r"weights\[0\] must be finite"),
        (("0.5", 0.5), "format must hold bools or real numbers"),
    ],
)
def test_total_reward_contract(args, message):
    with pytest.raises(ValueError, match=message):
        total_reward(*args)


# ----------------------------------------------------------- group_advantages


def test_group_advantages_golden():
    # mean 0.25; unbiased std = sqrt((0.75² + 3·0.25²) / 3) = 0.5
    adv = group_advantages([1.0, 0.0, 0.0, 0.0], group_size=4)
    np.testing.assert_allclose(adv, np.array([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6))


def test_group_advantages_uses_the_unbiased_std_per_group():
    rewards = [0.0, 1.0, 0.2, 0.7, 0.7, 0.7, 0.3, 0.9, 0.1]
    adv = group_advantages(rewards, group_size=3)
    for start in (0, 3, 6):
        group = rewards[start : start + 3]
        mean, std = statistics.mean(group), statistics.stdev(group)  # stdev is unbiased
        expected = [0.0] * 3 if std == 0 else [(r - mean) / (std + 1e-6) for r in group]
        np.testing.assert_allclose(adv[start : start + 3], expected, atol=1e-12)
    assert np.all(adv[3:6] == 0.0)  # the constant group


def test_zero_variance_groups_and_groups_of_one_get_exact_zeros():
    assert np.all(group_advantages([0.1] * 8, 8) == 0.0)  # 0.1 is not exact in binary
    assert np.all(group_advantages([0.3, 0.9, 0.0], 1) == 0.0)
    assert group_advantages([], 4).shape == (0,)


@pytest.mark.parametrize(
    "rewards, size, message",
    [
        ([1.0, 2.0, 3.0], 2, "not a multiple of group_size"),
        ([1.0, 2.0], 0, "group_size must be >= 1"),
        ([1.0, 2.0], 2.0, "group_size must be an int"),
        ([1.0, 2.0], True, "group_size must be an int"),
        ([1.0, float("nan")], 2, "rewards contains NaN or inf"),
        ([[1.0, 2.0]], 2, "rewards must have 1 dimensions"),
    ],
)
def test_group_advantages_contract(rewards, size, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(rewards, size)


rewards_and_size = st.integers(1, 8).flatmap(
    lambda size: st.tuples(
        st.lists(st.floats(-10, 10), min_size=size, max_size=4 * size).map(
            lambda xs, size=size: xs[: len(xs) - len(xs) % size]
        ),
        st.just(size),
    )
)


@settings(max_examples=100, deadline=None)
@given(rewards_and_size)
def test_advantages_have_zero_mean_and_unit_std_per_group(case):
    rewards, size = case
    adv = group_advantages(rewards, size).reshape(-1, size)
    groups = np.asarray(rewards, np.float64).reshape(-1, size)
    np.testing.assert_allclose(adv.mean(axis=1), 0.0, atol=1e-9)
    if size > 1:
        for a, r in zip(adv, groups):
            std = r.std(ddof=1)
            expected = 0.0 if r.max() == r.min() else std / (std + ADVANTAGE_EPS)
            assert a.std(ddof=1) == pytest.approx(expected, rel=1e-6, abs=1e-9)


# -------------------------------------------------------------------- presets


def test_builtin_presets():
    assert preset_names() == ("paper", "segcompass-code")
    paper, code = get_preset("paper"), get_preset("segcompass-code")
    assert (paper.format_variant, paper.divisor, paper.weights) == ("paper", "matched", (0.3, 0.7))
    assert (code.format_variant, code.divisor, code.weights) == ("segcompass-code", "max", (0.3, 0.7))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown reward preset 'x'; known presets: paper, segcompass-code"):
        get_preset("x")
    with pytest.raises(ValueError, match="unknown reward preset"):
        get_preset(None)


def test_a_new_preset_plugs_into_the_scorers(monkeypatch):
    monkeypatch.setattr(presets, "_REGISTRY", dict(presets._REGISTRY))
    presets.register_preset(
        RewardPreset(name="paper-max", format_variant="paper", divisor="max", weights=(0.5, 0.5))
    )
    assert "paper-max" in preset_names()
    assert format_score("<think>a</think><SEG> tail", preset="paper-max") == 0.9
    pred = np.ones((2, 1, 2), np.float32)
    gt = np.ones((1, 1, 2), bool)
    assert multi_object_score(pred, np.ones(2), gt, preset="paper-max") == 0.5
    with pytest.raises(ValueError, match="already registered"):
        presets.register_preset(RewardPreset(name="paper", format_variant="paper", divisor="max"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(format_variant="loose"), "format_variant must be one of"),
        (dict(divisor="min"), "divisor must be one of"),
        (dict(weights=(0.3, math.nan)), r"weights\[1\] must be finite"),
        (dict(name=""), "preset name must be a non-empty str"),
    ],
)
def test_preset_validation(kwargs, message):
    args = dict(name="p", format_variant="paper", divisor="matched")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        RewardPreset(**args)


# ------------------------------------------------------- advantage estimators


def test_advantage_estimators_hand_values():
    rewards = np.array([1.0, 0.0, 0.5, 0.5])
    # group [1, 0]: mean 0.5, unbiased std √0.5, population std 0.5; group [0.5, 0.5] is flat
    s = math.sqrt(0.5)
    grpo, population, dr = (ADVANTAGE_ESTIMATORS.get(n) for n in ("grpo", "grpo_population_std", "dr_grpo"))
    assert grpo(rewards, 2).tolist() == pytest.approx([0.5 / (s + 1e-6), -0.5 / (s + 1e-6), 0, 0])
    assert population(rewards, 2).tolist() == pytest.approx([0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6), 0, 0])
    assert dr(rewards, 2).tolist() == [0.5, -0.5, 0.0, 0.0]
    assert all(ADVANTAGE_ESTIMATORS.get(n)(rewards, 1).tolist() == [0.0] * 4 for n in ADVANTAGE_ESTIMATORS.names())


rewards_and_group = st.integers(1, 8).flatmap(
    lambda g: st.tuples(
        st.lists(st.sampled_from([0.0, 0.27, 0.3, 0.65, 0.97, 1.0]) | st.floats(0, 1), min_size=g, max_size=4 * g)
        .map(lambda xs, g=g: xs[: len(xs) - len(xs) % g]),
        st.just(g),
    )
)


@settings(max_examples=50, deadline=None)
@given(rewards_and_group)
def test_every_estimator_has_zero_mean_per_group(case):
    rewards, group_size = case
    for name in ADVANTAGE_ESTIMATORS.names():
        adv = ADVANTAGE_ESTIMATORS.get(name)(np.array(rewards), group_size).reshape(-1, group_size)
        assert np.allclose(adv.sum(axis=1), 0.0, atol=1e-6)


@pytest.mark.parametrize("name", ["grpo", "grpo_population_std", "dr_grpo"])
def test_estimators_reject_bad_input(name):
    estimate = ADVANTAGE_ESTIMATORS.get(name)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        estimate(np.ones(5), 2)
    with pytest.raises(ValueError, match="NaN or inf"):
        estimate(np.array([1.0, float("nan")]), 2)


def test_unknown_estimator_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown advantage estimator 'rloo'; known: dr_grpo, grpo"):
        ADVANTAGE_ESTIMATORS.get("rloo")
