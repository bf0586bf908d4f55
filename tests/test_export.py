"""`segrl export`: the export of a trained model folder answers and segments exactly as the folder does,
through the same loaders (`segrl eval --checkpoint EXPORT`), holds no pickles, and brings its own
model settings (a READ export loads as READ under a SegCompass config); bad sources and targets are
one-line errors (no Ray)."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests_support import encode_images, overrides_for

from config import load_config
from config.builders import (
    build_segmenter,
    config_for_model,
    export_settings,
    feature_store,
    head_spec,
)
from data.integrity import IntegrityError
from data.loader import SegDataset
from data.schema import read_samples, resolve_image
from data.synthetic import sft_target
from models.encoders import FrozenEncoders
from models.export import export_model
from models.export_format import EXPORT_CONFIG, ExportError, model_folder
from models.optim import build_optimizer, param_groups
from models.prompt import prompt_ids
from models.read_head import ReadHead
from models.sae import SparseAutoencoder
from models.sae_io import save_sae
from models.seghead import SegCompassHead
from models.segmenter import save_segmenter
from pipelines.cli import main
from pipelines.evaluate import THRESHOLD_METRICS, run_eval
from pipelines.sft import sft_step

N_ITEMS = 4
NEW_TOKENS = 8
"""Greedy answer length here: enough to compare answers token for token, short enough for the suite."""


@pytest.fixture(scope="module")
def world(tiny_workspace, tmp_path_factory):
    """SegCompass and READ configs on the tiny workspace (a small random SAE, a private cache holding the
    first val images' features) and those val items."""
    tmp = tmp_path_factory.mktemp("export")
    base = overrides_for(tiny_workspace["config"]) + [f"paths.cache_dir={tmp}/cache", f"model.sae.path={tmp}/sae"]
    segcompass = load_config("configs/tiny.yaml", base)
    read = load_config("configs/tiny.yaml", [*base, "model.head.kind=read"])
    torch.manual_seed(0)
    save_sae(SparseAutoencoder(segcompass.model.tiny.lm.hidden_size, 256, "topk", 8, layer=segcompass.model.sae.layer),
             tmp / "sae")
    c = segcompass
    split = Path(c.resolve_path(c.data.root)) / "val.parquet"
    encoders, images = encode_images(c, [resolve_image(split, s.image_path) for s in read_samples(split)[:N_ITEMS]])
    items = [SegDataset(split, feature_store(c), encoders.sam_size, limit=N_ITEMS)[i] for i in range(N_ITEMS)]
    assert any(not it.sample.no_target for it in items)
    return {"segcompass": segcompass, "read": read, "items": items, "images": images, "tmp": tmp}


def trained_folder(config, items, out: Path) -> Path:
    """A checkpoint folder (save_segmenter, as SFT writes it) after an SFT step from make-tiny's folder."""
    torch.manual_seed(1)
    model, tokenizer, _ = build_segmenter(config)
    optimizer = build_optimizer(param_groups(model.param_modules(), 1e-3, config.optim.lr_multipliers.model_dump()))
    loss, _ = sft_step(model, tokenizer, items, config)
    loss.backward()
    optimizer.step()
    return save_segmenter(model, head_spec(config), tokenizer, config.resolve_path(config.model.name_or_path), out)


@pytest.fixture(scope="module")
def segcompass_pair(world):
    source = trained_folder(world["segcompass"], world["items"], world["tmp"] / "sft-segcompass" / "model")
    return source, export_model(source, world["tmp"] / "exported-segcompass", export_settings(world["segcompass"]))


@pytest.fixture(scope="module")
def read_pair(world):
    source = trained_folder(world["read"], world["items"], world["tmp"] / "sft-read" / "model")
    return source, export_model(source, world["tmp"] / "exported-read", export_settings(world["read"]))


def target_masks(config, folder: Path, items) -> list[torch.Tensor]:
    """Mask logits of ``folder``, built by the eval loader, for the target samples' own answers (teacher
    forced: every target sample gets a mask, whatever the greedy answer says)."""
    model, tokenizer, _ = build_segmenter(config, str(folder))
    model.eval()
    ref = config_for_model(config, str(folder)).model.ref_token
    targets = [it for it in items if not it.sample.no_target]
    with torch.no_grad():
        _, heads = model([prompt_ids(tokenizer, it.sample.question, ref) for it in targets],
                         [it.vision for it in targets],
                         [tokenizer(sft_target(it.sample, ref), add_special_tokens=False)["input_ids"]
                          for it in targets],
                         [it.sam_embedding for it in targets])
    return [h.mask_logits for h in heads]


def test_the_export_holds_every_part_as_safetensors_and_describes_it(segcompass_pair, world):
    source, export = segcompass_pair
    files = {p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "projector/model.safetensors",
            "vision/model.safetensors", "sam/model.safetensors", "head/model.safetensors", "head/config.json",
            "sae/model.safetensors", "sae/config.json", EXPORT_CONFIG, "manifest.json"} <= files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".bin", ".pkl", ".pickle"))]
    source_sam = torch.load(source / "sam" / "sam.pt", weights_only=True)
    exported_sam = load_file(export / "sam" / "model.safetensors")
    assert source_sam.keys() == exported_sam.keys() and any(k.startswith("image_encoder.") for k in exported_sam)
    assert all(torch.equal(source_sam[k], exported_sam[k]) for k in source_sam)
    described = json.loads((export / EXPORT_CONFIG).read_text())
    parts, lm = described["parts"], world["segcompass"].model.tiny.lm
    assert described["format"] == "segrl-export" and described["segrl_version"] and described["family"] == "tiny"
    assert parts["head"] == {"path": "head", "lm_dim": lm.hidden_size, "kind": "segcompass", "trained": True,
                             "num_slots": 1, "codebook_dim": 128, "act_threshold": 0.0, "top_k": 8, "sam_dim": 32}
    assert parts["tokenizer"]["ref_token"] == "<SEG>"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.convert_tokens_to_ids("<SEG>") == parts["tokenizer"]["ref_token_id"]
    assert parts["sae"]["d_in"] == lm.hidden_size and parts["sae"]["d_sae"] == 256
    assert parts["projector"]["lm_dim"] == parts["lm"]["hidden_size"] == lm.hidden_size


