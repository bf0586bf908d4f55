"""Sparse autoencoder on a middle LM layer (SAE-V / SAELens "standard", optional TopK).

Parameters follow the SAELens layout so checkpoints map one-to-one:
W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].

Forward, with s = `input_scale` (fixed at training time, see `models/sae_fit.py`):

    z     = s · x                                   scale to the training normalisation
    pre   = (z − b_dec·apply_b_dec_to_input) W_enc + b_enc
    acts  = ReLU(pre)          | TopK: ReLU of the k largest pre-activations, 0 elsewhere
    x_hat = (acts W_dec + b_dec) / s

Subtracting b_dec before encoding (Bricken et al. 2023; SAELens `apply_b_dec_to_input`)
centres the input on the decoder bias, so encoder directions see deviations from the
"typical" activation rather than its large constant offset. SegCompass's released SAE
turns it off; loading their cfg keeps whatever it says.

The ReLU SAE is trained with MSE + λ·Σ_j |a_j|·‖W_dec[j]‖: weighting the L1 by decoder
row norms stops the optimiser from shrinking activations while growing decoder rows,
so no unit-norm projection of W_dec is needed. TopK fixes the sparsity by
construction (L0 = k) and trains on MSE plus the AuxK term of Gao et al. 2024. Its
decoder rows are kept at unit norm (`normalize_decoder_`, after every step): the top k
are then chosen by their share of the reconstruction, not by how the scale drifted
between a latent's encoder and decoder (unconstrained, 78% of the tiny config's 1,024
latents had stopped firing after two epochs). AuxK covers what still dies: a latent outside
the top k gets no gradient, so the dead latents' own top-k_aux are trained to
reconstruct the main model's residual, which pulls them back to where the error is.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Activation = Literal["relu", "topk"]
DECODER_INIT_NORM = 0.1  # ReLU, Anthropic "April update": small decoder rows, W_enc = W_decᵀ (TopK: unit rows)


class SparseAutoencoder(nn.Module):
    """Dictionary of d_sae features over d_in-dimensional hidden states."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        activation: Activation = "relu",
        k: int | None = None,
        *,
        input_scale: float = 1.0,
        apply_b_dec_to_input: bool = True,
        layer: int | None = None,
        hook_name: str | None = None,
    ):
        super().__init__()
        _check_shape_args(d_in, d_sae, activation, k)
        if not input_scale > 0:
            raise ValueError(f"input_scale must be > 0, got {input_scale}")
        self.d_in, self.d_sae, self.activation, self.k = d_in, d_sae, activation, k
        self.input_scale = float(input_scale)
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.layer, self.hook_name = layer, hook_name
        w_dec = torch.randn(d_sae, d_in)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True) * (DECODER_INIT_NORM if activation == "relu" else 1.0)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def config(self) -> dict:
        """Everything besides the weights needed to rebuild this SAE (JSON-safe)."""
        return {
            "d_in": self.d_in, "d_sae": self.d_sae, "activation": self.activation, "k": self.k,
            "input_scale": self.input_scale, "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "layer": self.layer, "hook_name": self.hook_name,
        }

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations [.., d_sae]; x is cast to the SAE's dtype (LM states may be bf16)."""
        z = self.scale_in(x)
        if self.apply_b_dec_to_input:
            z = z - self.b_dec
        return z @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return torch.relu(pre)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [.., d_sae] of hidden states x [.., d_in]."""
        return self.activate(self.pre_activations(x))

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the caller's units (the input scale undone)."""
        return self.decode_scaled(acts) / self.input_scale

    def decode_scaled(self, acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the normalised space the loss is measured in."""
        return acts @ self.W_dec + self.b_dec

    def scale_in(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.W_enc.dtype) * self.input_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acts = self.encode(x)
        return self.decode(acts), acts

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (TopK training keeps them there)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def freeze(self) -> SparseAutoencoder:
        """Inference-only: no trainable parameters, gradients still flow to the input."""
        self.requires_grad_(False)
        return self.eval()


def sae_loss(
    sae: SparseAutoencoder, x: torch.Tensor, l1_coef: float,
    dead_mask: torch.Tensor | None = None, aux_k: int = 0, aux_coef: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Training objective on a batch x [.., d_in], measured in the normalised space.

    recon    = mean over tokens of Σ_d (ẑ − z)²          (SAELens / SegCompass reduction)
    sparsity = mean over tokens of Σ_j |a_j|·‖W_dec[j]‖₂
    aux      = mean over tokens of Σ_d (ê − e)², e = z − ẑ (detached), ê = the decoder applied to
               the aux_k largest pre-activations among `dead_mask`'s latents (0 with none dead)
    loss     = recon + l1_coef·sparsity for ReLU; recon + aux_coef·aux for TopK.
    Also returns the batch's `acts` [tokens, d_sae] so callers can track firing.
    """
    z = sae.scale_in(x).reshape(-1, sae.d_in)
    pre = sae.pre_activations(x).reshape(-1, sae.d_sae)
    acts = sae.activate(pre)
    z_hat = sae.decode_scaled(acts)
    recon = (z_hat - z).pow(2).sum(-1).mean()
    sparsity = (acts.abs() * sae.W_dec.norm(dim=1)).sum(-1).mean()
    aux = torch.zeros((), device=recon.device)
    n_dead = 0 if dead_mask is None else int(dead_mask.sum())
    if sae.activation == "topk" and aux_k > 0 and n_dead > 0:
        top = pre.masked_fill(~dead_mask, float("-inf")).topk(min(aux_k, n_dead), dim=-1)
        aux_acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        aux = (aux_acts @ sae.W_dec - (z - z_hat).detach()).pow(2).sum(-1).mean()
    loss = recon + aux_coef * aux if sae.activation == "topk" else recon + l1_coef * sparsity
    return {"loss": loss, "recon": recon, "sparsity": sparsity, "aux": aux, "acts": acts}


def top_features(acts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k strongest features per token: (ids [.., k] int64, values [.., k]), descending.

    Values are 0 where fewer than k features fire; callers that want only active
    features mask on values > 0.
    """
    if not 1 <= k <= acts.shape[-1]:
        raise ValueError(f"k must be in [1, {acts.shape[-1]}], got {k}")
    top = acts.topk(k, dim=-1)
    return top.indices, top.values


def _check_shape_args(d_in: int, d_sae: int, activation: str, k: int | None) -> None:
    if d_in < 1 or d_sae < 1:
        raise ValueError(f"d_in and d_sae must be positive, got {d_in}, {d_sae}")
    if activation == "relu" and k is not None:
        raise ValueError("k is only meaningful for activation='topk'")
    if activation == "topk" and (k is None or not 1 <= k <= d_sae):
        raise ValueError(f"activation='topk' needs 1 <= k <= d_sae={d_sae}, got k={k}")
    if activation not in ("relu", "topk"):
        raise ValueError(f"activation must be 'relu' or 'topk', got {activation!r}")
