"""The learner's loss on one micro-batch of trajectory rows: GRPO + segmentation, one backward.

SegCompass A.1 trains the policy and the segmentation modules together: the GRPO loss
(eq. 10-11) on the response tokens plus the supervised segmentation loss on the masks
decoded at each response's reference token. Torch only, so the learner actor stays a
thin wrapper and this is testable without Ray or DeepSpeed.

A step's rows are split into micro-batches (and over ranks); each micro-batch loss is
scaled by ``LossTotals`` of the whole step, so the micro-batch losses sum to the loss of
the full batch and the accumulated gradient is the full batch's.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from data.features import sam_input_size_of
from models.losses import grpo_loss, segmentation_loss, truncated_is_weights
from models.sae_fit import evaluate_sae


def _responses(lengths: Sequence[int]) -> int:
    return sum(1 for n in lengths if n > 0)


AGGREGATION_UNITS: dict[str, Callable[[Sequence[int]], int]] = {
    "seq_mean_group_mean": _responses,
    "seq_mean_token_sum_norm": _responses,
    "token_mean": sum,
}
"""What each loss aggregation averages over, counted from response lengths: responses with
a token, or tokens. A micro-batch's share of the full-batch mean is its count / the total."""


def _units(aggregation: str, lengths: Sequence[int]) -> int:
    if aggregation not in AGGREGATION_UNITS:
        raise ValueError(f"no micro-batch weighting for loss aggregation {aggregation!r}; "
                         f"known: {sorted(AGGREGATION_UNITS)}")
    return int(AGGREGATION_UNITS[aggregation](lengths))


def usable(row: Mapping) -> bool:
    """Rows the reward stage marked with an error carry no trustworthy advantage: never trained on."""
    return row.get("error") is None


@dataclass(frozen=True)
class LossTotals:
    """Full-batch counts the micro-batch losses are normalised by."""

    pg_units: int  # responses or tokens the policy loss averages over (see AGGREGATION_UNITS)
    seg_rows: int  # usable rows whose response has a reference token (a mask to supervise)

    @classmethod
    def of(cls, rows: Sequence[Mapping], aggregation: str, ref_token_id: int) -> "LossTotals":
        kept = [r for r in rows if usable(r)]
        return cls(_units(aggregation, [len(r["response_ids"]) for r in kept]),
                   sum(1 for r in kept if ref_token_id in r["response_ids"]))


@dataclass(frozen=True)
class LossSettings:
    """The config's GRPO and segmentation-loss settings that the learner's loss reads."""

    clip_ratio: float
    clip_ratio_high: float | None
    kl_coef: float
    kl_estimator: str
    policy_loss: str
    loss_aggregation: str
    num_slots: int
    seg_loss: Mapping[str, float]  # segmentation_loss keywords: seg_coef, dice/bce/conf weights
    is_correction: bool  # decoupled clip + truncated importance weights (see learner_loss)
    is_cap: float
    dual_clip_c: float | None  # grpo_dual_clip's c (None: its default)
    max_response_length: int  # the constant of seq_mean_token_sum_norm


def _pad(rows: Sequence[Sequence[float]], width: int) -> Tensor:
    out = torch.zeros(len(rows), width)
    for i, values in enumerate(rows):
        out[i, : len(values)] = torch.as_tensor(values, dtype=torch.float32)
    return out


def gt_masks(row: Mapping, shape: tuple[int, int]) -> Tensor:
    """[G, H, W] float GT of a row (G = 0 for no target) from its decoded binary masks."""
    masks = [torch.as_tensor(np.asarray(m, dtype=np.float32)) for m in row["gt_masks"]]
    return torch.stack(masks) if masks else torch.zeros(0, *shape)