def test_the_export_segments_as_its_source_and_eval_answers_alike(segcompass_pair, world, tmp_path):
    source, export = segcompass_pair
    masks = target_masks(world["segcompass"], source, world["items"])
    # under a config that names another head and no SAE: the export brings its own settings and SAE
    other = world["read"].model_copy(deep=True)
    other.model.sae.path = str(world["tmp"] / "no-sae")
    exported = target_masks(other, export, world["items"])
    assert len(masks) == len(exported) > 0 and all(torch.equal(a, b) for a, b in zip(masks, exported))
    config = world["segcompass"].model_copy(deep=True)
    config.eval.max_new_tokens = other.eval.max_new_tokens = NEW_TOKENS
    a = run_eval(config, str(source), "val", N_ITEMS, str(tmp_path / "source.json"))
    b = run_eval(other, str(export), "val", N_ITEMS, str(tmp_path / "export.json"))
    assert a["metrics"] == b["metrics"]
    answers = [json.loads((tmp_path / name).read_text())["samples"] for name in ("source.json", "export.json")]
    assert answers[0] == answers[1] and len(answers[0]) == N_ITEMS and any(answers[0])


def test_the_exports_frozen_encoders_give_the_cached_features(segcompass_pair, world):
    """What serving runs on a new image: the export's SAM comes from safetensors, bit for bit."""
    ours, theirs = (FrozenEncoders("tiny", str(folder), "tiny", None)(world["images"][:1])[0]
                    for folder in segcompass_pair)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_read_export_loads_as_read(read_pair, world, tmp_path, capsys):
    source, export = read_pair
    assert config_for_model(world["segcompass"], str(export)).model.head.kind == "read"
    model, _, _ = build_segmenter(world["segcompass"], str(export))  # the config says segcompass
    assert isinstance(model.head, ReadHead)
    saved = load_file(source / "head" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.head.state_dict().items())
    assert json.loads((export / EXPORT_CONFIG).read_text())["parts"]["sae"] is None
    masks, exported = (target_masks(world["read"], source, world["items"]),
                       target_masks(world["segcompass"], export, world["items"]))
    assert len(masks) == len(exported) > 0 and all(torch.equal(a, b) for a, b in zip(masks, exported))
    overrides = overrides_for(world["segcompass"]) + [f"paths.cache_dir={world['tmp']}/cache",
                                                      f"eval.max_new_tokens={NEW_TOKENS}"]
    assert main(["eval", "--checkpoint", str(export), "--limit", "2", "--out", str(tmp_path / "e.json"),
                 *overrides]) == 0
    metrics = json.loads((tmp_path / "e.json").read_text())["metrics"]
    assert set(THRESHOLD_METRICS) <= set(metrics)  # scored as READ: the threshold search ran
    assert "tgt@t*" in capsys.readouterr().out


