"""Helpers shared by tests (not fixtures)."""
from pathlib import Path

from config import Config
from models.learner_audit import trained_groups
from pipelines.grpo.ledger import TRAINED, Ledger
from pipelines.grpo.metrics_log import read_metrics

BATCH = 2  # tiny_grpo_config's prompts per step


def overrides_for(config: Config) -> list[str]:
    """Command-line overrides that reproduce a test config's work dir, data sizes and pretraining budgets."""
    s, t = config.data.synthetic, config.model.tiny
    return [f"paths.work_dir={config.paths.work_dir}", f"data.synthetic.n_train={s.n_train}",
            f"data.synthetic.n_val={s.n_val}", f"data.synthetic.n_test={s.n_test}",
            *(f"model.tiny.{stage}.{key}={value}" for stage in ("vision_pretrain", "lm_align", "sam_pretrain")
              for key, value in getattr(t, stage).model_dump().items())]


def tiny_grpo_config(workspace: dict, out, steps: int, checkpoint_every: int) -> Config:
    """The tiny workspace's config as a short GRPO run into ``out``: 2 prompts x 4 a step, eta 1,
    actors at 0.1 CPU so they fit beside whatever other test modules left on the 2-CPU cluster."""
    config = workspace["config"].model_copy(deep=True)
    config.train.steps, config.train.checkpoint_every, config.train.eval_samples = steps, checkpoint_every, 4
    config.train.staleness, config.train.groups_per_call = 1, 1
    config.train.init_from = workspace["tiny"]["path"]
    config.train.output = str(out)
    config.grpo.prompts_per_step, config.rollout.group_size = 2, 4
    config.data.max_response_length = 48
    for kind in (config.cluster.rollout, config.cluster.learner, config.cluster.reference, config.cluster.reward):
        kind.num_cpus = 0.1
    return config


def encode_images(config: Config, paths: list) -> tuple:
    """(the config's frozen encoders, the images at ``paths`` as RGB arrays), each image's features put in
    the config's feature store under its content hash: the cache `precompute` fills, without Ray Data."""
    import numpy as np
    from PIL import Image

    from config.builders import feature_store
    from data.features import content_hash
    from models.encoders import FrozenEncoders

    encoders = FrozenEncoders(config.model.family, config.resolve_path(config.model.name_or_path),
                              config.model.sam.variant, None)
    store = feature_store(config)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    for path, feats in zip(paths, encoders(images)):
        store.put(content_hash(path), feats)
    return encoders, images


def assert_exactly_once(out: Path, steps: int, eta: int = 1) -> Ledger:
    ledger = Ledger.load(out / "ledger.json")
    ledger.check(eta, batch_size=BATCH)
    summary = ledger.summary()
    assert summary["steps"] == steps and summary["trained_samples"] == steps * BATCH
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(int(k.split("/")[1]) <= eta for r in rows for k in r if k.startswith("staleness/"))
    assert_learner_consumed_each_admitted_group_once(out, steps, ledger)
    return ledger


def assert_learner_consumed_each_admitted_group_once(out: Path, steps: int, ledger: Ledger) -> None:
    """Not trusting the ledger: the learner's record of its surviving steps' inputs holds a full batch
    per step, no group twice, and every group among those the scheduler admitted and said trained."""
    consumed = trained_groups(out / "learner_inputs.jsonl")
    assert sorted(consumed) == list(range(1, steps + 1)), sorted(consumed)
    groups = [g for step_groups in consumed.values() for g in step_groups]
    assert all(len(step_groups) == BATCH for step_groups in consumed.values()), consumed
    assert len(set(groups)) == len(groups) == steps * BATCH, consumed
    entries = {group: (state, step) for group, _, state, _, step, _ in ledger.to_dict()["entries"]}
    assert set(groups) <= set(entries), "the learner trained groups the scheduler never admitted"
    assert set(groups) == {g for g, (state, _) in entries.items() if state == TRAINED}
    # the ledger numbers steps from 0; the step that trained a group made weights version step + 1
    assert all(entries[g][1] + 1 == version for version, step_groups in consumed.items() for g in step_groups)
