"""Small ledgers for the ledger's tests: a group taken all the way, a checksummed document, a short run."""
from __future__ import annotations

import hashlib
import json

from pipelines.grpo.ledger import Ledger


def train(ledger: Ledger, group_id: int, sample: str, version: int, step: int) -> None:
    """Admit a group and take it all the way to trained."""
    ledger.admitted(group_id, sample)
    ledger.generated(group_id, version)
    ledger.referenced(group_id)
    ledger.rewarded(group_id)
    ledger.trained(group_id, step)


def document(rows: list) -> dict:
    """A ledger document with a valid checksum over ``rows`` (canonical compact JSON)."""
    digest = hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()
    return {"format": 1, "entries": rows, "sha256": digest}


def small_run() -> Ledger:
    """Two steps of batch 2, one drop, one requeue whose sample trains later, one open."""
    ledger = Ledger()
    train(ledger, 0, "e0:0", version=0, step=0)
    train(ledger, 1, "e0:1", version=0, step=0)
    ledger.admitted(2, "e0:2")
    ledger.requeued(2, "actor died")
    ledger.admitted(3, "e0:3")
    ledger.generated(3, 0)
    ledger.dropped(3, "stale")
    train(ledger, 4, "e0:4", version=0, step=1)
    train(ledger, 5, "e0:2", version=1, step=1)
    ledger.admitted(6, "e0:5")
    ledger.generated(6, 1)
    return ledger