def learner_loss(
    model: Callable,
    rows: Sequence[Mapping],
    features,
    settings: LossSettings,
    totals: LossTotals | None = None,
    live: Sequence[bool] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """(loss, metrics) of a micro-batch of trajectory rows.

    ``model`` is a Segmenter (or a DeepSpeed engine around one); ``features.get(image_hash)``
    gives {"vision", "sam"} (a FeatureStore or a dict). A row holds the trajectory columns
    with ``gt_masks`` decoded to binary [H, W] arrays at the mask decoder's resolution.
    Rows with an ``error`` are dropped and counted. Rows with ``live`` False still run
    through the model, so every ZeRO-3 rank calls the same modules in the same order, but
    add nothing to the loss (a zero weight keeps them in the graph, which the backward's
    parameter gathers need too). The segmentation terms take ``settings.seg_loss`` field for
    field (seg_coef scales Dice + BCE, conf_weight the slot confidences). Without
    ``totals`` the loss is this micro-batch's own: GRPO + mean segmentation loss.

    With ``settings.is_correction`` (decoupled PPO with truncated importance sampling) the
    clip is anchored to the learner's own logprobs at the step's start, which are π_θ itself
    as a step is one update, and each token's policy term is weighted by
    min(π_θ/π_rollout, is_cap): staleness and the engine's numerics are corrected with
    bounded variance. Without it the clip is anchored to the rollout's logprobs: a token
    whose ratio left the trust region on the favoured side gets no gradient.
    Metrics are micro-batch means plus the counts to weight them by (pg_units, tokens,
    seg_rows, dice_rows) and ``dropped_rows``. For SegCompass C.1's Figure 8 (left) they also
    hold ``dice``, the Dice loss of the live rows with a target, and ``sae_mse``, the frozen
    SAE's reconstruction MSE of their layer-k reference states (sae-train's definition; NaN
    for a head without an SAE), both means over the rows they count.
    """
    live = [True] * len(rows) if live is None else list(live)
    kept = [(r, a) for r, a in zip(rows, live) if usable(r)]
    if not kept:
        raise ValueError(f"no usable rows: all {len(rows)} carry an error")
    dropped = len(rows) - len(kept)
    rows, live = [r for r, _ in kept], [a for _, a in kept]
    feats = [features.get(r["image_hash"]) for r in rows]
    out, heads = model([r["prompt_ids"] for r in rows], [f["vision"] for f in feats],
                       [r["response_ids"] for r in rows], [f["sam"] for f in feats],
                       [sam_input_size_of(f) for f in feats])

    width = out.logprobs.shape[1]
    mask = out.response_mask & torch.tensor(live)[:, None]
    old = _pad([r["rollout_logprobs"] for r in rows], width)
    ref = _pad([r["ref_logprobs"] for r in rows], width)
    advantages = torch.tensor([float(r["advantage"]) if a else 0.0 for r, a in zip(rows, live)])
    s = settings
    anchor, is_weights = old, None
    if s.is_correction:
        anchor = out.logprobs.detach()
        is_weights = truncated_is_weights(old, anchor, s.is_cap, mask)
    pg, pg_metrics = grpo_loss(out.logprobs, anchor, ref, advantages, mask, s.clip_ratio, s.kl_coef, s.kl_estimator,
                               s.policy_loss, is_weights, s.loss_aggregation, s.clip_ratio_high, s.dual_clip_c,
                               s.max_response_length)

    sae = getattr(getattr(getattr(model, "module", model), "head", None), "sae", None)  # SegCompass's frozen SAE
    seg_terms, seg_live, dice, recon = [], [], [], []
    for i, (row, head, is_live) in enumerate(zip(rows, heads, live)):
        if head is not None:
            conf = head.conf_logits if s.num_slots > 1 else None
            gt = gt_masks(row, head.mask_logits.shape[1:])
            term, parts = segmentation_loss(head.mask_logits, gt, conf, **s.seg_loss)
            seg_terms.append(term)
            seg_live.append(is_live)
            if is_live and gt.shape[0]:
                dice.append(parts["dice"])
            if is_live and sae is not None:
                with torch.no_grad():
                    recon.append(evaluate_sae(sae, out.layer_ref_hidden[i].detach())["mse"])
    seg_weights = torch.tensor(seg_live, dtype=torch.float32)
    seg_sum = (torch.stack(seg_terms) * seg_weights).sum() if seg_terms else pg.new_zeros(())

    lengths = mask.sum(dim=1).tolist()
    pg_units, seg_rows = _units(s.loss_aggregation, lengths), int(seg_weights.sum())
    totals = totals or LossTotals(pg_units, seg_rows)
    loss = pg * (pg_units / max(totals.pg_units, 1)) + seg_sum / max(totals.seg_rows, 1)

    with torch.no_grad():
        tokens = int(mask.sum())
        mismatch = ((out.logprobs - old).abs() * mask).sum() / max(tokens, 1)
    metrics = {
        "loss": loss.item(), "pg_loss": pg_metrics["pg_loss"], "kl": pg_metrics["kl"],
        "clip_fraction": pg_metrics["clip_fraction"], "seg": seg_sum.item() / max(seg_rows, 1),
        "logprob_mismatch": mismatch.item(), "tokens": tokens, "pg_units": pg_units, "seg_rows": seg_rows,
        "dropped_rows": dropped, "dice": float(np.mean(dice)) if dice else 0.0, "dice_rows": len(dice),
        "sae_mse": float("nan") if sae is None else float(np.mean(recon)) if recon else 0.0,
    }
    return loss, metrics
