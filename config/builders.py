"""What a config names, built: the trainable segmenter (policy + SAM + head), the feature store,
the loss, rollout and learner settings."""
from __future__ import annotations

from pathlib import Path

from config.load import ConfigError
from config.model import ModelConfig
from config.schema import Config
from data.features import FeatureStore, encoder_key
from models.encoders import sam_checkpoint
from models.export import ExportSettings
from models.export_format import EXPORT_CONFIG, read_model_settings
from models.grpo_step import LossSettings
from models.heads import HEADS
from models.learner import LearnerSettings
from models.policy import load_policy
from models.rollout import ENGINE_KEYS, RolloutSettings
from models.sam import load_sam
from models.segmenter import HeadSpec, Segmenter, load_head_weights, verify_model_folder


def head_spec(config: Config) -> HeadSpec:
    h = config.model.head
    return HeadSpec(config.model.num_slots, h.codebook_dim, h.act_threshold, h.top_k_features)


def config_for_model(config: Config, model_path: str | None = None) -> Config:
    """``config`` with the model settings an export folder records (head kind and settings, slots,
    reference token, SAE) in place of its own, so whatever loads, scores or serves an export
    builds the model it holds; any other folder leaves the config as it is."""
    path = model_path or config.resolve_path(config.model.name_or_path)
    settings = read_model_settings(path)
    if settings is None:
        return config
    merged = config.model.model_dump()
    for key, value in settings.items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
    try:
        model = ModelConfig.model_validate(merged)
    except ValueError as exc:
        raise ConfigError(f"{Path(path) / EXPORT_CONFIG}: model settings the config cannot take "
                          f"({' '.join(str(exc).split())})") from None
    return config.model_copy(update={"model": model})


def export_settings(config: Config) -> ExportSettings:
    """What `segrl export` takes from the config for the parts a model folder does not describe."""
    import torch

    m = config.model
    sam = config.resolve_path(m.sam.checkpoint) if m.sam.checkpoint else None
    return ExportSettings(m.family, m.ref_token, m.head.ref_position, m.sae.layer, m.head.kind, head_spec(config),
                          Path(config.resolve_path(m.sae.path)), config.resolve_path(m.name_or_path), m.sam.variant,
                          sam, getattr(torch, m.dtype))


def build_segmenter(config: Config, model_path: str | None = None):
    """(Segmenter, tokenizer, SAM input size) from `model_path` (default: model.name_or_path), its files
    checked first (``verify_model_folder``); an export is built with its own model settings
    (``config_for_model``)."""
    path = model_path or config.resolve_path(config.model.name_or_path)
    verify_model_folder(path)
    policy, tokenizer = build_policy(config, path)
    head, img_size = build_head(config, path, policy.lm.config.hidden_size)
    return Segmenter(policy, head), tokenizer, img_size


def build_policy(config: Config, path: str):
    """(Policy, tokenizer) of the model folder ``path`` under the config's model settings (an export's
    own, ``config_for_model``)."""
    m = config_for_model(config, path).model
    return load_policy(m.family, path, m.ref_token, m.sae.layer, m.head.ref_position)


def build_head(config: Config, path: str, lm_dim: int):
    """(the config's head kind over the folder's SAM, with the folder's trained head weights if it has
    them; SAM's input size); an export's own head settings (``config_for_model``)."""
    config = config_for_model(config, path)
    m = config.model
    sam = load_sam(m.sam.variant, sam_checkpoint(m.sam.variant, m.sam.checkpoint, path))
    head = HEADS.get(m.head.kind)(sam, lm_dim, head_spec(config), Path(config.resolve_path(m.sae.path)))
    load_head_weights(head, path)
    return head, sam.image_encoder.img_size


def encoder_sources(config: Config) -> list[str]:
    """Files that define the frozen encoders (their identity in the cache)."""
    model_path = config.resolve_path(config.model.name_or_path)
    if config.model.family == "tiny":
        return [str(Path(model_path) / "vision"), str(Path(model_path) / "sam")]
    sources = [model_path, config.model.sam.variant, config.model.sam.checkpoint or "random-init"]
    if config.model.family == "qwen2_5_vl":  # its grid, hence its features, depend on the pixel bounds
        sources.append(f"pixels={config.data.image_min_pixels},{config.data.image_max_pixels}")
    return sources


def feature_store(config: Config) -> FeatureStore:
    return FeatureStore(config.resolve_path(config.paths.cache_dir), encoder_key(*encoder_sources(config)))


def loss_settings(config: Config) -> LossSettings:
    g = config.grpo
    return LossSettings(g.clip_ratio, g.clip_ratio_high, g.kl_coef, g.kl_estimator, g.policy_loss,
                        g.loss_aggregation, config.model.num_slots, config.seg_loss.model_dump(), g.is_correction,
                        g.is_cap, g.dual_clip_c, config.data.max_response_length)


def rollout_settings(config: Config, model_path: str | None = None) -> RolloutSettings:
    """The rollout core's settings; ``model_path`` defaults to model.name_or_path.

    The tiny family's engine context is prompt + image tokens + response (the image token
    gives way to the image's tokens); other families get vLLM's default, the model's own.
    The rollout section's vLLM engine settings go to the engine only when set.
    """
    m, d, r = config.model, config.data, config.rollout
    max_model_len = None
    if m.family == "tiny":
        image_tokens = (m.tiny.vision.image_size // m.tiny.vision.patch_size) ** 2
        max_model_len = d.max_prompt_length - 1 + image_tokens + d.max_response_length
    engine = {k: v for k in ENGINE_KEYS if (v := getattr(r, k)) is not None}
    return RolloutSettings(model_path or config.resolve_path(m.name_or_path), m.dtype, m.ref_token, config.seed,
                           r.group_size, r.temperature, r.top_p, d.max_response_length, max_model_len, engine)


def learner_settings(config: Config) -> LearnerSettings:
    o = config.optim
    return LearnerSettings(config.grpo.micro_batch_size, o.lr, o.lr_multipliers.model_dump(), o.weight_decay,
                           tuple(o.betas), o.grad_clip, o.schedule, o.total_steps, o.one_cycle_final_div,
                           o.warmup_fraction, loss_settings(config), head_spec(config), config.model.dtype,
                           o.gradient_checkpointing, o.zero_offload)


def serve_generator(config: Config):
    """The policy deployment's generator (``serve.policy.generator``); a vLLM engine's context holds a
    prompt, its image tokens and the serve cap on new tokens."""
    from dataclasses import replace

    from models.generators import GENERATORS

    settings = rollout_settings(config)
    if settings.max_model_len is not None:
        cap = config.serve.max_new_tokens or config.eval_max_new_tokens
        settings = replace(settings, max_model_len=settings.max_model_len - config.data.max_response_length + cap)
    return GENERATORS.get(config.serve.policy.generator)(settings)
