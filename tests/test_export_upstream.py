"""`segrl export` of a LLaVA-1.5 and a Qwen2.5-VL model folder is self-contained: with the upstream
checkpoint and the SAM checkpoint gone, the export alone gives the vision features, SAM embeddings,
policy log-probabilities and masks the model gave with them, whatever the config still names (tiny
random upstream checkpoints and a copy of the tiny workspace's SAM; no Ray)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tests_support import overrides_for
from transformers import AutoTokenizer
from upstream_fixtures import qwen_style_tokenizer, write_tiny_llava, write_tiny_qwen_vl

from config import load_config
from config.builders import (
    build_segmenter,
    config_for_model,
    export_settings,
    head_spec,
)
from models.encoders import FrozenEncoders
from models.export import export_model
from models.export_format import EXPORT_CONFIG
from models.prompt import prompt_ids
from models.segmenter import save_segmenter

PIXELS = (64, 64 * 64)  # Qwen2.5-VL's bounds: a 48x48 image -> a 12x12 patch grid (patch 4)


def write_upstream(family: str, folder: Path, workspace: dict) -> None:
    if family == "llava":
        write_tiny_llava(folder, AutoTokenizer.from_pretrained(workspace["tiny"]["path"]))
    else:
        write_tiny_qwen_vl(folder, qwen_style_tokenizer())


def run_model(config, encoders_from: Path, folder: Path, images: list[np.ndarray], sam_variant: str,
              sam_checkpoint: str | None) -> dict:
    """What precompute, eval and serve compute: the frozen encoders' features of ``images`` (those of
    ``encoders_from``, the SAM named by ``sam_variant``/``sam_checkpoint`` as serve passes the config's),
    then the segmenter of ``folder``'s log-probabilities and mask logits for a fixed answer holding the
    reference token."""
    features = FrozenEncoders(config.model.family, str(encoders_from), sam_variant, sam_checkpoint, PIXELS)(images)
    model, tokenizer, _ = build_segmenter(config, str(folder))
    ref = config_for_model(config, str(folder)).model.ref_token
    prompts = [prompt_ids(tokenizer, "find the red ring", ref) for _ in images]
    answer = tokenizer(f"<answer>it is {ref}</answer>", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out, heads = model.eval()(prompts, [f["vision"] for f in features], [answer] * len(images),
                                  [f["sam"] for f in features])
    return {"vision": [f["vision"] for f in features], "sam": [f["sam"] for f in features],
            "logprobs": out.logprobs, "masks": [h.mask_logits for h in heads]}


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def exported(request, tiny_workspace, tmp_path_factory):
    """(config, export folder, outputs before, outputs of the export alone, upstream and SAM paths) of a
    model folder saved from a tiny upstream checkpoint, the upstream folder and SAM checkpoint deleted."""
    family, tmp = request.param, tmp_path_factory.mktemp(f"export-{request.param}")
    upstream, sam = tmp / "upstream", tmp / "sam-checkpoint"
    write_upstream(family, upstream, tiny_workspace)
    shutil.copytree(Path(tiny_workspace["tiny"]["path"]) / "sam", sam)
    config = load_config("configs/tiny.yaml", [
        *overrides_for(tiny_workspace["config"]), f"model.family={family}", f"model.name_or_path={upstream}",
        f"model.sam.checkpoint={sam}", "model.head.kind=read",
        f"data.image_min_pixels={PIXELS[0]}", f"data.image_max_pixels={PIXELS[1]}"])
    torch.manual_seed(0)
    model, tokenizer, _ = build_segmenter(config)
    source = save_segmenter(model, head_spec(config), tokenizer, str(upstream), tmp / "model")
    export = export_model(source, tmp / "export", export_settings(config))
    rng = np.random.default_rng(0)
    # square, of two sizes: a READ head reads a square image-token grid (Qwen's: 6x6 and 4x4 tokens)
    images = [rng.integers(0, 255, (48, 48, 3), dtype=np.uint8), rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)]
    before = run_model(config, upstream, source, images, "tiny", str(sam))
    shutil.rmtree(upstream)
    shutil.rmtree(sam)
    after = run_model(config, export, export, images, "vit_h", str(tmp / "gone" / "sam_vit_h_4b8939.pth"))
    return config, export, before, after, upstream, sam


def test_the_export_alone_gives_the_same_features_and_outputs(exported):
    _, _, before, after, _, _ = exported
    for key in ("vision", "sam", "masks"):
        assert len(before[key]) == len(after[key]) == 2
        assert all(torch.equal(a, b) for a, b in zip(before[key], after[key])), key
    assert torch.equal(before["logprobs"], after["logprobs"]) and before["logprobs"].abs().sum() > 0


def test_the_export_holds_its_encoders_and_says_where_they_came_from(exported):
    config, export, _, _, upstream, sam = exported
    parts = json.loads((export / EXPORT_CONFIG).read_text())["parts"]
    assert parts["vision"]["source"] == str(upstream) and parts["vision"]["family"] == config.model.family
    assert parts["sam"]["source"] == str(sam) and parts["sam"]["variant"] == "tiny"
    assert {p.name for p in (export / "vision").iterdir()} == {"tower.json", "config.json", "model.safetensors"}
    assert {p.name for p in (export / "sam").iterdir()} == {"config.json", "model.safetensors"}
    assert not [p for p in export.rglob("*") if p.suffix in (".pt", ".pth", ".bin")]
    assert config_for_model(config, str(export)).model.sam.checkpoint == str(export / "sam")
