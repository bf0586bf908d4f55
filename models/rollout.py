"""The rollout role's core, Ray-free: a vLLM engine that samples groups of responses from prompt embeddings.

vLLM on CPU cannot run the vision tower, and the learner must see exactly the inputs the
engine saw, so the core builds every prompt's embeddings itself with
``models.prompt.build_prompt_embeds``: the cached vision features (feature store, by
``image_hash``) go through the core's copy of the projector, the prompt ids through its
copy of the LM's input embedding table, and vLLM gets ``prompt_embeds``.

- ``rollout_logprobs`` are the engine's raw log-probabilities of the sampled tokens
  (vLLM's default ``logprobs_mode``: before temperature and top-p), which is what
  ``Policy.forward`` recomputes for the importance ratio.
- The engine is seeded once from ``RolloutSettings.seed``: a per-request seed fails with
  prompt embeddings on CPU.
- Every response row carries its prompt row's ``group_id``: the ledger's id of the group,
  so a batch's groups can be traced to the scheduler's.
- A prompt whose image has no cached features raises ``MissingFeaturesError`` naming every
  such sample, before anything is generated: it means precompute was not run (or ran with
  other encoders) — a setup bug, not bad data, and an error row would only hide it from the
  scheduler until the rewards.
- Weight updates load in place (``reload_weights`` through ``collective_rpc``), never restart
  the engine, and interrupt a running call between two engine steps (its sequences are
  preempted and their KV recomputed with the new weights). A response's
  ``weights_version`` is the version its call began with, so the staleness bound holds
  for its oldest token.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import torch

from data.features import FeatureStore
from data.trajectory import PROMPT_SCHEMA, ROLLOUT_SCHEMA, as_record_batch, require_columns
from data.weight_transport import PackedState, unpack_state
from models.interruptible import InterruptibleEngine
from models.projector import load_projector
from models.prompt import IMAGE_TOKEN, build_prompt_embeds

ENGINE_KEYS = ("max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization", "enable_chunked_prefill")
"""``vllm.LLM`` (EngineArgs) arguments a config may set; unset ones keep vLLM's defaults."""


@dataclass(frozen=True)
class RolloutSettings:
    """What the rollout core reads of the config (``config.builders.rollout_settings``)."""

    model_dir: str  # HF folder: tokenizer, causal LM, projector/
    dtype: str
    ref_token: str
    seed: int
    group_size: int
    temperature: float
    top_p: float
    max_response_length: int
    max_model_len: int | None  # prompt + image tokens + response; None: vLLM uses the model's
    engine: dict  # the ENGINE_KEYS the config sets


class MissingFeaturesError(FileNotFoundError):
    """Prompts whose images have no cached vision features (run `segrl precompute`)."""


def _read_tensor(folder: Path, key: str) -> torch.Tensor:
    """One tensor of a (possibly sharded) safetensors checkpoint, without loading the rest."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    name = json.loads(index.read_text())["weight_map"][key] if index.is_file() else "model.safetensors"
    with safe_open(str(folder / name), "pt") as f:
        return f.get_tensor(key)


def _lm_layout(folder: Path) -> tuple[dict[str, tuple[int, ...]], str]:
    """(shape of every state-dict tensor of the HF causal LM, the name of its input embedding)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    embed = lm.get_input_embeddings().weight
    embed_name = next(n for n, p in lm.named_parameters() if p is embed)
    return {k: tuple(v.shape) for k, v in lm.state_dict().items()}, embed_name


