"""Tiny synthetic datasets in each upstream layout (ReasonSeg, REFER, gRefCOCO).

No real data ships with the repo (ReasonSeg is CC-BY-NC, COCO images carry their
own licences); these writers draw a few-KB stand-in with known pixel counts so
converter tests can assert exact masks. Builders return plain dicts/lists that a
test may break before writing them.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from data.schema import encode_mask

H, W = 48, 64  # image 1
H2, W2 = 40, 50  # image 2

CROWD = np.zeros((H2, W2), bool)
CROWD[5:9, 30:45] = True  # 60 px, stored as uncompressed RLE (COCO iscrowd)
COMPRESSED = np.zeros((H2, W2), bool)
COMPRESSED[30:40, 0:5] = True  # 50 px, stored as compressed RLE


def rect(x0, y0, x1, y1):
    """LabelMe points of a rectangle covering pixels x0..x1, y0..y1 (inclusive)."""
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def write_image(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


# ---------------------------------------------------------------- ReasonSeg


def reasonseg_ann() -> dict:
    """Target 300 px, an ignore box of 16 px inside it, a flag box elsewhere."""
    return {
        "text": ["what keeps the papers together?", "segment the stapler"],
        "is_sentence": True,
        "shapes": [
            {"label": "target", "points": rect(10, 5, 29, 19)},
            {"label": "Ignore", "points": rect(12, 7, 15, 10)},
            {"label": "flag", "points": rect(40, 30, 50, 40)},
        ],
    }


def write_reasonseg(root: Path, ann: dict | str, split="train", name="img1", image=True) -> Path:
    """`<root>/ReasonSeg/<split>/<name>.{jpg,json}`; a str `ann` is written verbatim."""
    folder = root / "ReasonSeg" / split
    folder.mkdir(parents=True, exist_ok=True)
    if image:
        write_image(folder / f"{name}.jpg", H, W)
    (folder / f"{name}.json").write_text(ann if isinstance(ann, str) else json.dumps(ann))
    return root / "ReasonSeg"


# ---------------------------------------------------------------- COCO / REFER


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO iscrowd segmentation: column-major run lengths starting with zeros."""
    flat = mask.ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"counts": np.diff(np.concatenate([[0], edges])).tolist(), "size": list(mask.shape)}


