# segrl: two commands for a new user (README), plus the steps they run.
.PHONY: setup main test

setup:
	@bash scripts/setup.sh

# Build the tiny models and the synthetic data, precompute features, report.
main: setup
	.venv/bin/segrl main --config configs/tiny.yaml

test: setup
	.venv/bin/python -m pytest -q
