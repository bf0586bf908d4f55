"""Typed configuration: every YAML key maps to a field here; unknown keys are errors.

Sections follow the sample's way through the system: paths, data, model (LM,
vision side, SAM, SAE), rollout, optimisation (GRPO), reward. Later stages add
fields as they land; a key nobody reads does not belong here.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from config.model import ModelConfig
from config.paths import FOLDERS, PathTemplate, expand
from config.section import Section
from config.serve import ServeConfig
from data.rle import MAX_MASK_PIXELS


class PathsConfig(Section):
    """Where generated things live; relative paths are relative to the working directory."""

    work_dir: PathTemplate = Field("work", description="root of models, data, caches and runs (git-ignored)")
    models_dir: PathTemplate = "{work_dir}/models"
    data_dir: PathTemplate = "{work_dir}/data"
    cache_dir: PathTemplate = "{work_dir}/cache"
    runs_dir: PathTemplate = "{work_dir}/runs"

    @model_validator(mode="after")
    def _resolvable(self) -> "PathsConfig":
        for name in FOLDERS:
            self.resolve(name)
        return self

    def folders(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in FOLDERS}

    def resolve(self, name: str) -> str:
        """One folder, its placeholders (other folders) expanded."""
        return expand(getattr(self, name), self.folders(), (name,))


class SyntheticDataConfig(Section):
    """Size and look of the synthetic reasoning-segmentation set."""

    n_train: PositiveInt = 2000
    n_val: PositiveInt = 200
    n_test: PositiveInt = 200
    image_size: int = Field(64, ge=48, le=1024, description="smaller makes small shapes indistinguishable")
    query_weights: dict[str, float] | None = None


class DataConfig(Section):
    dataset: Literal["synthetic", "reasonseg", "refcoco", "refcoco+", "refcocog", "grefcoco"] = "synthetic"
    root: PathTemplate = Field("{data_dir}/synthetic", description="folder holding <split>.parquet files")
    train_split: str = "train"
    eval_splits: list[str] = Field(["val"], min_length=1, description="the first is `segrl eval`'s default")
    synthetic: SyntheticDataConfig = SyntheticDataConfig()
    max_prompt_length: PositiveInt = 256
    max_response_length: PositiveInt = 128
    image_min_pixels: PositiveInt | None = Field(None, description="Qwen2.5-VL dynamic resolution bounds")
    image_max_pixels: PositiveInt | None = None
    max_mask_pixels: int = Field(MAX_MASK_PIXELS, ge=1, le=MAX_MASK_PIXELS, description="convert: the most mask "
                                 "pixels one sample may hold (height x width x masks); split files are read under "
                                 "the upper bound")
    polygon_margin: float = Field(1.0, ge=0, le=10, description="convert: how far a polygon point may lie off its "
                                  "image, in image widths/heights")

    @model_validator(mode="after")
    def _pixels(self) -> "DataConfig":
        lo, hi = self.image_min_pixels, self.image_max_pixels
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"image_min_pixels {lo} exceeds image_max_pixels {hi}")
        return self


class RolloutConfig(Section):
    tensor_parallel_size: PositiveInt = Field(1, description="vLLM tensor parallelism per rollout actor (GPU)")
    group_size: int = Field(8, ge=2, description="responses per prompt; GRPO's advantages need at least 2")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_num_seqs: PositiveInt | None = Field(None, description="vLLM: sequences per engine step (None: vLLM's default)")
    max_num_batched_tokens: PositiveInt | None = Field(None, description="vLLM: tokens per engine step (None: default)")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="vLLM: share of each GPU it takes")
    enable_chunked_prefill: bool | None = Field(None, description="vLLM (None: its default)")


class LRMultipliers(Section):
    """Per-module learning-rate multipliers over the base LM rate (SegCompass A.2)."""

    projector: float = Field(1.0, gt=0)
    query_codebook: float = Field(25.0, gt=0)
    slot_mapper: float = Field(80.0, gt=0)
    mask_decoder: float = Field(10.0, gt=0)


class OptimConfig(Section):
    lr: float = Field(2e-6, gt=0, lt=1)
    lr_multipliers: LRMultipliers = LRMultipliers()
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    schedule: Literal["one_cycle", "constant"] = "one_cycle"
    one_cycle_final_div: float = Field(6.7, ge=1)
    warmup_fraction: float = Field(0.0, ge=0, lt=1)
    total_steps: PositiveInt = 100
    gradient_checkpointing: bool = Field(False, description="recompute the LM's layer activations in the backward")
    zero_offload: Literal["none", "optimizer", "optimizer_and_params"] = Field(
        "none", description="ZeRO-3 state kept in host memory on GPU ranks (CPU ranks hold everything there)")

    @model_validator(mode="after")
    def _betas(self) -> "OptimConfig":
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        return self


class GRPOConfig(Section):
    """GRPO of SegCompass B.2; names select entries of the registries in models.losses."""

    prompts_per_step: PositiveInt = 16
    clip_ratio: float = Field(0.2, gt=0, lt=1)
    clip_ratio_high: float | None = Field(None, gt=0, lt=1, description="only for policy_loss grpo_clip_higher")
    kl_coef: float = Field(0.2, ge=0)
    kl_estimator: str = "k3"
    policy_loss: str = "grpo_clip"
    advantage_estimator: str = "grpo"
    loss_aggregation: str = "seq_mean_group_mean"
    dual_clip_c: float | None = Field(None, gt=1, description="only for policy_loss grpo_dual_clip (None: 3)")
    is_correction: bool = Field(True, description="clip anchored to the learner's logprobs, tokens weighted by "
                                "min(pi_learner / pi_rollout, is_cap): corrects stale samples")
    is_cap: float = Field(2.0, ge=1)
    micro_batch_size: PositiveInt = 2

    @field_validator("kl_estimator", "policy_loss", "advantage_estimator", "loss_aggregation")
    @classmethod
    def _registered(cls, name: str, info) -> str:
        from models import losses
        from rewards.advantages import ADVANTAGE_ESTIMATORS

        registry = {"kl_estimator": losses.KL_ESTIMATORS, "policy_loss": losses.POLICY_LOSSES,
                    "advantage_estimator": ADVANTAGE_ESTIMATORS,
                    "loss_aggregation": losses.AGGREGATIONS}[info.field_name]
        registry.get(name)
        return name

    @model_validator(mode="after")
    def _dual_clip(self) -> "GRPOConfig":
        if self.dual_clip_c is not None and self.policy_loss != "grpo_dual_clip":
            raise ValueError(f"dual_clip_c is only for policy_loss grpo_dual_clip, not {self.policy_loss}")
        return self


class SegLossConfig(Section):
    """Weights of the segmentation terms added to the GRPO loss (one backward, A.1)."""

    seg_coef: float = Field(0.3, ge=0)
    dice_weight: float = Field(1.0, ge=0)
    bce_weight: float = Field(1.0, ge=0)
    conf_weight: float = Field(0.2, ge=0)


class SftConfig(Section):
    """Supervised warm start: templated reasoning + <SEG> (or a refusal) and the segmentation loss."""

    epochs: PositiveInt = 3
    batch_size: PositiveInt = 16
    lr: float = Field(1e-3, gt=0, lt=1, description="the LM's rate")
    lr_multipliers: LRMultipliers = Field(LRMultipliers(), description="per-module rates over sft.lr, as "
                                          "optim.lr_multipliers over optim.lr: SAM's decoder side a fixed share "
                                          "of the slot mapper's, not a free module")
    seg_coef: float = Field(1.0, ge=0)
    eval_samples: PositiveInt = 64
    output: PathTemplate = "{runs_dir}/sft"

    @model_validator(mode="after")
    def _rates(self) -> "SftConfig":
        too_high = {role: self.lr * m for role, m in self.lr_multipliers.model_dump().items() if self.lr * m >= 1}
        if too_high:
            raise ValueError(f"lr x lr_multipliers gives learning rates >= 1: {too_high}")
        return self


class EvalConfig(Section):
    """Greedy generation and scoring: `segrl eval`, SFT's before/after and the post-GRPO evaluation."""

    max_new_tokens: PositiveInt | None = Field(None, description="None: data.max_response_length (GRPO's)")
    batch_size: PositiveInt = Field(16, description="prompts generated together")