def test_a_run_folder_exports_its_model_and_a_make_tiny_folder_an_untrained_head(read_pair, world, tmp_path):
    source, _ = read_pair
    assert model_folder(source.parent) == source  # the SFT run folder names its model/
    tiny = Path(world["read"].resolve_path(world["read"].model.name_or_path))
    export = export_model(tiny, tmp_path / "tiny", export_settings(world["read"]))
    head = json.loads((export / EXPORT_CONFIG).read_text())["parts"]["head"]
    assert head["trained"] is False and head["kind"] == "read" and not (export / "head").exists()
    model, _, _ = build_segmenter(world["segcompass"], str(export))
    assert isinstance(model.head, ReadHead)


def cli_export(world, *args: str) -> int:
    return main(["export", *args[:1], *overrides_for(world["segcompass"]), f"model.sae.path={world['tmp']}/sae",
                 *args[1:]])


def test_bad_sources_and_targets_are_one_line_errors(segcompass_pair, world, tmp_path, capsys):
    source, _ = segcompass_pair

    def error(*args: str) -> str:
        assert cli_export(world, *args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("segrl export: error: ")
        return lines[0]

    assert "no such folder" in error(str(tmp_path / "nowhere"), "--out", str(tmp_path / "a"))
    assert "not a segrl model folder" in error(str(tmp_path), "--out", str(tmp_path / "a"))
    run = tmp_path / "grpo-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text('{"kind": "segrl-grpo-run"}')
    assert "without a final model/" in error(str(run), "--out", str(tmp_path / "a"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert "not empty; give --overwrite" in error(str(source), "--out", str(busy))
    assert (busy / "keep.txt").read_text() == "mine"
    assert "must lie outside the source" in error(str(source), "--out", str(source / "export"), "--overwrite")
    assert "must lie outside the source" in error(str(source), "--out", str(source.parent), "--overwrite")
    assert cli_export(world, str(source), "--out", str(busy), "--overwrite") == 0
    assert not (busy / "keep.txt").exists() and (busy / EXPORT_CONFIG).is_file()
    capsys.readouterr()

    settings = export_settings(world["segcompass"])
    with pytest.raises(ExportError, match="no trained SAE, which the SegCompass head"):
        export_model(source, tmp_path / "c", replace(settings, sae_dir=tmp_path / "no-sae"))
    save_sae(SparseAutoencoder(16, 32), tmp_path / "narrow-sae")
    with pytest.raises(ExportError, match="an SAE of width 16, but the LM"):
        export_model(source, tmp_path / "c", replace(settings, sae_dir=tmp_path / "narrow-sae"))
    assert not (tmp_path / "c").exists()
    capsys.readouterr()  # the LM loader's progress bars

    damaged = tmp_path / "damaged"
    shutil.copytree(source, damaged)
    weights = damaged / "head" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "head/model.safetensors: damaged" in error(str(damaged), "--out", str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()


def test_a_damaged_export_is_refused_by_the_loader(segcompass_pair, tmp_path, world):
    _, export = segcompass_pair
    copy = tmp_path / "copy"
    shutil.copytree(export, copy)
    described = json.loads((copy / EXPORT_CONFIG).read_text())
    described["parts"]["head"]["kind"] = "read"
    (copy / EXPORT_CONFIG).write_text(json.dumps(described))
    with pytest.raises(IntegrityError, match=f"{EXPORT_CONFIG}: .*differs|{EXPORT_CONFIG}: .*bytes"):
        build_segmenter(world["segcompass"], str(copy))
    with pytest.raises(ExportError, match="not a segrl model folder"):
        model_folder(tmp_path)
    assert isinstance(build_segmenter(world["segcompass"], str(export))[0].head, SegCompassHead)
