"""The trajectory ledger: one entry per GRPO group, from admission until it ends.

Why: every sample must be trained at most once, and a sample whose work was lost must come
back, even when actors die or a run is resumed mid-flight. The scheduler reports each
group's progress here; ``check`` proves the exactly-once guarantee from the record alone,
and ``save`` keeps the record across restarts. Ray-free, so it is testable alone.

A group is one prompt sampled G times; ids are minted by the scheduler in admission order
and never reused (also across resumes, see ``next_group_id``). Each carries one opaque
sample key. Its life:

    admitted -> generated -> referenced -> rewarded -> trained
    any state before trained -> dropped   (the sample is given up, with a reason)
                             -> requeued  (work lost: the sample is admitted again, new id)

TRAINED, DROPPED and REQUEUED are terminal. Per sample, the groups in admission order must
be some REQUEUED ones, then at most one that is trained, dropped or still open.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from data.atomic import write_atomic

ADMITTED = "admitted"
GENERATED = "generated"
REFERENCED = "referenced"
REWARDED = "rewarded"
TRAINED = "trained"
DROPPED = "dropped"
REQUEUED = "requeued"
STATES = (ADMITTED, GENERATED, REFERENCED, REWARDED, TRAINED, DROPPED, REQUEUED)
TERMINAL = frozenset({TRAINED, DROPPED, REQUEUED})
_NEXT = {ADMITTED: GENERATED, GENERATED: REFERENCED, REFERENCED: REWARDED, REWARDED: TRAINED}

FORMAT_VERSION = 1
_LISTED = 10  # violations spelled out by ``check``; the rest are only counted
_BAR = 40  # width of the longest staleness bar in ``format_summary``


class LedgerError(ValueError):
    """An illegal transition, or a record that breaks the exactly-once guarantee."""


class LedgerCorruptError(LedgerError):
    """A saved ledger that cannot be trusted: missing, unreadable or failing its checksum."""


@dataclass
class _Entry:
    sample: str
    state: str = ADMITTED
    version: int | None = None  # the weights version that generated it
    step: int | None = None  # the optimiser step that trained it
    reason: str | None = None  # why it was dropped or requeued


class Ledger:
    """Every admitted group's state, version, step and end reason, in admission order."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}  # insertion order is admission order
        self._by_sample: dict[str, list[int]] = {}  # each sample's group ids, admission order

    # --- transitions -----------------------------------------------------------------
    def admitted(self, group_id: int, sample: str) -> None:
        if group_id in self._entries:
            raise self._illegal(group_id, ADMITTED)
        self._entries[group_id] = _Entry(sample)
        self._by_sample.setdefault(sample, []).append(group_id)

    def generated(self, group_id: int, version: int) -> None:
        self._advance(group_id, GENERATED).version = version

    def referenced(self, group_id: int) -> None:
        self._advance(group_id, REFERENCED)

    def rewarded(self, group_id: int) -> None:
        self._advance(group_id, REWARDED)

    def trained(self, group_id: int, step: int) -> None:
        self._advance(group_id, TRAINED).step = step

    def dropped(self, group_id: int, reason: str) -> None:
        """The sample is given up for good (stale, bad data, retries exhausted)."""
        self._end(group_id, DROPPED, reason)

    def requeued(self, group_id: int, reason: str) -> None:
        """The group's work was lost; its sample returns to the queue for a new group."""
        self._end(group_id, REQUEUED, reason)

    def interrupt_open(self, reason: str) -> list[str]:
        """Requeue every open group (a resume, a lost pool); their samples, admission order."""
        open_ids = self.open_groups()
        for group_id in open_ids:
            self.requeued(group_id, reason)
        return [self._entries[group_id].sample for group_id in open_ids]

    # --- queries ---------------------------------------------------------------------
    def state(self, group_id: int) -> str:
        if group_id not in self._entries:
            raise LedgerError(f"group {group_id} was never admitted")
        return self._entries[group_id].state

    def sample(self, group_id: int) -> str:
        """The data key the group carries."""
        self.state(group_id)
        return self._entries[group_id].sample

    def is_open(self, group_id: int) -> bool:
        return self.state(group_id) not in TERMINAL

    def attempts(self, sample: str) -> int:
        """How many groups ``sample`` has been admitted as so far."""
        return len(self._by_sample.get(sample, ()))

    def open_groups(self) -> list[int]:
        return [i for i, e in self._entries.items() if e.state not in TERMINAL]

    def next_group_id(self) -> int:
        """The first id a resumed scheduler may mint: 1 + the largest id ever admitted."""
        return max(self._entries, default=-1) + 1

    def check(self, eta: int, batch_size: int | None = None) -> None:
        """Raise a LedgerError listing every breach of exactly-once training under ``eta``."""
        if eta < 0 or (batch_size is not None and batch_size < 1):
            raise ValueError(f"need eta >= 0 and batch_size >= 1, got {eta}, {batch_size}")
        problems: list[str] = []
        for sample, ids in self._by_sample.items():
            done = [i for i in ids if self._entries[i].state == TRAINED]
            if len(done) > 1:
                problems.append(f"sample {sample!r} trained {len(done)} times (groups {done})")
            for earlier, later in zip(ids, ids[1:]):
                if (state := self._entries[earlier].state) != REQUEUED:
                    problems.append(
                        f"sample {sample!r}: group {later} was admitted after group {earlier}, "
                        f"which is {state} (only requeued groups may be followed)"
                    )
        per_step: Counter[int] = Counter()
        for group_id, e in self._entries.items():
            if e.state != TRAINED:
                continue
            if e.version is None or e.step is None:
                problems.append(
                    f"group {group_id} (sample {e.sample!r}) is trained without a version "
                    f"and step (version {e.version}, step {e.step})"
                )
                continue
            per_step[e.step] += 1
            if not 0 <= e.step - e.version <= eta:
                problems.append(
                    f"group {group_id} (sample {e.sample!r}): staleness {e.step - e.version} "
                    f"(step {e.step} - version {e.version}) is outside [0, {eta}]"
                )
        if batch_size is not None:
            problems += _batch_problems(per_step, batch_size)
        if problems:
            listed = "\n".join(f"  - {p}" for p in problems[:_LISTED])
            more = len(problems) - _LISTED
            tail = f"\n  ... and {more} more" if more > 0 else ""
            raise LedgerError(f"ledger check failed: {len(problems)} violation(s)\n{listed}{tail}")

    def summary(self) -> dict:
        """JSON-able counts for metrics and the ``segrl ledger`` command."""
        entries = list(self._entries.values())
        states = Counter(e.state for e in entries)
        trained = [e for e in entries if e.state == TRAINED]
        staleness = Counter(
            e.step - e.version for e in trained if e.step is not None and e.version is not None
        )
        return {
            "groups": len(entries),
            "states": {state: states[state] for state in STATES},
            "samples": len(self._by_sample),
            "trained_samples": len({e.sample for e in trained}),
            "retried_samples": sum(len(ids) > 1 for ids in self._by_sample.values()),
            "steps": len({e.step for e in trained if e.step is not None}),
            "dropped_by_reason": _reasons(entries, DROPPED),
            "requeued_by_reason": _reasons(entries, REQUEUED),
            "staleness": {str(k): staleness[k] for k in sorted(staleness)},
        }

    # --- persistence -----------------------------------------------------------------
    def to_dict(self) -> dict:
        """One row [id, sample, state, version, step, reason] per group, plus a checksum."""
        rows = [[i, e.sample, e.state, e.version, e.step, e.reason]
                for i, e in self._entries.items()]
        return {"format": FORMAT_VERSION, "entries": rows, "sha256": _digest(rows)}

    @classmethod
    def from_dict(cls, d: dict) -> Ledger:
        return cls._from_document(d, "ledger dict")

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a crash at any point leaves either the old file or the new one."""
        write_atomic(path, json.dumps(self.to_dict(), separators=(",", ":")))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Ledger:
        path = Path(path)
        try:
            document = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise LedgerCorruptError(f"{path}: no ledger file") from None
        except (OSError, ValueError) as err:  # ValueError covers bad JSON and bad UTF-8
            raise LedgerCorruptError(f"{path}: not a readable JSON ledger ({err})") from err
        return cls._from_document(document, str(path))

    # --- internals -------------------------------------------------------------------
    @classmethod
    def _from_document(cls, document: object, where: str) -> Ledger:
        """Rebuild from ``to_dict`` output, checking format, checksum and every row."""
        if not isinstance(document, dict):
            raise LedgerCorruptError(f"{where}: not a ledger document")
        if document.get("format") != FORMAT_VERSION:
            raise LedgerCorruptError(
                f"{where}: unknown format version {document.get('format')!r} "
                f"(expected {FORMAT_VERSION})"
            )
        rows = document.get("entries")
        if document.get("sha256") != _digest(rows):
            raise LedgerCorruptError(f"{where}: checksum mismatch, the entries were altered")
        if not isinstance(rows, list):
            raise LedgerCorruptError(f"{where}: entries are not a list")
        ledger = cls()
        for n, row in enumerate(rows):
            if not _valid_row(row) or row[0] in ledger._entries:
                raise LedgerCorruptError(f"{where}: malformed or repeated entry {n}: {row!r}")
            group_id, sample, state, version, step, reason = row
            ledger._entries[group_id] = _Entry(sample, state, version, step, reason)
            ledger._by_sample.setdefault(sample, []).append(group_id)
        return ledger

    def _advance(self, group_id: int, target: str) -> _Entry:
        entry = self._entries.get(group_id)
        if entry is None or _NEXT.get(entry.state) != target:
            raise self._illegal(group_id, target)
        entry.state = target
        return entry

    def _end(self, group_id: int, target: str, reason: str) -> None:
        entry = self._entries.get(group_id)
        if entry is None or entry.state in TERMINAL:
            raise self._illegal(group_id, target)
        entry.state, entry.reason = target, reason

    def _illegal(self, group_id: int, target: str) -> LedgerError:
        entry = self._entries.get(group_id)
        where = (
            "never admitted" if entry is None else f"sample {entry.sample!r}, state {entry.state}"
        )
        return LedgerError(f"group {group_id} ({where}): illegal transition to {target}")


def format_summary(summary: dict) -> str:
    """``Ledger.summary()`` as a few lines for people: counts, reasons, staleness bars."""
    states = summary["states"]
    lines = [
        f"{summary['groups']} groups over {summary['samples']} samples: "
        f"{summary['trained_samples']} trained in {summary['steps']} steps, "
        f"{summary['retried_samples']} retried",
        "  ".join(f"{state} {states[state]}" for state in STATES),
    ]
    for title, key in (("dropped", "dropped_by_reason"), ("requeued", "requeued_by_reason")):
        reasons = summary[key]
        lines.append(f"{title}:" + ("" if reasons else " none"))
        lines += [f"  {n:>6}  {reason}" for reason, n in reasons.items()]
    staleness = summary["staleness"]
    if staleness:
        top, width = max(staleness.values()), max(map(len, staleness))
        lines.append("staleness (step - version):")
        for lag, n in staleness.items():
            lines.append(f"  {lag:>{width}} | {'#' * max(1, round(_BAR * n / top))} {n}")
    return "\n".join(lines)


def _batch_problems(per_step: Counter[int], batch_size: int) -> list[str]:
    """Every step must train a whole batch, and steps run 0, 1, 2, ... with none skipped."""
    problems = [
        f"step {step} trained {n} groups, not the batch size {batch_size}"
        for step, n in sorted(per_step.items())
        if n != batch_size
    ]
    expected = set(range(max(per_step, default=-1) + 1))
    if missing := sorted(expected - per_step.keys()):
        problems.append(f"steps {missing[:_LISTED]} trained nothing ({len(missing)} skipped)")
    if stray := sorted(per_step.keys() - expected):
        problems.append(f"steps {stray[:_LISTED]} are negative")
    return problems


def _reasons(entries: list[_Entry], state: str) -> dict[str, int]:
    counts = Counter(e.reason for e in entries if e.state == state)
    return {str(reason): counts[reason] for reason in sorted(counts, key=str)}


def _digest(rows: object) -> str:
    """sha256 of the canonical JSON of the entries (the form ``save`` writes them in)."""
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def _valid_row(row: object) -> bool:
    if not isinstance(row, list) or len(row) != 6:
        return False
    group_id, sample, state, version, step, reason = row
    return (
        _is_int(group_id)
        and isinstance(sample, str)
        and isinstance(state, str)
        and state in STATES
        and (version is None or _is_int(version))
        and (step is None or _is_int(step))
        and (reason is None or isinstance(reason, str))
    )


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