def instances() -> dict:
    """Two images; ann 10 a 300-px rectangle, 11 two 100-px squares, 12 CROWD, 13 COMPRESSED."""

    def ann(ann_id, image_id, segmentation):
        crowd = int(isinstance(segmentation, dict))
        return {"id": ann_id, "image_id": image_id, "segmentation": segmentation, "category_id": 1, "iscrowd": crowd}

    return {
        "images": [
            {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": H, "width": W},
            {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": H2, "width": W2},
        ],
        "annotations": [
            ann(10, 1, [[10, 5, 30, 5, 30, 20, 10, 20]]),
            ann(11, 2, [[0, 0, 10, 0, 10, 10, 0, 10], [20, 20, 30, 20, 30, 30, 20, 30]]),
            ann(12, 2, uncompressed_rle(CROWD)),
            ann(13, 2, encode_mask(COMPRESSED)),
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }


def sentences(*ids) -> list[dict]:
    return [{"sent_id": i, "sent": f"the thing {i}", "raw": f"The thing {i}.", "tokens": ["the", "thing"]} for i in ids]


def refer_refs() -> list[dict]:
    """train: refs 100 (2 sentences) and 103 (1); val: 101 (two-part polygon); testA: 102 (crowd RLE)."""

    def ref(ref_id, ann_id, image_id, split, sents):
        # REFER's file_name carries an "_<ann_id>" suffix: it is not the image file.
        return {
            "ref_id": ref_id,
            "ann_id": ann_id,
            "image_id": image_id,
            "category_id": 1,
            "split": split,
            "sentences": sentences(*sents),
            "sent_ids": list(sents),
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
        }

    return [
        ref(100, 10, 1, "train", [1000, 1001]),
        ref(101, 11, 2, "val", [1010]),
        ref(102, 12, 2, "testA", [1020, 1021]),
        ref(103, 10, 1, "train", [1030]),
    ]


def write_coco_images(root: Path) -> Path:
    images = root / "images" / "train2014"
    write_image(images / "COCO_train2014_000000000001.jpg", H, W)
    write_image(images / "COCO_train2014_000000000002.jpg", H2, W2)
    return images


def write_refer(root: Path, refs: list | bytes, inst: dict | str, refs_name="refs(unc).p", images=True):
    """(dataset folder, image root); bytes / str arguments are written verbatim."""
    folder = root / "refer_seg" / "ds"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / refs_name).write_bytes(refs if isinstance(refs, bytes) else pickle.dumps(refs, protocol=2))
    (folder / "instances.json").write_text(inst if isinstance(inst, str) else json.dumps(inst))
    return folder, (write_coco_images(root) if images else root / "images" / "train2014")


# ---------------------------------------------------------------- gRefCOCO


def grefs() -> list[dict]:
    """Single-target 200, multi-target 201 (anns 11, 12, 13; 2 sentences), no-target 202."""

    def ref(ref_id, ann_ids, image_id, sents, no_target):
        return {
            "ref_id": ref_id,
            "ann_id": ann_ids,
            "image_id": image_id,
            "category_id": [-1] if no_target else [1] * len(ann_ids),
            "split": "train",
            "sentences": sentences(*sents),
            "sent_ids": list(sents),
            "no_target": no_target,
        }

    return [
        ref(200, [10], 1, [2000], False),
        ref(201, [11, 12, 13], 2, [2010, 2011], False),
        ref(202, [-1], 1, [2020], True),
    ]


def write_grefcoco(root: Path, refs: list | str, name="grefs(unc).json"):
    """(grefcoco folder, image root); `name` ending in .p pickles, a str `refs` is written verbatim."""
    folder = root / "grefcoco"
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(refs, str):
        (folder / name).write_text(refs)
    else:
        (folder / name).write_bytes(pickle.dumps(refs) if name.endswith(".p") else json.dumps(refs).encode())
    (folder / "instances.json").write_text(json.dumps(instances()))
    return folder, write_coco_images(root)


# ---------------------------------------------------------------- Qwen2.5-VL checkpoint

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def qwen_style_tokenizer():
    """Byte-level BPE with Qwen2.5-VL's control tokens and, like Qwen's, no `<image>` or `<SEG>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=QWEN_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["find the red ring", "what could roll? <think> it rolls </think>"], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   additional_special_tokens=QWEN_SPECIALS[1:])
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def write_tiny_qwen_vl(folder: Path, tokenizer, vocab_padding: int = 8, tie: bool = False, seed: int = 0):
    """A randomly initialised Qwen2.5-VL saved as transformers writes it; returns the model (eval).

    The vocabulary is padded past the tokenizer, as Qwen's (152064 rows for 151665 tokens);
    `tie` shares the LM head with the embeddings (Qwen2.5-VL-3B). One windowed and one
    full-attention vision block, so the tower's window reordering is exercised.
    """
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = dict(zip(QWEN_SPECIALS, tokenizer.convert_tokens_to_ids(QWEN_SPECIALS)))
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=16, out_hidden_size=64,
                           fullatt_block_indexes=[1]),
        text_config=dict(vocab_size=len(tokenizer) + vocab_padding, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                         pad_token_id=ids["<|endoftext|>"], bos_token_id=None, eos_token_id=ids["<|im_end|>"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def write_tiny_llava(folder: Path, tokenizer, seed: int = 0):
    """A randomly initialised llava-hf LLaVA-1.5 (CLIP tower, penultimate layer, CLS dropped) saved as
    transformers writes it, over ``tokenizer`` (which has `<image>`); returns the model (eval)."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                       image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=1, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=16,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model
