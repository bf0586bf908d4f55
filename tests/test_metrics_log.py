"""Metrics sinks: JSONL lines and TensorBoard scalars with the same flattened names."""
from pipelines.grpo.metrics_log import MetricsLog, flatten, read_metrics


def test_flatten_nests_with_slashes():
    assert flatten({"reward": {"total": 1.0, "mask": 0.5}, "step_time": 2}) == {
        "reward/total": 1.0, "reward/mask": 0.5, "step_time": 2}


def test_jsonl_and_tensorboard(tmp_path):
    log = MetricsLog(tmp_path)
    log.log(1, {"reward": {"total": 0.25}, "note": "warmup"})
    log.log(2, {"reward": {"total": 0.5}, "kl": float("nan")})
    log.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["reward/total"] == 0.5 and rows[0]["note"] == "warmup"
    again = MetricsLog(tmp_path, ["jsonl"])  # resume appends
    again.log(3, {"reward": {"total": 0.75}})
    again.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("reward/total")] == [0.25, 0.5]
    assert "kl" not in events.Tags()["scalars"]
