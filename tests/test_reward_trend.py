"""The training reward's trend: window means as before, their standard errors, the change."""
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipelines.grpo.reward_trend import reward_trend

rewards = st.lists(st.floats(-1, 2, allow_nan=False), min_size=1, max_size=80)


@given(rewards)
def test_windows_are_the_first_and_last_fifth_and_their_means(values):
    trend = reward_trend(values)
    k = max(1, len(values) // 5)
    assert trend.steps == k
    assert trend.first == pytest.approx(sum(values[:k]) / k) and trend.last == pytest.approx(sum(values[-k:]) / k)
    assert trend.change == pytest.approx(trend.last - trend.first)


@given(rewards, st.floats(-5, 5))
def test_a_constant_shift_moves_the_means_not_the_change_or_its_error(values, shift):
    base, moved = reward_trend(values), reward_trend([v + shift for v in values])
    assert moved.change == pytest.approx(base.change, abs=1e-9)
    if len(values) >= 10:
        assert moved.change_se == pytest.approx(base.change_se, abs=1e-9)


def test_standard_errors_by_hand():
    trend = reward_trend([0.4, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.7, 0.7])  # windows of 2
    # first window 0.4, 0.6: sample variance 0.02, standard error sqrt(0.02 / 2) = 0.1
    assert trend.first_se == pytest.approx(0.1) and trend.last_se == 0.0
    assert trend.change_se == pytest.approx(trend.first_se)
    assert trend.line() == ("reward: first 2 steps 0.500 ± 0.100 -> last 2 steps 0.700 ± 0.000 "
                            "(change +0.200 ± 0.100)")


def test_one_step_has_no_error_and_no_steps_are_refused():
    assert math.isnan(reward_trend([0.3]).first_se)
    with pytest.raises(ValueError, match="at least one step"):
        reward_trend([])
