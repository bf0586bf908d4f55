"""Hostile and damaged run folders, checkpoints and caches: each is refused with exit 2 and one line
naming the file, nothing is written half-way, and no file's code ever runs.

A run folder is built by hand (a config and a checkpoint the way the Checkpointer writes
one), so the cases that must be refused before any actor starts cost no cluster.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests_support import overrides_for

from config import dump_config, load_config
from config.builders import build_segmenter, feature_store, head_spec
from data.features import CHECKSUM_KEY, FeatureShardError, content_hash, tensors_sha256
from data.integrity import describe, files_under
from data.schema import read_samples, resolve_image
from models.learner_checkpoint import UnsafeCheckpointError, WeightsOnlyEngine
from models.segmenter import save_segmenter
from pipelines.cli import main
from pipelines.grpo.ledger import Ledger
from pipelines.grpo.run_checkpoints import Checkpointer
from pipelines.grpo.run_folder import MARKER, prepare_run_folder
from pipelines.precompute import precompute


class Payload:
    """Unpickled, it writes ``marker``: what a crafted checkpoint would do with a real payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time: equal snapshots, nothing written."""
    return {n: ((folder / n).stat().st_size, (folder / n).stat().st_mtime_ns) for n in files_under(folder)}


def refused(capsys, argv: list[str], *named: str) -> str:
    """Run `segrl argv`: exit 2 and a last stderr line naming each of ``named``, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line.startswith(f"segrl {argv[0]}: error: "), err
    for name in named:
        assert str(name) in line, line
    return line


class FakeLearner:
    """Saves like a LearnerGroup, torch zip files of tensors and plain data."""

    def save_checkpoint(self, directory: str, tag: str) -> dict[str, dict]:
        shard = Path(directory) / tag
        shard.mkdir(parents=True)
        torch.save({"module": {"w": torch.ones(4)}, "global_steps": 2},
                   shard / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {"exp_avg": torch.zeros(4)}},
                   shard / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        return describe(directory, files_under(directory, tag))


@pytest.fixture
def grpo_run(tmp_path) -> Path:
    """A GRPO run folder with its marker, config and one complete checkpoint (step2)."""
    run = tmp_path / "run"
    config = load_config("configs/tiny.yaml", [f"paths.work_dir={tmp_path / 'work'}", f"train.output={run}"])
    prepare_run_folder(run, config.resolve_path(config.train.init_from), resume=False, overwrite=False)
    (run / "config.yaml").write_text(dump_config(config))
    Checkpointer(run / "checkpoints", 2, 3, FakeLearner(), lambda: ({"prompts": {}}, Ledger())).save(2)
    return run


def plant(path: Path, marker: Path) -> None:
    """Add a live payload to the torch file ``path`` (it stays a valid checkpoint file otherwise)."""
    state = torch.load(path, weights_only=True)
    state["client_state"] = Payload(marker)
    torch.save(state, path)


def rehash(run: Path, tag: str = "step2") -> None:
    """Make the manifest agree with the files on disk again, as a crafted run folder would."""
    folder = run / "checkpoints"
    manifest = folder / f"{tag}.manifest.json"
    doc = json.loads(manifest.read_text())
    doc["files"] = describe(folder, doc["files"])
    manifest.write_text(json.dumps(doc))


# --- 0: resume never unpickles a payload ----------------------------------------------------------------

def test_the_payload_is_live(grpo_run, tmp_path):
    """The planted payload does run when a file is unpickled the way DeepSpeed's own engine does."""
    victim = grpo_run / "checkpoints" / "step2" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    marker = tmp_path / "ran"
    plant(victim, marker)
    torch.load(victim, weights_only=False)
    assert marker.read_text() == "ran"


def test_resume_refuses_a_crafted_checkpoint_whose_hashes_match(grpo_run, tmp_path, capsys):
    victim = grpo_run / "checkpoints" / "step2" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    marker = tmp_path / "ran"
    plant(victim, marker)
    rehash(grpo_run)
    before = snapshot(grpo_run)
    line = refused(capsys, ["train", "--resume", str(grpo_run)], victim, "builtins.exec")
    assert "refused" in line and not marker.exists() and snapshot(grpo_run) == before


def test_resume_skips_a_checkpoint_whose_file_changed_and_refuses_when_none_is_left(grpo_run, tmp_path, capsys):
    victim = grpo_run / "checkpoints" / "step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "ran"
    plant(victim, marker)
    before = snapshot(grpo_run)
    refused(capsys, ["train", "--resume", str(grpo_run)], "no usable checkpoint", victim)
    assert not marker.exists() and snapshot(grpo_run) == before


