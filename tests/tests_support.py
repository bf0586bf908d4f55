"""Helpers shared by tests (not fixtures)."""
from config import Config


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