def _reload(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs inside the vLLM worker: checkpoint-format names, vLLM fuses qkv / gate-up itself."""
    worker.model_runner.reload_weights(weights_iterator=iter(weights))


def open_engine(settings: RolloutSettings, engine_args: dict | None = None):
    """The vLLM engine of ``settings.model_dir``, fed prompt embeddings (the settings' engine arguments,
    then ``engine_args``); eager, seeded once."""
    from vllm import LLM

    args = dict(max_model_len=settings.max_model_len, enable_prompt_embeds=True,
                dtype=settings.dtype, seed=settings.seed, enforce_eager=True, **settings.engine)
    args.update(engine_args or {})
    return LLM(model=str(settings.model_dir), **args)


def reload_engine(llm, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Load LM tensors (HF checkpoint names) into a running engine, in place."""
    llm.collective_rpc(_reload, args=(weights,))


class RolloutCore:
    """The engine, the prompt-embedding modules and the feature store of one rollout worker.

    The engine gets the settings' ``engine`` arguments, then ``engine_args`` (the placement's
    ``tensor_parallel_size`` and Ray executor on GPUs, benchmarks' overrides). On a GPU it
    runs on the GPUs Ray gave the actor (CUDA_VISIBLE_DEVICES) or, tensor-parallel, in Ray
    workers in the actor's placement group.
    """

    def __init__(self, settings: RolloutSettings, store: FeatureStore, engine_args: dict | None = None):
        from transformers import AutoTokenizer

        self.settings, self.store = settings, store
        folder = Path(settings.model_dir)
        self.dtype = getattr(torch, settings.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        vocab = self.tokenizer.get_vocab()
        for token in (IMAGE_TOKEN, settings.ref_token):
            if token not in vocab:
                raise ValueError(f"tokenizer of {folder} has no {token} token")
        self.image_token_id = vocab[IMAGE_TOKEN]
        self.lm_shapes, self.embed_key = _lm_layout(folder)
        self.embed = torch.nn.Embedding.from_pretrained(_read_tensor(folder, self.embed_key).to(self.dtype))
        self.projector = load_projector(folder / "projector").to(self.dtype).eval()
        self.llm = open_engine(settings, engine_args)
        self.engine = InterruptibleEngine(self.llm)

    @property
    def version(self) -> int:
        return self.engine.version

    @torch.no_grad()
    def prompt_embeds(self, prompt_ids: list[int], image_hash: str) -> torch.Tensor:
        """The [T, H] engine input of one prompt, built as the learner builds it."""
        vision = self.store.get(image_hash)["vision"]
        return build_prompt_embeds(prompt_ids, self.image_token_id, vision, self.projector, self.embed).contiguous()

    def generate(self, prompt_batch: pa.RecordBatch | pa.Table, *, group_size: int | None = None,
                 greedy: bool = False, max_tokens: int | Sequence[int] | None = None,
                 ignore_eos: bool = False, min_version: int = 0) -> pa.RecordBatch:
        """ROLLOUT_SCHEMA rows: ``group_size`` (default the settings' G) responses per prompt row.

        ``greedy`` decodes at temperature 0 (tests, eval); ``max_tokens`` (one value or one per
        prompt) defaults to ``max_response_length``; ``ignore_eos`` forces the full length
        (benchmarks). ``min_version``: wait for these weights first (the pool passes the
        version it last broadcast, whose update may still be loading in another thread).
        """
        from vllm import SamplingParams

        batch = as_record_batch(prompt_batch)
        require_columns(batch, PROMPT_SCHEMA, "prompt batch")
        group_ids = batch.column("group_id")
        if group_ids.null_count or len(set(group_ids.to_pylist())) != batch.num_rows:
            raise ValueError(f"prompt batch: every row needs its own group_id, got {group_ids.to_pylist()}")
        sample_ids = batch.column("sample_id").to_pylist()
        hashes = batch.column("image_hash").to_pylist()
        missing = sorted({(s, h) for s, h in zip(sample_ids, hashes) if not self.store.has(h)})
        if missing:
            listed = ", ".join(f"{s} (image {h})" for s, h in missing)
            raise MissingFeaturesError(f"no cached vision features in {self.store.root} for sample(s) {listed}: "
                                       "run `segrl precompute` with this model's encoders")
        s = self.settings
        g = group_size or s.group_size
        lengths = max_tokens or s.max_response_length
        lengths = [lengths] * batch.num_rows if isinstance(lengths, int) else list(lengths)
        if len(lengths) != batch.num_rows:
            raise ValueError(f"max_tokens has {len(lengths)} values for {batch.num_rows} prompts")
        sampling = dict(temperature=0.0) if greedy else dict(temperature=s.temperature, top_p=s.top_p)
        # detokenize=False: vLLM would decode every step; `_rows` decodes each response once.
        params = [SamplingParams(n=g, max_tokens=n, logprobs=0, ignore_eos=ignore_eos, detokenize=False, **sampling)
                  for n in lengths]
        outputs, version = self.engine.generate(
            lambda: [{"prompt_embeds": self.prompt_embeds(ids, h)}
                     for ids, h in zip(batch.column("prompt_ids").to_pylist(), hashes)], params, min_version)
        return self._rows(batch, outputs, g, version)

    def _rows(self, batch: pa.RecordBatch, outputs, g: int, version: int) -> pa.RecordBatch:
        """Prompt columns (group_id included) repeated per response (Arrow take), then the rollout columns."""
        tokens, logprobs, texts = [], [], []
        for request in outputs:
            for out in sorted(request.outputs, key=lambda o: o.index):
                ids = list(out.token_ids)
                tokens.append(ids)
                logprobs.append([step[t].logprob for step, t in zip(out.logprobs, ids)])
                texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        n = len(tokens)
        prompt_part = batch.select(PROMPT_SCHEMA.names).take(pa.array([i // g for i in range(n)], pa.int64()))
        rollout = [
            pa.array([i % g for i in range(n)], pa.int32()),
            pa.array([g] * n, pa.int32()),
            pa.array(tokens, pa.list_(pa.int32())),
            pa.array(logprobs, pa.list_(pa.float32())),
            pa.array([version] * n, pa.int32()),
            pa.array(texts, pa.string()),
        ]
        return pa.RecordBatch.from_arrays(prompt_part.columns + rollout, schema=ROLLOUT_SCHEMA)

    def update_weights(self, state: dict[str, torch.Tensor] | PackedState, version: int) -> dict[str, float]:
        """Load ``lm.<hf name>`` / ``projector.<name>`` tensors in place; timings (s) and ``interrupted``.

        A PackedState is read zero-copy (a plain tensor dict works too, at two extra copies).
        Every LM and projector tensor is required: a partly loaded fused layer (qkv, gate-up)
        would mix old and new weights in one matrix. A call generating meanwhile is
        interrupted: the weights land between two engine steps and its running sequences
        continue with them (``models.interruptible``). Versions only grow: an update older
        than the loaded weights is not loaded.
        """
        start = time.perf_counter()
        state = unpack_state(state) if isinstance(state, PackedState) else state
        lm = {k[3:]: v for k, v in state.items() if k.startswith("lm.")}
        projector = {k[10:]: v for k, v in state.items() if k.startswith("projector.")}
        self._check_update(state)
        timings = {}

        @torch.no_grad()
        def load() -> None:
            self.projector.load_state_dict(projector, strict=True)
            self.embed.weight.copy_(lm[self.embed_key])
            engine_start = time.perf_counter()
            reload_engine(self.llm, list(lm.items()))
            timings["engine_s"] = time.perf_counter() - engine_start

        interrupted = self.engine.update(load, version)
        return {"engine_s": timings.get("engine_s", 0.0), "total_s": time.perf_counter() - start,
                "interrupted": interrupted}

    def _check_update(self, state: dict[str, torch.Tensor]) -> None:
        """Names and shapes, all checked before anything is loaded: an update is all or nothing."""
        expected = {f"lm.{k}": s for k, s in self.lm_shapes.items()}
        expected |= {f"projector.{k}": tuple(v.shape) for k, v in self.projector.state_dict().items()}
        unknown = sorted(k for k in set(state) - set(expected)
                         if not k.startswith("head."))  # head: the reference actor's
        missing = sorted(set(expected) - set(state))
        wrong = sorted(k for k, s in expected.items() if k in state and tuple(state[k].shape) != s)
        if unknown or missing or wrong:
            raise ValueError(f"weight update refused: unknown keys {unknown[:5]}, missing keys {missing[:5]}, "
                             f"wrong shapes {wrong[:5]} (expected lm.<HF name> and projector.<name>)")
