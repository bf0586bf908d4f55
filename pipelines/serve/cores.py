"""The two model cores of `segrl serve`, Ray-free: each is one model folder, loaded the way
`segrl eval --checkpoint` loads it, and computes what eval computes (no second model path).

- ``PolicyCore``: prompt ids (``models.prompt``), prompt embeddings from the image's vision
  features through the projector, generation by the deployment's generator
  (``models.generators``: the rollout's vLLM engine, or eval's function; greedy at
  temperature 0), then one ``Policy`` forward over prompt + response for the
  reference-token states, as eval's ``answer_batch`` does. It returns the fields of that
  forward the head reads (``policy_inputs``, per sample).
- ``SegmentCore``: the frozen vision tower and SAM image encoder (``FrozenEncoders``, what
  `segrl precompute` runs), their features kept for the last ``cache_size`` images by content
  hash, and the trained head, per weights version, decoding the reference states into masks
  in the image frame as eval does (``kept_slot_logits``).

A mask's score is the slot's confidence (1 with one slot: emitting the token commits to the
mask, as the rewards score it) times the mean foreground probability inside the mask, so an
empty or hesitant mask scores low.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from config import Config
from config.builders import build_head, build_policy
from data.features import sam_input_size_of
from models.encoders import FrozenEncoders
from models.prompt import prompt_ids
from models.segmenter import NonFiniteError, require_finite, verify_model_folder
from pipelines.evaluate import kept_slot_logits

HEADS_KEPT = 2
"""Head versions a segmentation replica holds: the policy may still answer with the one before a swap."""


@dataclass
class Answer:
    text: str
    has_target: bool
    fields: dict[str, object]  # the head's policy_inputs of this sample (empty without a reference token)
    weights_version: int
    model_dir: str
    error: str | None = None  # why this question was not asked (its prompt is too long)


@dataclass(frozen=True)
class Question:
    vision: torch.Tensor  # [N, Dv] the image's vision features
    query: str
    max_new_tokens: int
    temperature: float
    fields: tuple[str, ...]  # the PolicyOutput fields the head reads (its ``policy_inputs``)


class PolicyCore:
    """The policy of one model folder at one weights version; ``generator`` decodes (shared by the
    versions a replica holds: ``activate`` loads this version into it)."""

    def __init__(self, config: Config, model_dir: str, version: int, generator):
        verify_model_folder(model_dir)
        self.generator = generator
        self.policy, self.tokenizer = build_policy(config, model_dir)
        self.policy.eval()
        self.ref_token, self.version, self.model_dir = config.model.ref_token, version, model_dir
        self.max_prompt_length = config.data.max_prompt_length

    def activate(self) -> None:
        """Load this version into the generator (no batch of another version may run meanwhile)."""
        self.generator.load(self.model_dir)

    def prompt(self, query: str) -> list[int]:
        return prompt_ids(self.tokenizer, query, self.ref_token)

    @torch.no_grad()
    def answer(self, questions: list[Question]) -> list[Answer]:
        """Questions alike in (max_new_tokens, temperature, fields) are generated together, as eval's batches."""
        answers: list[Answer | None] = [None] * len(questions)
        groups: dict[tuple[int, float, tuple[str, ...]], list[int]] = {}
        for i, q in enumerate(questions):
            groups.setdefault((q.max_new_tokens, q.temperature, q.fields), []).append(i)
        prompts = [self.prompt(q.query) for q in questions]
        for i, p in enumerate(prompts):
            if len(p) > self.max_prompt_length:
                answers[i] = Answer("", False, {}, self.version, self.model_dir, f"query: the prompt is {len(p)} "
                                    f"tokens, more than data.max_prompt_length {self.max_prompt_length}")
        for (max_new, temperature, names), rows in groups.items():
            rows = [i for i in rows if answers[i] is None]
            if rows:
                asked = self._answer_group([prompts[i] for i in rows], [questions[i] for i in rows], max_new,
                                           temperature, names)
                for i, a in zip(rows, asked):
                    answers[i] = a
        return answers

    def _answer_group(self, prompts: list[list[int]], questions: list[Question], max_new_tokens: int,
                      temperature: float, names: tuple[str, ...]) -> list[Answer]:
        visions = [q.vision for q in questions]
        embeds = [self.policy.prompt_embeds(p, v) for p, v in zip(prompts, visions)]
        responses = self.generator(self.policy, self.tokenizer, embeds, max_new_tokens, temperature)
        out = self.policy(prompts, visions, responses)
        require_finite(out, [None] * len(questions), [f"request {i}" for i in range(len(questions))])
        answers = []
        for i, resp in enumerate(responses):
            has_target = bool(out.ref_hidden[i].shape[0])
            fields = {name: _detached(getattr(out, name)[i]) for name in names} if has_target else {}
            answers.append(Answer(self.tokenizer.decode(resp, skip_special_tokens=True), has_target, fields,
                                  self.version, self.model_dir))
        return answers


