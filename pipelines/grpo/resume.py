"""Continue a GRPO run from a checkpoint: learner, data cursor, controller, ledger, rollout weights.

``run_checkpoints`` finds a complete checkpoint (its files checked against their SHA-256
and for pickled code before any learner reads them, which the learner then does
weights-only); this module puts it back into a fresh run, and defines the driver state a
checkpoint keeps for it (``driver_state``). Work that was in flight when the checkpoint
was taken (admitted, not yet trained) is re-admitted first, under new group ids: the
ledger marks the old groups requeued, so every sample is still trained exactly once or
dropped with a reason.
"""
from __future__ import annotations

import ray

from pipelines.grpo.admission import StalenessController
from pipelines.grpo.ledger import Ledger
from pipelines.grpo.prompts import PromptStream
from pipelines.grpo.run_checkpoints import RunCheckpoint

RESUMED = "resumed: in flight at the checkpoint"


def driver_state(prompts: PromptStream, faults: dict) -> dict:
    """What a checkpoint keeps of the driver besides the ledger: the data cursor and the fault counters."""
    return {"prompts": prompts.state(), "faults": dict(faults)}


def restore(checkpoint: RunCheckpoint, actors, prompts: PromptStream,
            controller: StalenessController) -> tuple[Ledger, dict]:
    """Load ``checkpoint`` into the freshly started ``actors`` and driver objects; (ledger, fault counters)."""
    step = checkpoint.step
    version = actors.learner.load_checkpoint(str(checkpoint.folder), checkpoint.tag)
    if version != step:
        raise RuntimeError(f"checkpoint {checkpoint.tag} restored the learner at version {version}, expected {step}")
    ledger = checkpoint.ledger
    again = ledger.interrupt_open(RESUMED)
    prompts.restore(checkpoint.state["prompts"])
    prompts.requeue(again)
    staleness = {int(k): n for k, n in ledger.summary()["staleness"].items()}
    controller.resume_at(step, ledger.next_group_id(), staleness, sum(staleness.values()))
    push_weights(actors, step)
    print(f"[segrl] resumed {checkpoint.folder / checkpoint.tag}: {step} steps done, "
          f"{len(again)} samples in flight re-admitted", flush=True)
    return ledger, checkpoint.state.get("faults", {})


def push_weights(actors, version: int) -> None:
    """The restored learner's weights into every rollout engine and reference actor, before any rollout."""
    weights = actors.learner.export_weights()
    acks = actors.rollout.broadcast_named(weights, version) + actors.reference.broadcast_named(weights, version)
    ray.get([ref for ref, _ in acks], timeout=actors.learner.timeout_s)
