"""Rollout engine (vLLM behind `models.rollout.RolloutCore`) vs transformers `generate`.

Usage: python bench/rollout.py [--work-dir work/bench-rollout] [--models tiny,50m]
       [--prompts 8] [--group 8] [--tokens 64] [--threads 1] [--engine-arg max_num_seqs=256 ...]

Same policy weights, prompts (synthetic questions + random vision features of the real
shape), and sampling (temperature 1, top-p 1, no top-k) on both sides. Two length regimes:
- fixed: every response exactly `--tokens` long (EOS ignored);
- long-tail: per-response lengths drawn from a log-normal (median tokens/2, sigma 0.9,
  clipped to [4, 4 x tokens]); vLLM stops each sequence at its own length, transformers'
  static batch runs to the longest, so its useful tokens are the drawn lengths.
Tokens/s count generated tokens; the vLLM time is the core's whole `generate` call
(prompt embeddings, engine, Arrow rows). Roofline: the best fp32 GEMM (2048^3, torch or
vLLM's oneDNN) timed between the cases at the same thread count, the best of those (the node
is shared, so it moves); a generated token costs 2 x (LM parameters except the input embedding table)
FLOPs; prefill and attention FLOPs are not counted. The ~50M model is a Qwen2-style LM built
here offline (hidden 512, 16 layers, 8 heads of 64, 2 KV heads, MLP 1536), tiny tokenizer.

Tried on the 50M model (2-core node, 1 thread): vLLM n=G and G copies of a prompt are equal
within noise (both share the prompt's prefill through prefix caching on the embeddings);
128-256 sequences instead of 64 and `custom_ops=all` moved the fraction by a few points at
most; `detokenize=False` (the worker decodes once) saves ~3% (profile); a torch-compiled engine
(`--engine-arg enforce_eager=false`, ~35 s more at start) gives 59-64% vs 55-57% eager over four runs. In a
profile GEMMs (oneDNN) are 2/3 of the time, CPU attention ~11%, the rest norms, activations
and the scheduler. transformers loses on prefilling every copy of a prompt and on copying
the KV cache every step (GQA `repeat_kv` reshapes: ~27% of its decode time).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import torch  # noqa: E402

sys.path[0] = str(Path(__file__).resolve().parents[1])

from config import load_config  # noqa: E402
from config.builders import feature_store, rollout_settings  # noqa: E402
from data.trajectory import make_prompt_batch  # noqa: E402
from models.policy import load_policy  # noqa: E402
from models.projector import Projector, save_projector  # noqa: E402
from models.prompt import prompt_ids  # noqa: E402
from models.tiny import TinyLMSpec, build_lm  # noqa: E402

LM_50M = TinyLMSpec(hidden_size=512, num_layers=16, num_heads=8, num_kv_heads=2, intermediate_size=1536,
                    max_position_embeddings=4096)


def workspace(work_dir: str, n_prompts: int):
    """(config, prompt rows): tiny models + synthetic questions, random cached vision features."""
    from data.schema import read_samples
    from pipelines.build import build_synthetic, build_tiny

    config = load_config("configs/tiny.yaml", [f"paths.work_dir={work_dir}", "data.synthetic.n_train=64",
                                               "data.synthetic.n_val=8", "data.synthetic.n_test=8"])
    build_synthetic(config)
    build_tiny(config)
    _, tokenizer = load_policy("tiny", config.resolve_path(config.model.name_or_path), config.model.ref_token, 1)
    samples = read_samples(Path(config.resolve_path(config.data.root)) / "train.parquet")
    vision = config.model.tiny.vision
    n_patches = (vision.image_size // vision.patch_size) ** 2
    store, gen = feature_store(config), torch.Generator().manual_seed(0)
    rows = []
    for i in range(n_prompts):
        digest = hashlib.sha256(f"bench-{i}".encode()).hexdigest()
        if not store.has(digest):
            store.put(digest, {"vision": torch.randn(n_patches, vision.hidden_size, generator=gen),
                               "sam": torch.zeros(1, 1, 1), "sam_input_size": torch.tensor([64, 64]),
                               "original_size": torch.tensor([64, 64])})
        s = samples[i % len(samples)]
        rows.append({"sample_id": f"{s.sample_id}-{i}", "image_hash": digest, "gt_masks": [],
                     "prompt_ids": prompt_ids(tokenizer, s.question, config.model.ref_token), "no_target": False})
    return config, rows


def build_50m(config, folder: Path) -> Path:
    """The ~50M Qwen2-style LM + a projector, saved like a make-tiny folder (once)."""
    if (folder / "projector" / "config.json").is_file():
        return folder
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.resolve_path(config.model.name_or_path))
    torch.manual_seed(0)
    lm = build_lm(LM_50M, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    lm.generation_config.eos_token_id, lm.generation_config.pad_token_id = (tokenizer.eos_token_id,
                                                                           tokenizer.pad_token_id)
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_projector(Projector(config.model.tiny.vision.hidden_size, LM_50M.hidden_size), folder / "projector")
    return folder


def matmul_flops(n: int = 2048, repeats: int = 3) -> float:
    """The roofline: best fp32 GEMM FLOP/s now, at the current thread count.

    Both torch's matmul and the oneDNN GEMM that vLLM's CPU linear layers call are timed;
    the faster counts (oneDNN was ~15% faster here).
    """
    from vllm import _custom_ops as ops

    a, b = torch.randn(n, n), torch.randn(n, n)
    handler = ops.create_onednn_mm(b, 32)
    best = 0.0
    for run in (lambda: a @ b, lambda: ops.onednn_mm(handler, a, None)):
        run()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
    return best


@torch.no_grad()
def hf_generate(policy, tokenizer, embeds: list[torch.Tensor], lengths: list[int], config) -> tuple[int, float]:
    """(useful tokens, seconds): one static batch, left-padded, run to the longest length."""
    width = max(e.shape[0] for e in embeds)
    batch = embeds[0].new_zeros(len(embeds), width, embeds[0].shape[1])
    mask = torch.zeros(len(embeds), width, dtype=torch.long)
    for i, e in enumerate(embeds):
        batch[i, width - e.shape[0]:], mask[i, width - e.shape[0]:] = e, 1
    longest = max(lengths)
    start = time.perf_counter()
    out = policy.lm.generate(inputs_embeds=batch, attention_mask=mask, max_new_tokens=longest,
                             min_new_tokens=longest, do_sample=True, temperature=config.rollout.temperature,
                             top_p=config.rollout.top_p, top_k=0, pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    assert out.shape[1] == longest, out.shape
    return sum(lengths), seconds


def prompt_batch(rows: list[dict]) -> pa.RecordBatch:
    """The rows as one prompt batch, one group each."""
    return make_prompt_batch([{**row, "group_id": i} for i, row in enumerate(rows)])


def vllm_generate(rollout, rows: list[dict], lengths: list[int] | int, group: int) -> tuple[int, float]:
    """(generated tokens, seconds) of one `RolloutCore.generate` call, EOS ignored."""
    batch = prompt_batch(rows)
    start = time.perf_counter()
    out = rollout.generate(batch, group_size=group, max_tokens=lengths, ignore_eos=True)
    seconds = time.perf_counter() - start
    return sum(pc.list_value_length(out.column("response_ids")).to_pylist()), seconds


def bench_model(name: str, folder: Path, config, rows, args) -> None:
    from models.rollout import RolloutCore

    policy, tokenizer = load_policy("tiny", str(folder), config.model.ref_token, 1)
    policy.eval()
    params = sum(p.numel() for p in policy.lm.parameters()) - policy.embed_tokens.weight.numel()
    flop_per_token = 2 * params
    g, t = args.group, args.tokens
    rng = np.random.default_rng(0)
    tail = np.clip(np.round(rng.lognormal(np.log(t / 2), 0.9, len(rows) * g)), 4, 4 * t).astype(int).tolist()
    copies = [r for r in rows for _ in range(g)]
    vision = config.model.tiny.vision
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    engine_args = {"max_model_len": config.data.max_prompt_length + image_tokens + 4 * t, **args.engine_args}
    rollout = RolloutCore(rollout_settings(config, str(folder)), feature_store(config), engine_args)
    vllm_generate(rollout, rows, t, g)  # warm-up at full size: kernels, first touch of the KV cache

    store = rollout.store
    with torch.no_grad():
        embeds = [policy.prompt_embeds(r["prompt_ids"], store.get(r["image_hash"])["vision"]) for r in copies]
    hf_generate(policy, tokenizer, embeds[:2], [2, 2], config)  # warm-up
    cases = [
        ("fixed   | vLLM n=G", lambda: vllm_generate(rollout, rows, t, g)),
        ("fixed   | vLLM G copies", lambda: vllm_generate(rollout, copies, t, 1)),
        ("fixed   | transformers", lambda: hf_generate(policy, tokenizer, embeds, [t] * len(copies), config)),
        ("tail    | vLLM", lambda: vllm_generate(rollout, copies, tail, 1)),
        ("tail    | transformers", lambda: hf_generate(policy, tokenizer, embeds, tail, config)),
    ]
    measured, gemm = {}, [matmul_flops()]
    for label, run in cases:  # GEMM timed between cases: the node is shared, so the peak moves
        measured[label] = run()
        gemm.append(matmul_flops())
    peak = max(gemm)
    roof = peak / flop_per_token
    print(f"\n== {name}: {params / 1e6:.1f}M matmul parameters, {len(rows)} prompts x {g} responses; GEMM "
          f"{min(gemm) / 1e9:.0f}-{peak / 1e9:.0f} GFLOP/s during the run, roofline at the best {roof:,.0f} tok/s")
    print(f"{'case':<26}{'tokens':>8}{'seconds':>9}{'tok/s':>9}{'roofline':>10}")
    results = {}
    for label, (tokens, seconds) in measured.items():
        results[label] = tokens / seconds
        print(f"{label:<26}{tokens:>8}{seconds:>9.2f}{tokens / seconds:>9,.0f}{tokens / seconds / roof:>10.1%}")
    print(f"ratio vLLM / transformers: fixed {results['fixed   | vLLM n=G'] / results['fixed   | transformers']:.2f}x, "
          f"long-tail {results['tail    | vLLM'] / results['tail    | transformers']:.2f}x "
          f"(tail lengths: mean {np.mean(tail):.0f}, max {max(tail)})")
    del rollout


def engine_arg(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work-dir", default="work/bench-rollout")
    parser.add_argument("--models", default="tiny,50m")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engine-arg", type=engine_arg, action="append", default=[], dest="engine_args",
                        help="extra vllm.LLM argument, e.g. max_num_seqs=256 (repeatable)")
    args = parser.parse_args()
    args.engine_args = dict(args.engine_args)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # vLLM keeps torch's thread count when this is set
    torch.set_num_threads(args.threads)
    config, rows = workspace(args.work_dir, args.prompts)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"cpu_count={os.cpu_count()}, torch threads={torch.get_num_threads()}, torch {torch.__version__}; "
          f"engine args {args.engine_args or 'default'}")
    folders = {"tiny": Path(config.resolve_path(config.model.name_or_path)),
               "50m": Path(config.resolve_path("{models_dir}/bench-50m"))}
    for name in args.models.split(","):
        folder = build_50m(config, folders[name]) if name == "50m" else folders[name]
        bench_model(name, folder, config, rows, args)


if __name__ == "__main__":
    main()