class TrainConfig(Section):
    """The GRPO run: length, staleness bound, checkpoints, where it starts from and writes to."""

    steps: PositiveInt = 30
    staleness: int = Field(1, ge=0,
                           description="eta: a response from weights version v trains step s only if s - v <= eta")
    staleness_mode: Literal["strict", "admission"] = Field(
        "strict", description="strict: s - v <= eta for every trained group; admission: AReaL's, eta bounds "
        "admission only and the learner never waits for or drops a slow group")
    groups_per_call: PositiveInt = Field(2, description="prompts per rollout call (must divide grpo.prompts_per_step)")
    max_in_flight: PositiveInt | None = Field(None, description="backpressure: groups admitted but not yet trained")
    straggler_timeout_s: float | None = Field(None, gt=0)
    stall_timeout_s: float | None = Field(600.0, gt=0, description="watchdog: replace an actor with work and no "
                                          "progress for this long (None: never)")
    max_retries: int = Field(2, ge=0, description="a sample whose stage call failed is re-queued this many times, "
                             "then dropped with the reason")
    max_learner_restarts: int = Field(2, ge=0, description="automatic resumes from the last checkpoint after a "
                                      "learner failure")
    checkpoint_every: PositiveInt = 10
    publish_every: NonNegativeInt | None = Field(
        None, description="write the servable model folder train.output/model every N steps trained, for `segrl "
        "serve --follow` (None: with each checkpoint, every train.checkpoint_every; 0: only at the end)")
    resume: bool | Literal["auto"] = Field(
        False, description="continue the run in train.output from its newest complete checkpoint: true (as "
        "`segrl train --resume`), false (a fresh run), auto (continue the GRPO run there, or start one in a new "
        "or empty folder: a retried job reruns the same command)")
    keep_checkpoints: int = Field(3, ge=2, description="complete checkpoints kept (the newest may be torn by a crash)")
    init_from: PathTemplate = Field("{runs_dir}/sft/model",
                                    description="model folder GRPO starts from (and its reference)")
    output: PathTemplate = "{runs_dir}/grpo"
    eval_samples: int = Field(64, ge=0, description="val samples evaluated after training (0: skip)")
    loggers: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = Field(
        ["jsonl", "tensorboard"], description="per-step metrics backends (pipelines/grpo/metrics_log.py); wandb and "
        "mlflow need their packages (pip install 'segrl[loggers]'); `segrl plot` reads jsonl")

    @field_validator("resume", mode="before")
    @classmethod
    def _resume(cls, value):
        if not (isinstance(value, bool) or value == "auto"):
            raise ValueError("expected true, false or auto")
        return value


