"""The learner: its micro-batch plan and loss, and the DeepSpeed ZeRO-3 group on local Ray.

One synthetic step's batch: 2 prompts x 4 responses from the SFT-style targets (the
full target has a <SEG>, a truncated one has none), rollout/reference logprobs from the
initial policy plus noise, advantages +-1. Groups are built once per module: the shm op
DeepSpeed compiles on CPU is cached under work/cache/torch_extensions.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
import ray
import torch

from config.builders import build_segmenter, feature_store, loss_settings
from data.features import content_hash
from data.integrity import describe, files_under
from data.loader import SegDataset
from data.schema import encode_mask, resolve_image
from data.synthetic import sft_target
from data.trajectory import REF_LOGPROBS_FIELD, ROLLOUT_SCHEMA
from data.weight_transport import unpack_state
from models.grpo_step import LossTotals, learner_loss
from models.learner import learner_rows, lockstep_plan
from models.learner_backend import choose_backend
from models.learner_checkpoint import check_globals
from models.prompt import prompt_ids

LEARNER_SCHEMA = pa.schema(list(ROLLOUT_SCHEMA) + [REF_LOGPROBS_FIELD, pa.field("advantage", pa.float32()),
                                                   pa.field("error", pa.string())])
EXTENSIONS = str(Path("work/cache/torch_extensions").resolve())
ZERO = {"stage3_param_persistence_threshold": 0}  # partition even tiny tensors: lockstep is exercised


def learner_config(workspace, **model):
    config = workspace["config"].model_copy(deep=True)
    config.grpo.micro_batch_size = 2
    for key, value in model.items():
        setattr(config.model, key, value)
    return config


def responses(tokenizer, item, ref_token, full: list[bool]) -> list[list[int]]:
    target = tokenizer(sft_target(item.sample, ref_token), add_special_tokens=False)["input_ids"]
    return [target + [tokenizer.eos_token_id] if f else target[: len(target) - 2 - 3 * k]
            for k, f in enumerate(full)]


def make_rows(config) -> list[dict]:
    """Rows of LEARNER_SCHEMA: prompt 0 answers <SEG> 4 times, prompt 1 once (uneven shards)."""
    torch.manual_seed(0)
    model, tokenizer, img_size = build_segmenter(config)
    split = Path(config.resolve_path(config.data.root)) / "train.parquet"
    data = SegDataset(split, feature_store(config), img_size)
    items = [it for it in (data[i] for i in range(len(data))) if not it.sample.no_target][:2]
    rows, gen = [], torch.Generator().manual_seed(1)
    for p, (item, full) in enumerate(zip(items, ([True] * 4, [True, False, False, False]))):
        image_hash = content_hash(resolve_image(split, item.sample.image_path))
        for k, resp in enumerate(responses(tokenizer, item, config.model.ref_token, full)):
            rows.append(dict(sample_id=item.sample.sample_id, image_hash=image_hash,
                             prompt_ids=prompt_ids(tokenizer, item.sample.question, config.model.ref_token),
                             gt_masks=[encode_mask(m.numpy() >= 0.5) for m in item.gt_lowres], no_target=False,
                             group_id=p, response_index=k, group_size=4, response_ids=resp,
                             weights_version=0, text="", advantage=1.0 if k % 2 else -1.0, error=None))
    feats = [data.store.get(r["image_hash"]) for r in rows]
    with torch.no_grad():
        out, _ = model([r["prompt_ids"] for r in rows], [f["vision"] for f in feats],
                       [r["response_ids"] for r in rows], [f["sam"] for f in feats])
    for i, r in enumerate(rows):
        lp = out.logprobs[i, : len(r["response_ids"])]
        r["rollout_logprobs"] = (lp + 0.1 * torch.randn(lp.shape, generator=gen)).tolist()
        r["ref_logprobs"] = (lp + 0.1 * torch.randn(lp.shape, generator=gen)).tolist()
    return rows


@pytest.fixture(scope="module")
def batch(tiny_workspace, tiny_sae) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(make_rows(learner_config(tiny_workspace)), schema=LEARNER_SCHEMA)


@pytest.fixture(scope="module")
def rows(batch) -> list[dict]:
    """The batch as the learner reads it (GT masks decoded)."""
    return learner_rows([batch])


# ---------------------------------------------------------------- plan and loss (no DeepSpeed)


@pytest.mark.parametrize("n_rows,world_size,micro", [(7, 1, 2), (7, 2, 2), (7, 2, 1), (7, 3, 4), (7, 4, 1), (2, 3, 1)])
def test_lockstep_plan_covers_rows_once_and_matches_module_calls_across_ranks(n_rows, world_size, micro):
    has_ref = [True, True, True, False, True, False, False][:n_rows]
    plan = lockstep_plan(has_ref, world_size, micro)
    live = sorted(i for rank in plan for idx, flags in rank for i, f in zip(idx, flags) if f)
    assert live == list(range(len(has_ref)))
    assert len({len(rank) for rank in plan}) == 1  # same micro-batch count on every rank
    for j in range(len(plan[0])):
        calls = {(sum(has_ref[i] for i in plan[r][j][0]), len(plan[r][j][0])) for r in range(world_size)}
        assert len(calls) == 1  # same rows with / without <SEG> on every rank
        assert all(sum(plan[r][j][1]) <= micro for r in range(world_size))  # live rows


def test_learner_loss_reaches_every_trainable_role(tiny_workspace, tiny_sae, rows):
    # K = 2 slots: the confidence loss trains the codebook and slot mapper even where the
    # tiny SAM's 1-channel mask-prompt norm blocks the gradient of the heatmaps.
    config = learner_config(tiny_workspace, num_slots=2)
    torch.manual_seed(0)
    model, _, _ = build_segmenter(config)
    loss, metrics = learner_loss(model, rows, feature_store(config), loss_settings(config))
    loss.backward()
    for role, module in model.param_modules().items():
        grads = [p.grad.abs().sum() for p in module.parameters() if p.grad is not None]
        assert grads and float(sum(grads)) > 0, role
    assert metrics["seg_rows"] == 5 and metrics["pg_units"] == 8 and metrics["dropped_rows"] == 0
    assert metrics["logprob_mismatch"] > 0.01 and metrics["tokens"] == sum(len(r["response_ids"]) for r in rows)


def test_micro_batch_losses_sum_to_the_full_batch_loss(tiny_workspace, tiny_sae, rows):
    config = learner_config(tiny_workspace)
    torch.manual_seed(0)
    model, _, _ = build_segmenter(config)
    store = feature_store(config)
    full, _ = learner_loss(model, rows, store, loss_settings(config))
    totals = LossTotals.of(rows, config.grpo.loss_aggregation, model.policy.ref_token_id)
    chunks = [rows[i:i + 3] for i in range(0, len(rows), 3)]
    parts = [learner_loss(model, chunk + rows[:1], store, loss_settings(config), totals,
                          [True] * len(chunk) + [False])[0]
             for chunk in chunks]  # each with a non-live padding row
    assert torch.allclose(sum(parts), full, rtol=1e-5)
    bad = [dict(rows[0], error="null_field")] + rows
    assert learner_loss(model, bad, store, loss_settings(config))[1]["dropped_rows"] == 1


# ---------------------------------------------------------------- ZeRO-3 on Ray


def unpacked(weights: ray.ObjectRef) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in unpack_state(ray.get(weights)).items()}


def export(group) -> dict[str, torch.Tensor]:
    return unpacked(group.export_weights())


def train(group, batch_refs) -> tuple[dict, dict[str, torch.Tensor]]:
    """One step as the GRPO stages run it: rank 0's metrics and the weights exported after the step."""
    metrics, weights = group.step(batch_refs)
    ray.get(metrics[1:])  # the other ranks' errors surface here
    return ray.get(metrics[0]), unpacked(weights)