def _detached(value):
    """A policy output of one sample, off the autograd graph: tensors copied, the token grid as it is."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


@dataclass
class Segmentation:
    masks: list[np.ndarray]  # bool [H, W] per kept slot
    scores: list[float]


class SegmentCore:
    """Frozen encoders with a feature cache, and the trained head of the last ``HEADS_KEPT`` versions."""

    def __init__(self, config: Config, model_dir: str, cache_size: int):
        m = config.model
        self.config = config
        self.encoders = FrozenEncoders(m.family, model_dir, m.sam.variant, m.sam.checkpoint,
                                       (config.data.image_min_pixels, config.data.image_max_pixels))
        self.cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.cache_size = cache_size
        self.heads: OrderedDict[int, torch.nn.Module] = OrderedDict()
        self.img_size = self.encoders.sam_size

    def encode(self, image: np.ndarray, image_hash: str) -> tuple[dict[str, torch.Tensor], bool]:
        """(the image's features, whether they came from the cache)."""
        if image_hash in self.cache:
            self.cache.move_to_end(image_hash)
            return self.cache[image_hash], True
        features = self.encoders([image])[0]
        if self.cache_size:
            self.cache[image_hash] = features
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return features, False

    def load_head(self, model_dir: str, version: int) -> None:
        """The head of ``model_dir`` as ``version`` (already held: nothing to do)."""
        if version in self.heads:
            return
        from transformers import AutoConfig

        verify_model_folder(model_dir)
        lm_dim = AutoConfig.from_pretrained(model_dir).get_text_config().hidden_size
        head, _ = build_head(self.config, model_dir, lm_dim)
        self.heads[version] = head.eval()
        while len(self.heads) > HEADS_KEPT:
            self.heads.popitem(last=False)

    @torch.no_grad()
    def segment(self, answer: Answer, features: dict[str, torch.Tensor]) -> Segmentation | None:
        """Masks at the image's size for an answer with a reference token; None for one without."""
        if not answer.has_target:
            return None
        self.load_head(answer.model_dir, answer.weights_version)
        head = self.heads[answer.weights_version]
        fields = [[answer.fields[name]] for name in head.policy_inputs]
        input_size = sam_input_size_of(features)
        head_out = head.decode_batch(*fields, [features["sam"]], sam_input_sizes=[input_size])[0]
        if not torch.isfinite(head_out.mask_logits).all():
            raise NonFiniteError("the head's mask logits are not finite (NaN or inf): its weights are damaged")
        size = tuple(int(v) for v in features["original_size"])
        m = self.config.model
        logits, slots = kept_slot_logits(head_out, input_size, size, self.img_size, m.num_slots,
                                         self.config.reward.confidence_threshold)
        confidence = (torch.ones(len(slots)) if m.num_slots == 1
                      else torch.sigmoid(head_out.conf_logits[slots]).float().cpu())
        masks, scores = [], []
        for slot_logits, conf in zip(logits, confidence):
            mask = slot_logits > 0
            inside = torch.sigmoid(slot_logits[mask]).mean().item() if mask.any() else 0.0
            masks.append(mask.numpy())
            scores.append(float(conf) * inside)
        return Segmentation(masks, scores)

    def policy_inputs(self) -> tuple[str, ...]:
        """The PolicyOutput fields the head reads (the kind is the config's, the same for every version)."""
        return tuple(next(reversed(self.heads.values())).policy_inputs)
