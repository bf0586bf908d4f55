"""The `model` section: the policy family, the tiny models' specs, SAM, the SAE and the segmentation head."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from config.paths import PathTemplate
from config.section import Section
from models.tiny_specs import (
    TinyLMAlignSpec,
    TinyLMSpec,
    TinySamPretrainSpec,
    TinySamSpec,
    TinySpec,
    TinyVisionPretrainSpec,
    TinyVisionSpec,
)


class TinyLMConfig(Section):
    """Shape of the offline-built Qwen2-style causal LM (make-tiny only)."""

    hidden_size: PositiveInt = TinyLMSpec.hidden_size
    num_layers: PositiveInt = TinyLMSpec.num_layers
    num_heads: PositiveInt = TinyLMSpec.num_heads
    num_kv_heads: PositiveInt = TinyLMSpec.num_kv_heads
    intermediate_size: PositiveInt = TinyLMSpec.intermediate_size
    vocab_size: int = Field(TinyLMSpec.vocab_size, ge=300, description="BPE target size incl. bytes and special tokens")
    max_position_embeddings: PositiveInt = TinyLMSpec.max_position_embeddings

    @model_validator(mode="after")
    def _heads(self) -> "TinyLMConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size // self.num_heads < 32:
            raise ValueError("head dim (hidden_size / num_heads) must be >= 32: vLLM's CPU attention rejects 16")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        return self


class TinyVisionConfig(Section):
    """Frozen tiny ViT producing patch features (the CLIP stand-in)."""

    image_size: int = Field(TinyVisionSpec.image_size, ge=16)
    patch_size: PositiveInt = TinyVisionSpec.patch_size
    hidden_size: PositiveInt = TinyVisionSpec.hidden_size
    num_layers: PositiveInt = TinyVisionSpec.num_layers
    num_heads: PositiveInt = TinyVisionSpec.num_heads

    @model_validator(mode="after")
    def _grid(self) -> "TinyVisionConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class TinySamConfig(Section):
    """Tiny SAM built from segment_anything.modeling classes."""

    image_size: int = Field(TinySamSpec.image_size, ge=32)
    patch_size: PositiveInt = TinySamSpec.patch_size
    encoder_dim: PositiveInt = TinySamSpec.encoder_dim
    encoder_depth: PositiveInt = TinySamSpec.encoder_depth
    encoder_heads: PositiveInt = TinySamSpec.encoder_heads
    prompt_dim: int = Field(TinySamSpec.prompt_dim, ge=8, description="SAM prompt/transformer dim; multiple of 8")
    decoder_mlp_dim: PositiveInt = TinySamSpec.decoder_mlp_dim
    decoder_heads: PositiveInt = TinySamSpec.decoder_heads
    mask_in_chans: int = Field(TinySamSpec.mask_in_chans, ge=8,
                               description="mask-prompt channels; //4 >= 2 so its LayerNorm is not constant")

    @model_validator(mode="after")
    def _sam_constraints(self) -> "TinySamConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.prompt_dim % 8:
            raise ValueError(f"prompt_dim {self.prompt_dim} must be a multiple of 8 (mask decoder upscaling)")
        if self.mask_in_chans % 4:
            raise ValueError(f"mask_in_chans {self.mask_in_chans} must be a multiple of 4")
        if (self.prompt_dim // 2) % self.decoder_heads:
            raise ValueError("prompt_dim / 2 must be divisible by decoder_heads (attention downsampling)")
        return self


class TinyVisionPretrainConfig(Section):
    """Per-patch attribute pretraining of the tiny vision tower (the CLIP stand-in), then frozen."""

    steps: PositiveInt = TinyVisionPretrainSpec.steps
    batch_size: PositiveInt = TinyVisionPretrainSpec.batch_size
    lr: float = Field(TinyVisionPretrainSpec.lr, gt=0)
    eval_scenes: PositiveInt = TinyVisionPretrainSpec.eval_scenes


class TinyLMAlignConfig(Section):
    """Image-text alignment of projector and tiny LM on scene descriptions (LLaVA's pretraining stand-in)."""

    steps: PositiveInt = TinyLMAlignSpec.steps
    batch_size: PositiveInt = TinyLMAlignSpec.batch_size
    lr: float = Field(TinyLMAlignSpec.lr, gt=0)
    eval_scenes: PositiveInt = TinyLMAlignSpec.eval_scenes


class TinySamPretrainConfig(Section):
    """Promptable-segmentation pretraining of the tiny SAM (as the real SAM arrives pretrained), then frozen."""

    steps: PositiveInt = TinySamPretrainSpec.steps
    batch_images: PositiveInt = Field(TinySamPretrainSpec.batch_images,
                                      description="scenes per step; every object is a prompt")
    lr: float = Field(TinySamPretrainSpec.lr, gt=0)
    weight_decay: float = Field(TinySamPretrainSpec.weight_decay, ge=0)
    warmup_steps: int = Field(TinySamPretrainSpec.warmup_steps, ge=0)
    grad_clip: float = Field(TinySamPretrainSpec.grad_clip, gt=0)
    refine_fraction: float = Field(TinySamPretrainSpec.refine_fraction, ge=0, le=1,
                                   description="objects decoded again with their first prediction as mask prompt")
    mask_prompt_fraction: float = Field(TinySamPretrainSpec.mask_prompt_fraction, ge=0, le=1,
                                        description="objects decoded from a coarse noisy GT mask prompt alone")
    seed_offset: int = Field(TinySamPretrainSpec.seed_offset, description="scene streams come from (seed, seed_offset)")
    eval_scenes: PositiveInt = Field(TinySamPretrainSpec.eval_scenes,
                                     description="held-out scenes for the recorded IoUs")


class TinyConfig(Section):
    """make-tiny's models. Defaults come from models.tiny_specs, the one place the models set them;
    ``pipelines.build.tiny_spec`` turns this section into a TinySpec."""

    seed: int = TinySpec.seed
    lm: TinyLMConfig = TinyLMConfig()
    vision: TinyVisionConfig = TinyVisionConfig()
    sam: TinySamConfig = TinySamConfig()
    vision_pretrain: TinyVisionPretrainConfig = TinyVisionPretrainConfig()
    lm_align: TinyLMAlignConfig = TinyLMAlignConfig()
    sam_pretrain: TinySamPretrainConfig = TinySamPretrainConfig()


class SamConfig(Section):
    variant: Literal["tiny", "vit_b", "vit_l", "vit_h"] = "tiny"
    checkpoint: str | None = Field(None, description="state dict path; tiny: built by make-tiny")


class SaeConfig(Section):
    """Frozen sparse autoencoder on a middle layer (SegCompass A.1-A.2, SAE-V style)."""

    layer: int = Field(2, ge=1, description="HF hidden_states index = output of decoder layer k (1-based)")
    expansion: PositiveInt = 8
    activation: Literal["relu", "topk"] = "relu"
    k: PositiveInt | None = Field(None, description="active features per token (topk only)")

    @model_validator(mode="after")
    def _topk(self) -> "SaeConfig":
        if (self.activation == "topk") != (self.k is not None):
            raise ValueError("k is required for activation topk and only allowed there")
        return self
    l1_coef: float = Field(5e-3, ge=0, description="L1 weight (relu only)")
    aux_coef: float = Field(1 / 32, ge=0, description="AuxK weight (topk only): trains latents silent for an epoch")
    lr: float = Field(5e-5, gt=0)
    batch_size: PositiveInt = 64
    epochs: PositiveInt = 10
    path: PathTemplate = Field("{models_dir}/sae", description="trained SAE folder (segrl sae-train writes it)")
    max_samples: PositiveInt = Field(1024, description="training samples whose states are collected")
    tokens_per_sample: PositiveInt = Field(48, description="layer-k states kept per sample (random subset)")
    val_fraction: float = Field(0.1, gt=0, lt=1)


class SegHeadConfig(Section):
    """Which segmentation head (models.heads.HEADS), its SegCompass settings, and which hidden
    state a reference token uses."""

    kind: str = Field("segcompass", description="segcompass: SAE slot head; read: <SEG> similarity points (READ)")
    codebook_dim: PositiveInt = 128
    act_threshold: float = Field(0.0, ge=0, description="SAE activations below it are dropped (released: 2.0)")
    top_k_features: PositiveInt = 8
    ref_position: Literal["token", "previous"] = Field(
        "token", description="token: the <SEG> position (paper); previous: the state that predicted it (LISA)"
    )

    @field_validator("kind")
    @classmethod
    def _registered(cls, kind: str) -> str:
        from models.heads import HEADS

        HEADS.get(kind)
        return kind


class ModelConfig(Section):
    family: Literal["tiny", "llava", "qwen2_5_vl"] = "tiny"
    name_or_path: PathTemplate = Field("{models_dir}/tiny", description="tiny: make-tiny's folder; else HF id or path")
    ref_token: str = "<SEG>"
    num_slots: int = Field(1, ge=1, le=64, description="K slot masks (1 = single object)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tiny: TinyConfig = TinyConfig()
    sam: SamConfig = SamConfig()
    sae: SaeConfig = SaeConfig()
    head: SegHeadConfig = SegHeadConfig()

    @model_validator(mode="after")
    def _read_slots(self) -> "ModelConfig":
        if self.head.kind == "read" and self.num_slots != 1:
            raise ValueError(f"head.kind read decodes one mask per response: num_slots must be 1, got {self.num_slots}")
        return self
