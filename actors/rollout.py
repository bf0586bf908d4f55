"""Rollout worker: a vLLM engine that samples groups of responses from prompt embeddings.

vLLM on CPU cannot run the vision tower, and the learner must see exactly the inputs the
engine saw, so the worker builds every prompt's embeddings itself with
``models.prompt.build_prompt_embeds``: the cached vision features (feature store, by
``image_hash``) go through the worker's copy of the projector, the prompt ids through its
copy of the LM's input embedding table, and vLLM gets ``prompt_embeds``.

- ``rollout_logprobs`` are the engine's raw log-probabilities of the sampled tokens
  (vLLM's default ``logprobs_mode``: before temperature and top-p), which is what
  ``Policy.forward`` recomputes for the importance ratio.
- The engine is seeded once from ``config.seed``: a per-request seed fails with prompt
  embeddings on CPU (DESIGN.md).
- A prompt whose image has no cached features raises ``MissingFeaturesError`` naming every
  such sample, before anything is generated: it means precompute was not run (or ran with
  other encoders) — a setup bug, not bad data, and an error row would only hide it from the
  scheduler until the rewards. The actor stays alive.
- Weight updates load in place (``reload_weights`` through ``collective_rpc``), never restart
  the engine, and interrupt a running call between two engine steps (its sequences are
  preempted and their KV recomputed with the new weights). A response's
  ``weights_version`` is the version its call began with, so the staleness bound holds
  for its oldest token.
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import ray
import torch

from actors.interruptible import InterruptibleEngine
from config import Config
from config.builders import feature_store
from data.trajectory import PROMPT_SCHEMA, ROLLOUT_SCHEMA, as_record_batch, require_columns
from data.weight_transport import PackedState, unpack_state
from models.projector import load_projector
from models.prompt import IMAGE_TOKEN, build_prompt_embeds

WEIGHTS_GROUP = "weights"  # the actor's threads for weight updates (and version queries)

# In-process engine (the actor is the process); a 1 GiB KV cache holds ~0.5M tiny-model
# tokens; one BLAS / OpenMP thread per actor, since more oversubscribe a shared node.
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}


class MissingFeaturesError(FileNotFoundError):
    """Prompts whose images have no cached vision features (run `segrl precompute`)."""


def default_max_model_len(config: Config) -> int | None:
    """Prompt + image tokens + response for the tiny family; None lets vLLM use the model's."""
    if config.model.family != "tiny":
        return None
    vision = config.model.tiny.vision
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    return config.data.max_prompt_length - 1 + image_tokens + config.data.max_response_length


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