@pytest.mark.parametrize("damage, problem", [
    (lambda f: f.unlink(), "missing"),
    (lambda f: f.write_bytes(f.read_bytes()[:-7]), "bytes, step2.manifest.json says"),
    (lambda f: f.write_bytes(bytes(b ^ (i == 200) for i, b in enumerate(f.read_bytes()))), "damaged"),
    (lambda f: (f.parent / "extra.pt").write_bytes(f.read_bytes()), "not listed"),
])
def test_resume_names_a_missing_truncated_flipped_or_added_file(grpo_run, capsys, damage, problem):
    victim = grpo_run / "checkpoints" / "step2" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    damage(victim)
    before = snapshot(grpo_run)
    name = victim.parent / "extra.pt" if problem == "not listed" else victim
    refused(capsys, ["train", "--resume", str(grpo_run)], name, problem)
    assert snapshot(grpo_run) == before


def test_the_learners_checkpoint_engine_reads_weights_only(grpo_run, tmp_path):
    """Inside a learner rank the same file is refused again: DeepSpeed reads through this engine."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    engine = WeightsOnlyEngine(TorchCheckpointEngine())
    good = grpo_run / "checkpoints" / "step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert torch.equal(engine.load(str(good), map_location="cpu")["optimizer_state_dict"]["exp_avg"], torch.zeros(4))
    victim = grpo_run / "checkpoints" / "step2" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    marker = tmp_path / "ran"
    plant(victim, marker)
    with pytest.raises(UnsafeCheckpointError, match="refers to exec"):
        engine.load(str(victim), map_location="cpu")
    assert not marker.exists()


# --- 0b: a run never writes into another run's folder ------------------------------------------------

def sft_like(tmp_path: Path) -> tuple[Path, list[str]]:
    """A folder that `segrl sft` wrote (config, metrics, model) and the overrides of a config for it."""
    work = tmp_path / "work"
    sft = work / "runs" / "sft"
    (sft / "model").mkdir(parents=True)
    (sft / "model" / "model.safetensors").write_bytes(b"weights")
    (sft / "metrics.jsonl").write_text('{"step": 1}\n')
    config = load_config("configs/tiny.yaml", [f"paths.work_dir={work}"])
    (sft / "config.yaml").write_text(dump_config(config))
    return sft, [f"paths.work_dir={work}"]


def test_resume_refuses_a_folder_that_is_not_a_grpo_run(tmp_path, capsys):
    sft, _ = sft_like(tmp_path)
    before = snapshot(sft)
    refused(capsys, ["train", "--resume", str(sft)], sft, "not a GRPO run folder")
    assert snapshot(sft) == before


def test_a_fresh_run_into_a_non_empty_folder_needs_overwrite(grpo_run, tmp_path, capsys):
    config = str(grpo_run / "config.yaml")
    before = snapshot(grpo_run)
    refused(capsys, ["train", "--config", config], grpo_run, "is not empty", "--overwrite")
    sft, overrides = sft_like(tmp_path)
    refused(capsys, ["train", "--overwrite", *overrides, f"train.output={sft}"], sft, "overlap")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("months of work")
    refused(capsys, ["train", "--overwrite", *overrides, f"train.output={other}"], other, "no run.json")
    assert snapshot(grpo_run) == before and (other / "thesis.tex").read_text() == "months of work"


def test_overwrite_clears_a_grpo_run_and_a_run_without_checkpoints_restarts_at_step_0(grpo_run, tmp_path):
    assert prepare_run_folder(grpo_run, str(tmp_path / "init"), resume=False, overwrite=True) is None
    assert files_under(grpo_run) == [MARKER]
    (grpo_run / "config.yaml").write_text("seed: 0\n")  # a start that failed before any output
    assert prepare_run_folder(grpo_run, str(tmp_path / "init"), resume=False, overwrite=False) is None
    said = []
    assert prepare_run_folder(grpo_run, str(tmp_path / "init"), resume=True, overwrite=False, say=said.append) is None
    assert "starting from step 0" in said[0]


# --- 0e: train.resume=auto: one command starts a run and continues it ----------------------------------

def test_auto_continues_a_grpo_run_from_its_checkpoint_writing_nothing_first(grpo_run, tmp_path):
    before, said = snapshot(grpo_run), []
    checkpoint = prepare_run_folder(grpo_run, str(tmp_path / "init"), resume="auto", overwrite=False, say=said.append)
    assert (checkpoint.tag, checkpoint.step) == ("step2", 2) and snapshot(grpo_run) == before
    assert said == [f"[segrl] train.resume=auto: continuing the run in {grpo_run}"]


def test_auto_starts_a_run_in_a_new_or_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (tmp_path / "new" / "run", empty):
        said = []
        assert prepare_run_folder(folder, str(tmp_path / "init"), resume="auto", overwrite=False,
                                  say=said.append) is None
        assert files_under(folder) == [MARKER]
        assert said == [f"[segrl] train.resume=auto: starting a new run in {folder}"]
    said = []  # started, then stopped before its first checkpoint: the rerun continues it from step 0
    assert prepare_run_folder(empty, str(tmp_path / "init"), resume="auto", overwrite=False, say=said.append) is None
    assert "continuing the run" in said[0] and "starting from step 0" in said[1]


def test_auto_refuses_a_foreign_folder_a_run_without_a_usable_checkpoint_and_overwrite(grpo_run, tmp_path, capsys):
    sft, overrides = sft_like(tmp_path)
    before = snapshot(sft)
    refused(capsys, ["train", *overrides, f"train.output={sft}", "train.resume=auto"], sft, "holds no GRPO run")
    assert snapshot(sft) == before
    config = str(grpo_run / "config.yaml")
    refused(capsys, ["train", "--config", config, "--overwrite", "train.resume=auto"], grpo_run, "give one of them")
    victim = grpo_run / "checkpoints" / "step2" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:-7])
    before = snapshot(grpo_run)
    refused(capsys, ["train", "--config", config, "train.resume=auto"], "no usable checkpoint", victim)
    assert snapshot(grpo_run) == before


# --- 0d: `segrl ledger` checks whole batches --------------------------------------------------------

def test_segrl_ledger_fails_a_run_that_skipped_steps(grpo_run, capsys):
    ledger = Ledger()
    for group, step in ((1, 0), (2, 5)):  # batch 16: one group at step 0, one at step 5
        ledger.admitted(group, f"e0:{group}")
        ledger.generated(group, step)
        ledger.referenced(group)
        ledger.rewarded(group)
        ledger.trained(group, step)
    ledger.save(grpo_run / "ledger.json")
    assert main(["ledger", str(grpo_run)]) == 2
    err = capsys.readouterr().err
    assert "step 0 trained 1 groups, not the batch size 16" in err and "steps [1, 2, 3, 4] trained nothing" in err


# --- 0c: damaged model folders and non-finite numbers ----------------------------------------------

@pytest.fixture(scope="module")
def saved_model(tiny_workspace, tiny_sae, tmp_path_factory) -> tuple[Path, list[str]]:
    """A checkpoint folder as `save_segmenter` writes it, and the overrides of a config for the workspace."""
    config = tiny_workspace["config"]
    model, tokenizer, _ = build_segmenter(config)
    out = save_segmenter(model, head_spec(config), tokenizer, tiny_workspace["tiny"]["path"],
                         tmp_path_factory.mktemp("saved") / "model")
    return out, overrides_for(config)


def eval_argv(folder: Path, overrides: list[str], tmp_path: Path) -> list[str]:
    return ["eval", "--checkpoint", str(folder), "--limit", "2", "--out", str(tmp_path / "eval.json"), *overrides]


@pytest.mark.parametrize("damage, name, problem", [
    (lambda f: (f / "head" / "model.safetensors").unlink(), "head/model.safetensors", "missing"),
    (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json", "missing"),
    (lambda f: (f / "model.safetensors").write_bytes(bytes(b ^ (i == 4000) for i, b in
                                                            enumerate((f / "model.safetensors").read_bytes()))),
     "model.safetensors", "damaged"),
    (lambda f: (f / "pytorch_model.bin").write_bytes(b"x"), "pytorch_model.bin", "not listed"),
])
def test_eval_refuses_a_damaged_checkpoint_by_name(saved_model, tmp_path, capsys, damage, name, problem):
    folder = tmp_path / "model"
    shutil.copytree(saved_model[0], folder)
    damage(folder)
    refused(capsys, eval_argv(folder, saved_model[1], tmp_path), folder / name, problem)
    assert not (tmp_path / "eval.json").exists()


def test_a_make_tiny_folder_without_head_stays_valid_but_needs_its_tokenizer(tiny_workspace, tiny_features, tiny_sae,
                                                                            saved_model, tmp_path, capsys):
    tiny = Path(tiny_workspace["tiny"]["path"])
    assert main(eval_argv(tiny, saved_model[1], tmp_path)) == 0  # a fresh head, no manifest
    (saved_model[0] / "eval-val.json").write_text("{}")  # what `segrl eval` adds to a checkpoint it scores
    assert main(eval_argv(saved_model[0], saved_model[1], tmp_path)) == 0
    folder = tmp_path / "tiny"
    shutil.copytree(tiny, folder)
    (folder / "tokenizer.json").unlink()
    refused(capsys, eval_argv(folder, saved_model[1], tmp_path), folder / "tokenizer.json", "missing")
    shutil.copytree(tiny, folder, dirs_exist_ok=True)
    (folder / "head").mkdir()
    (folder / "head" / "config.json").write_text('{"kind": "segcompass"}')
    refused(capsys, eval_argv(folder, saved_model[1], tmp_path), folder / "head", "only config.json")


def test_eval_refuses_non_finite_logits_naming_the_sample(tiny_workspace, tiny_features, tiny_sae, saved_model,
                                                          tmp_path, capsys):
    """Weights that are NaN (in a folder without a manifest to catch them) never score as a plain miss."""
    folder = tmp_path / "nan"
    shutil.copytree(tiny_workspace["tiny"]["path"], folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights.items()},
              folder / "model.safetensors")
    first = read_samples(Path(tiny_workspace["data"]["root"]) / "val.parquet")[0].sample_id
    refused(capsys, eval_argv(folder, saved_model[1], tmp_path), f"sample {first}", "not finite")


# --- 4: damaged feature shards are named, and rebuilt by the next precompute --------------------------

@pytest.fixture
def private_cache(tiny_workspace, tiny_features, tmp_path) -> tuple:
    """A copy of the session's feature cache, and the config and overrides that use it."""
    config = tiny_workspace["config"]
    cache = tmp_path / "cache"
    shutil.copytree(Path(config.resolve_path(config.paths.cache_dir)) / "features", cache / "features")
    overrides = [*overrides_for(config), f"paths.cache_dir={cache}"]
    return load_config("configs/tiny.yaml", overrides), overrides