class ActorResources(Section):
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)


class RolloutAutoscaleConfig(Section):
    """The rollout pool's size bounds and the thresholds of its scaling policy (cluster/rollout_scaling.py)."""

    min: PositiveInt = Field(1, description="fewest rollout engines")
    max: PositiveInt = Field(4, description="most rollout engines")
    window: PositiveInt = Field(3, description="steps observed at one pool size before a decision")
    settle: NonNegativeInt = Field(0, description="steps at a new pool size not counted: the groups they "
                                   "train were admitted before the change (eta is the natural value)")
    growth: float = Field(1.0, ge=1.0, le=8.0, description="a step up multiplies the engine count by this (at "
                          "least one engine; 1: one engine per decision)")
    shrink: float = Field(1.0, ge=1.0, le=8.0, description="a step down divides the engine count by this (at "
                          "least one engine; 1: one engine per decision)")
    idle_up: float = Field(0.1, gt=0, le=1, description="learner idle fraction from which it waits for data")
    queue_up: float = Field(1.0, gt=0, description="groups waiting for an engine (mean) from which engines are "
                            "the bottleneck")
    util_down: float = Field(0.5, ge=0, le=1, description="engine utilisation below which engines count as idle")
    press_share: float = Field(0.5, gt=0, le=1, description="share of trained groups at the staleness bound "
                               "(s - v = eta) from which staleness presses it")

    @model_validator(mode="after")
    def _bounds(self) -> "RolloutAutoscaleConfig":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class ClusterConfig(Section):
    """How many actors of each kind and what each asks of the Ray cluster."""

    address: str | None = Field(None, description="Ray address; default $RAY_ADDRESS or a new local cluster")
    rollout_actors: PositiveInt = 1
    rollout: ActorResources = ActorResources(num_cpus=0.5)
    learner_world_size: PositiveInt = 2
    learner: ActorResources = ActorResources(num_cpus=0.5)
    reward_workers: PositiveInt = 1
    reward: ActorResources = ActorResources(num_cpus=0.25)
    reference: ActorResources = ActorResources(num_cpus=0.25)
    max_actor_restarts: int = Field(3, ge=0,
                                    description="replacements of failed rollout/reference/reward actors, per pool")
    start_timeout_s: float = Field(900.0, gt=0, description="longest wait for actors to start (engines, learner group)")
    placement_timeout_s: float = Field(300.0, gt=0, description="longest wait for the placement groups (an "
                                       "autoscaler may add nodes); past it the run stops before any actor starts")
    rollout_autoscale: RolloutAutoscaleConfig | None = Field(
        None, description="bounds and thresholds of the rollout scaling policy (None: a fixed pool of rollout_actors)")

    @model_validator(mode="after")
    def _start_within_bounds(self) -> "ClusterConfig":
        bounds = self.rollout_autoscale
        if bounds is not None and not bounds.min <= self.rollout_actors <= bounds.max:
            raise ValueError(f"rollout_actors ({self.rollout_actors}) must lie within rollout_autoscale's "
                             f"[min, max] = [{bounds.min}, {bounds.max}]")
        return self


