"""The top layer: the `segrl` CLI and one driver per command; GRPO orchestration in `pipelines.grpo`."""