@pytest.fixture(scope="module")
def trained(tiny_workspace, batch, ray_cluster):
    """World size 1 and 2 after one step on the same batch, with their exports before and after."""
    from actors.learner_group import LearnerGroup

    config = learner_config(tiny_workspace)
    ref = ray.put(batch)
    groups = {ws: LearnerGroup(config, ws, num_cpus=0.25, extensions_dir=EXTENSIONS, zero=ZERO) for ws in (1, 2)}
    before = {ws: export(g) for ws, g in groups.items()}
    steps = {ws: train(g, [ref]) for ws, g in groups.items()}
    metrics, after = {ws: m for ws, (m, _) in steps.items()}, {ws: w for ws, (_, w) in steps.items()}
    yield SimpleNamespace(config=config, groups=groups, before=before, metrics=metrics, after=after)
    for g in groups.values():
        g.shutdown()


def test_world_size_2_step_matches_world_size_1(trained):
    m1, m2 = trained.metrics[1], trained.metrics[2]
    for key in ("loss", "pg_loss", "kl", "seg", "clip_fraction", "logprob_mismatch", "grad_norm"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key
    assert m1["rows"] == m2["rows"] == 8 and m1["version"] == m2["version"] == 1
    assert trained.before[1].keys() == trained.after[2].keys()
    # grad_norm above checks the gradient's scale: Adam's first step would hide it. Its
    # updates are ~lr (1e-4 .. 8e-3) per weight; the tolerance covers weights whose true
    # gradient is 0 or near Adam's eps (1e-8), where the first step lr·g/(|g| + eps) scales the
    # rounding noise of a 2-rank reduction up to a few 1e-5 (measured: 2.2e-5 on one weight of 16k).
    for name, w in trained.before[1].items():
        assert torch.equal(w, trained.before[2][name]), name
        assert torch.allclose(trained.after[2][name], trained.after[1][name], atol=5e-5), name


def test_step_changes_lm_projector_and_head_and_exports_no_frozen_encoder(trained):
    before, after = trained.before[2], trained.after[2]
    for prefix in ("lm.", "projector.", "head.mask_decoder.", "head.sparse_prompt."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix
    assert not any(k.startswith("head.sae.") or "image_encoder" in k for k in after)
    assert all(k.split(".")[0] in ("lm", "projector", "head") for k in after)


def test_exported_weights_load_strictly_and_reproduce_learner_logprobs(trained, batch):
    model, _, _ = build_segmenter(trained.config)
    state = trained.after[2]
    for prefix, module in (("lm", model.policy.lm), ("projector", model.policy.projector)):
        module.load_state_dict({k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")})
    missing, unexpected = model.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")},
                                                     strict=False)
    assert not unexpected and all(k.startswith("sae.") for k in missing)
    rows = learner_rows([batch])
    store = feature_store(trained.config)
    with torch.no_grad():
        out = model.policy([r["prompt_ids"] for r in rows], [store.get(r["image_hash"])["vision"] for r in rows],
                           [r["response_ids"] for r in rows])
    # Rows sampled with the exported weights, as a rollout engine holding them would: the
    # learner's next step computes the same logprobs (its mismatch to the rollout's is ~0).
    resampled = pa.array([out.logprobs[i, : len(r["response_ids"])].tolist() for i, r in enumerate(rows)],
                         LEARNER_SCHEMA.field("rollout_logprobs").type)
    column = LEARNER_SCHEMA.get_field_index("rollout_logprobs")
    metrics, _ = train(trained.groups[2], [ray.put(batch.set_column(column, "rollout_logprobs", resampled))])
    assert metrics["logprob_mismatch"] < 1e-5


def test_error_rows_are_dropped_and_counted(trained, batch):
    errors = pa.array([None, None, None, "null_field", None, None, None, None], pa.string())
    ref = ray.put(batch.set_column(batch.schema.get_field_index("error"), "error", errors))
    metrics, _ = train(trained.groups[1], [ref])
    assert metrics["dropped_rows"] == 1 and metrics["rows"] == 7 and metrics["version"] == 2


def single_rank(config, backend=None):
    """A world-size-1 learner started as LearnerGroup starts its ranks; ``backend`` replaces Ray's choice."""
    from actors.learner import LearnerRank

    rank = LearnerRank.options(num_cpus=0.25).remote(config, 0, 1, None, EXTENSIONS, ZERO, backend)
    ray.get(rank.setup.remote(*ray.get(rank.endpoint.remote())))
    return rank


def test_gradient_checkpointing_is_applied_and_changes_no_number(trained, batch):
    def count_calls(actor) -> None:  # in the actor: runs of the first decoder layer and the final norm
        lm, calls = actor.core.engine.module.policy.lm, {"layer": 0, "norm": 0}
        for name, module in (("layer", lm.model.layers[0]), ("norm", lm.model.norm)):
            module.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        actor.calls = calls

    config = trained.config.model_copy(deep=True)
    config.optim.gradient_checkpointing = True
    rank = single_rank(config)
    try:
        assert ray.get(rank.__ray_call__.remote(lambda actor: actor.core.backend.device)) == "cpu"
        ray.get(rank.__ray_call__.remote(count_calls))
        metrics = ray.get(rank.train_step.remote([ray.put(batch)]))
        calls = ray.get(rank.__ray_call__.remote(lambda actor: actor.calls))
        after = unpacked(rank.export_weights.remote())
    finally:
        ray.kill(rank)
    assert calls["norm"] > 0 and calls["layer"] == 2 * calls["norm"]  # the layer is recomputed in the backward
    for key in ("loss", "pg_loss", "kl", "seg", "grad_norm"):  # recomputed activations: same graph, same numbers
        assert metrics[key] == pytest.approx(trained.metrics[1][key], rel=1e-5, abs=1e-7), key
    assert all(torch.allclose(w, trained.after[1][k], atol=2e-5) for k, w in after.items())


def test_bf16_engine_steps_and_exports_bf16_weights(trained, batch):
    """The GPU ranks' precision, run on CPU: bf16 parameters, features and SAE, fp32 master weights."""
    cpu = choose_backend([], None, "bfloat16")
    backend = dataclasses.replace(cpu, dtype="bfloat16", ds_config={**cpu.ds_config, "bf16": {"enabled": True}})
    rank = single_rank(trained.config, backend)
    try:
        metrics = ray.get(rank.train_step.remote([ray.put(batch)]))
        after = unpacked(rank.export_weights.remote())
    finally:
        ray.kill(rank)
    assert metrics["rows"] == 8 and metrics["version"] == 1
    for key in ("loss", "pg_loss", "seg", "grad_norm"):  # fp32: loss 1.6157, pg 0.0040, grad norm 0.385
        assert metrics[key] == pytest.approx(trained.metrics[1][key], rel=0.05, abs=1e-3), key
    assert after.keys() == trained.after[1].keys()
    weights = [k for k in after if k.endswith(".weight")]  # buffers (rotary frequencies) stay fp32
    assert weights and all(after[k].dtype == torch.bfloat16 for k in weights)
    # the fp32 master weights' update reached the bf16 copies
    lm = [k for k in weights if k.startswith("lm.")]
    assert any(not torch.equal(after[k], trained.before[1][k].to(torch.bfloat16)) for k in lm)


def test_checkpoint_restores_weights_and_step_in_a_new_group(trained, tmp_path):
    from actors.learner_group import LearnerGroup

    saved = trained.groups[2]  # other tests may have stepped it further
    version, weights = saved.version(), export(saved)
    files = saved.save_checkpoint(str(tmp_path), f"step{version}")
    assert sorted(files) == files_under(tmp_path, f"step{version}") and len(files) == 4  # 2 ranks x model, optim
    assert describe(tmp_path, files) == files
    for name in files:  # DeepSpeed's state holds only tensors, plain data and the allowed classes
        check_globals(tmp_path / name)
    fresh = LearnerGroup(trained.config, 2, num_cpus=0.25, extensions_dir=EXTENSIONS, zero=ZERO)
    try:
        assert fresh.version() == 0 < version
        assert fresh.load_checkpoint(str(tmp_path), f"step{version}") == version
        restored = export(fresh)
        assert all(torch.equal(restored[k], v) for k, v in weights.items())
        folder = Path(fresh.save_model(str(tmp_path / "model")))
        assert (folder / "model.safetensors").is_file() and (folder / "head" / "model.safetensors").is_file()
    finally:
        fresh.shutdown()
