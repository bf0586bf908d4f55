"""GRPO orchestration: the scheduler and what it keeps (admission, ledger, run log, checkpoints, resume, watchdog)."""