class Rollout:
    """The worker's logic, usable in-process (benchmarks) or as the ``RolloutWorker`` actor.

    ``engine_args`` are extra ``vllm.LLM`` arguments (``max_num_seqs``,
    ``gpu_memory_utilization`` on GPU, ``max_model_len`` for non-tiny families, ...).
    """

    def __init__(self, config: Config, model_path: str | None = None, engine_args: dict | None = None):
        from transformers import AutoTokenizer
        from vllm import LLM

        self.config = config
        folder = Path(model_path or config.resolve_path(config.model.name_or_path))
        self.dtype = getattr(torch, config.model.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        vocab = self.tokenizer.get_vocab()
        for token in (IMAGE_TOKEN, config.model.ref_token):
            if token not in vocab:
                raise ValueError(f"tokenizer of {folder} has no {token} token")
        self.image_token_id = vocab[IMAGE_TOKEN]
        self.lm_shapes, self.embed_key = _lm_layout(folder)
        self.embed = torch.nn.Embedding.from_pretrained(_read_tensor(folder, self.embed_key).to(self.dtype))
        self.projector = load_projector(folder / "projector").to(self.dtype).eval()
        self.store = feature_store(config)
        args = dict(max_model_len=default_max_model_len(config), enable_prompt_embeds=True,
                    dtype=config.model.dtype, seed=config.seed, enforce_eager=True)
        args.update(engine_args or {})
        self.llm = LLM(model=str(folder), **args)
        self.engine = InterruptibleEngine(self.llm)

    def ping(self) -> bool:
        return True

    @ray.method(concurrency_group=WEIGHTS_GROUP)
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
        """ROLLOUT_SCHEMA rows: ``group_size`` (default config's G) responses per prompt row.

        ``greedy`` decodes at temperature 0 (tests, eval); ``max_tokens`` (one value or one per
        prompt) defaults to ``data.max_response_length``; ``ignore_eos`` forces the full length
        (benchmarks). ``min_version``: wait for these weights first (the pool passes the
        version it last broadcast, whose update may still be loading in another thread).
        """
        from vllm import SamplingParams

        batch = as_record_batch(prompt_batch)
        require_columns(batch, PROMPT_SCHEMA, "prompt batch")
        sample_ids = batch.column("sample_id").to_pylist()
        hashes = batch.column("image_hash").to_pylist()
        missing = sorted({(s, h) for s, h in zip(sample_ids, hashes) if not self.store.has(h)})
        if missing:
            listed = ", ".join(f"{s} (image {h})" for s, h in missing)
            raise MissingFeaturesError(f"no cached vision features in {self.store.root} for sample(s) {listed}: "
                                       "run `segrl precompute` with this model's encoders")
        g = group_size or self.config.rollout.group_size
        lengths = max_tokens or self.config.data.max_response_length
        lengths = [lengths] * batch.num_rows if isinstance(lengths, int) else list(lengths)
        if len(lengths) != batch.num_rows:
            raise ValueError(f"max_tokens has {len(lengths)} values for {batch.num_rows} prompts")
        sampling = dict(temperature=0.0) if greedy else dict(temperature=self.config.rollout.temperature,
                                                            top_p=self.config.rollout.top_p)
        # detokenize=False: vLLM would decode every step; `_rows` decodes each response once.
        params = [SamplingParams(n=g, max_tokens=n, logprobs=0, ignore_eos=ignore_eos, detokenize=False, **sampling)
                  for n in lengths]
        outputs, version = self.engine.generate(
            lambda: [{"prompt_embeds": self.prompt_embeds(ids, h)}
                     for ids, h in zip(batch.column("prompt_ids").to_pylist(), hashes)], params, min_version)
        return self._rows(batch, sample_ids, outputs, g, version)

    def _rows(self, batch: pa.RecordBatch, sample_ids: list[str], outputs, g: int, version: int) -> pa.RecordBatch:
        """Prompt columns repeated per response (Arrow take), then the rollout columns."""
        group_ids, tokens, logprobs, texts = [], [], [], []
        for sample_id, request in zip(sample_ids, outputs):
            group_ids += [f"{sample_id}@{uuid.uuid4().hex[:16]}"] * g
            for out in sorted(request.outputs, key=lambda o: o.index):
                ids = list(out.token_ids)
                tokens.append(ids)
                logprobs.append([step[t].logprob for step, t in zip(out.logprobs, ids)])
                texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        n = len(tokens)
        prompt_part = batch.select(PROMPT_SCHEMA.names).take(pa.array([i // g for i in range(n)], pa.int64()))
        rollout = [
            pa.array(group_ids, pa.string()),
            pa.array([i % g for i in range(n)], pa.int32()),
            pa.array([g] * n, pa.int32()),
            pa.array(tokens, pa.list_(pa.int32())),
            pa.array(logprobs, pa.list_(pa.float32())),
            pa.array([version] * n, pa.int32()),
            pa.array(texts, pa.string()),
        ]
        return pa.RecordBatch.from_arrays(prompt_part.columns + rollout, schema=ROLLOUT_SCHEMA)

    @ray.method(concurrency_group=WEIGHTS_GROUP)
    def update_weights(self, state: dict[str, torch.Tensor] | PackedState, version: int) -> dict[str, float]:
        """Load ``lm.<hf name>`` / ``projector.<name>`` tensors in place; timings (s) and ``interrupted``.

        Pass the ref of ``ray.put(pack_state(state))``: read zero-copy here (a plain tensor
        dict works too, at two extra copies). Every LM and projector tensor is required: a
        partly loaded fused layer (qkv, gate-up) would mix old and new weights in one matrix.
        A call generating meanwhile is interrupted: the weights land between two engine
        steps and its running sequences continue with them (``actors.interruptible``).
        Versions only grow: an update older than the loaded weights is not loaded.
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
            self.llm.collective_rpc(_reload, args=(list(lm.items()),))
            timings["engine_s"] = time.perf_counter() - engine_start

        interrupted = self.engine.update(load, version)
        return {"engine_s": timings.get("engine_s", 0.0), "total_s": time.perf_counter() - start,
                "interrupted": interrupted}

    def _check_update(self, state: dict[str, torch.Tensor]) -> None:
        """Names and shapes, all checked before anything is loaded: an update is all or nothing."""
        expected = {f"lm.{k}": s for k, s in self.lm_shapes.items()}
        expected |= {f"projector.{k}": tuple(v.shape) for k, v in self.projector.state_dict().items()}
        unknown = sorted(k for k in set(state) - set(expected) if not k.startswith("head."))  # head: the reference actor's
        missing = sorted(set(expected) - set(state))
        wrong = sorted(k for k, s in expected.items() if k in state and tuple(state[k].shape) != s)
        if unknown or missing or wrong:
            raise ValueError(f"weight update refused: unknown keys {unknown[:5]}, missing keys {missing[:5]}, "
                             f"wrong shapes {wrong[:5]} (expected lm.<HF name> and projector.<name>)")


# The actor: ``RolloutWorker.options(num_cpus=...)`` sets its CPU share. Threaded, so a
# weight update can reach the engine while a call generates (calls to the engine itself
# are serialised by ``InterruptibleEngine``); updates have threads of their own, so calls
# waiting for their weights (``min_version``) can never hold every thread the update needs.
ACTOR_OPTIONS = dict(num_cpus=0.5, max_concurrency=8, concurrency_groups={WEIGHTS_GROUP: 4},
                     runtime_env={"env_vars": ENGINE_ENV})
RolloutWorker = ray.remote(**ACTOR_OPTIONS)(Rollout)
