"""The learner's record of its steps' inputs: rollbacks void later steps, a torn last line is ignored."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.learner_audit import record_step, trained_groups


def test_a_resume_voids_the_steps_after_its_checkpoint(tmp_path):
    path = tmp_path / "learner_inputs.jsonl"
    for version, groups in [(1, [2, 1]), (2, [3, 4]), (3, [5, 6]), (4, [7, 8])]:
        record_step(path, version, groups, rows=8)
    record_step(path, 3, [9, 10], rows=8)  # resumed from the step-2 checkpoint
    assert trained_groups(path) == {1: [1, 2], 2: [3, 4], 3: [9, 10]}


def test_a_line_cut_short_is_ignored_only_at_the_end(tmp_path):
    path = tmp_path / "learner_inputs.jsonl"
    record_step(path, 1, [1, 1, 2], rows=8)
    path.write_text(path.read_text() + '{"version": 2, "gro')
    assert trained_groups(path) == {1: [1, 2]}
    path.write_text(path.read_text() + '\n{"version": 3, "groups": [5], "rows": 4}\n')
    with pytest.raises(ValueError, match=r"learner_inputs.jsonl:2: not a JSON line"):
        trained_groups(path)
    assert trained_groups(tmp_path / "absent.jsonl") == {}


@given(st.lists(st.tuples(st.integers(1, 12), st.lists(st.integers(0, 99), max_size=4)), max_size=20))
def test_what_is_left_is_the_last_line_of_each_version_before_any_rollback(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("audit") / "learner_inputs.jsonl"
    for version, groups in lines:
        record_step(path, version, groups, rows=len(groups))
    expected: dict[int, list[int]] = {}
    for i, (version, groups) in enumerate(lines):
        if all(later > version for later, _ in lines[i + 1:]):  # no later line rolls it back
            expected[version] = sorted(set(groups))
    assert trained_groups(path) == expected
