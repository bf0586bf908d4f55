"""The paired change between two evaluations of the same samples (rewards.stats.paired_change)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rewards.stats import paired_change

scores = st.floats(0.0, 1.0, allow_nan=False)
pairs = st.dictionaries(st.text(min_size=1, max_size=4), st.tuples(scores, scores), min_size=1, max_size=30)


@given(pairs)
def test_the_change_is_the_difference_of_means_and_flips_with_the_order(data):
    before = {k: a for k, (a, _) in data.items()}
    after = {k: b for k, (_, b) in data.items()}
    forward, backward = paired_change(before, after), paired_change(after, before)
    assert forward.n == backward.n == len(data)
    assert forward.change == pytest.approx(np.mean(list(after.values())) - np.mean(list(before.values())), abs=1e-12)
    assert backward.change == pytest.approx(-forward.change, abs=1e-12)
    if len(data) > 1:
        assert forward.se == pytest.approx(backward.se) and forward.se >= 0
    else:
        assert math.isnan(forward.se)


@given(pairs, st.floats(-0.5, 0.5))
def test_a_constant_shift_has_no_error_and_unshared_samples_are_ignored(data, shift):
    before = {k: a for k, (a, _) in data.items()}
    after = {k: a + shift for k, a in before.items()}
    after["not-in-before"] = 1e6
    change = paired_change(before, after)
    assert change.change == pytest.approx(shift, abs=1e-9) and change.n == len(before)
    if len(before) > 1:
        assert change.se == pytest.approx(0.0, abs=1e-9)


def test_the_error_is_the_spread_of_the_differences_over_root_n():
    change = paired_change({"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0}, {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0})
    assert (change.change, change.n) == (0.5, 4)
    assert change.se == pytest.approx(np.std([1, 0, 1, 0], ddof=1) / 2)


def test_no_shared_sample_or_a_non_finite_score_is_an_error():
    with pytest.raises(ValueError, match="share no sample"):
        paired_change({"a": 1.0}, {"b": 1.0})
    with pytest.raises(ValueError, match="finite"):
        paired_change({"a": 1.0, "b": 0.0}, {"a": float("nan"), "b": 0.0})