class RewardConfig(Section):
    """Reward preset (rewards.presets registry) and the slot-confidence threshold."""

    preset: str = "paper"
    weights: tuple[float, float] = Field((0.3, 0.7), description="(format, mask)")
    confidence_threshold: float = Field(0.5, ge=0, le=1)

    @field_validator("preset")
    @classmethod
    def _preset(cls, name: str) -> str:
        from rewards import get_preset

        get_preset(name)
        return name


class Config(Section):
    """The whole run configuration (one YAML file + dotted overrides)."""

    seed: int = 0
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    rollout: RolloutConfig = RolloutConfig()
    optim: OptimConfig = OptimConfig()
    grpo: GRPOConfig = GRPOConfig()
    seg_loss: SegLossConfig = SegLossConfig()
    sft: SftConfig = SftConfig()
    eval: EvalConfig = EvalConfig()
    train: TrainConfig = TrainConfig()
    cluster: ClusterConfig = ClusterConfig()
    reward: RewardConfig = RewardConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _chunks(self) -> "Config":
        if self.grpo.prompts_per_step % self.train.groups_per_call:
            raise ValueError(f"train.groups_per_call ({self.train.groups_per_call}) must divide "
                             f"grpo.prompts_per_step ({self.grpo.prompts_per_step})")
        return self

    @model_validator(mode="after")
    def _rollout_gpus(self) -> "Config":
        gpus, tp = self.cluster.rollout.num_gpus, self.rollout.tensor_parallel_size
        if (tp > 1 or gpus > 1) and gpus != tp:
            raise ValueError(f"cluster.rollout.num_gpus ({gpus:g}) must equal rollout.tensor_parallel_size ({tp}): "
                             "a rollout engine runs one tensor-parallel rank per GPU")
        return self

    @property
    def global_batch_size(self) -> int:
        """Responses per optimiser step: prompts per step times group size."""
        return self.grpo.prompts_per_step * self.rollout.group_size

    @property
    def eval_max_new_tokens(self) -> int:
        """Evaluation's generation cap: ``eval.max_new_tokens``, else the rollout's response length."""
        return self.eval.max_new_tokens or self.data.max_response_length

    def resolve_path(self, template: str) -> str:
        """Expand {work_dir}/{models_dir}/{data_dir}/{cache_dir}/{runs_dir} in a path value."""
        return expand(template, self.paths.folders())
