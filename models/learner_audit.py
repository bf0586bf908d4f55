"""The learner's own record of what each optimiser step trained on: ``learner_inputs.jsonl`` in the run.

Why: the ledger is the scheduler's account of which groups were trained; an audit that trusts
it cannot catch a scheduler that hands the learner a group twice or a step it never logged.
Rank 0 appends one line per step from the rows it was actually given:
``{"version": v, "groups": [group ids, sorted, once each], "rows": n}``, where ``v`` is the
weights version the step produced. A resumed run rolls the weights back and trains from an
older version again, so a line for version ``v`` voids every earlier line of version ``v`` or
later: what is left are the steps the final weights went through. A line cut short by a crash
is the file's last and is ignored.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

FILE = "learner_inputs.jsonl"


def record_step(path: str | os.PathLike, version: int, group_ids: Iterable[int], rows: int) -> None:
    """Append one step's line and make it durable before the step's result is returned."""
    line = json.dumps({"version": int(version), "groups": sorted({int(g) for g in group_ids}), "rows": int(rows)})
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def trained_groups(path: str | os.PathLike) -> dict[int, list[int]]:
    """Weights version -> the groups of the step that produced it, for the steps the final weights went
    through (see the module doc); {} when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    steps: dict[int, list[int]] = {}
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break  # the step being written when its learner died
            raise ValueError(f"{path}:{number}: not a JSON line") from None
        version = int(record["version"])
        steps = {v: groups for v, groups in steps.items() if v < version}
        steps[version] = [int(g) for g in record["groups"]]
    return steps