def val_shards(config, n: int) -> list[Path]:
    """The shards of the first ``n`` distinct images of the val split, in sample order."""
    split = Path(config.resolve_path(config.data.root)) / "val.parquet"
    store = feature_store(config)
    shards = dict.fromkeys(store.path(content_hash(resolve_image(split, s.image_path))) for s in read_samples(split))
    return list(shards)[:n]


def nan_shard(path: Path) -> None:
    """NaN features under a checksum that matches them, as an encoder gone wrong would have cached them."""
    tensors = load_file(path)
    tensors["vision"][0, 0] = float("nan")
    save_file(tensors, path, metadata={CHECKSUM_KEY: tensors_sha256(tensors)})


DAMAGES = [
    (lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]), "truncated"),
    (lambda f: f.write_bytes(b"\xff" * f.stat().st_size), "truncated or not a safetensors file"),
    (lambda f: f.write_bytes(f.read_bytes()[:-40] + bytes([f.read_bytes()[-40] ^ 1]) + f.read_bytes()[-39:]),
     "damaged (its tensors do not match the checksum"),
    (nan_shard, "non-finite values in ['vision']"),
]


def test_damaged_shards_are_named_and_rebuilt_by_the_next_precompute(private_cache, saved_model, ray_cluster,
                                                                     tmp_path, capsys):
    config, overrides = private_cache
    store, shards = feature_store(config), val_shards(config, len(DAMAGES))
    for shard, (damage, problem) in zip(shards, DAMAGES):
        damage(shard)
        assert problem in store.check(shard.stem)
        with pytest.raises(FeatureShardError, match=f"{shard}: .*segrl precompute"):
            store.get(shard.stem)
    refused(capsys, eval_argv(saved_model[0], overrides, tmp_path), shards[0], DAMAGES[0][1], "segrl precompute")
    report = precompute(config, splits=["val"], batch_size=8)
    assert sorted(why.split(": ", 1)[0] for _, why in report.rebuilt) == sorted(map(str, shards))
    assert report.encoded == len(shards) and any("REBUILT" in line for line in report.lines())
    assert all(store.check(shard.stem) is None for shard in shards)
    assert main(eval_argv(saved_model[0], overrides, tmp_path)) == 0
