"""Sparse autoencoder: loss terms, TopK and AuxK, training on known sparse structure, freezing, checkpoints."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.sae import SparseAutoencoder, sae_loss, top_features
from models.sae_fit import DeadFeatureTracker, evaluate_sae, train_sae
from models.sae_io import load_sae, load_sae_metrics, load_saelens, save_sae, save_saelens

D_IN, ATOMS = 32, 64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls run fastest on one thread, and other suites share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sparse_states(n: int, seed: int, active: int = 3, noise: float = 0.02) -> torch.Tensor:
    """x = sparse non-negative codes @ a fixed unit-norm dictionary of 64 atoms, offset, + noise."""
    dictionary = torch.randn(ATOMS, D_IN, generator=torch.Generator().manual_seed(0))
    dictionary = dictionary / dictionary.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(n, ATOMS, generator=g).argsort(dim=1)[:, :active]
    codes = torch.zeros(n, ATOMS).scatter(1, ids, torch.rand(n, active, generator=g) + 0.5)
    return 3 * codes @ dictionary + 1.0 + noise * torch.randn(n, D_IN, generator=g)


def hand_sae(activation: str = "relu", k: int | None = None, input_scale: float = 1.0) -> SparseAutoencoder:
    """d_in 2, d_sae 3 with decoder row norms 1, 2, 5."""
    sae = SparseAutoencoder(2, 3, activation, k, input_scale=input_scale)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -1.0, 0.5]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]))
        sae.b_dec.copy_(torch.tensor([0.5, -0.5]))
    return sae


def test_shapes_dtypes_and_top_features():
    sae = SparseAutoencoder(D_IN, 128)
    x = torch.randn(2, 5, D_IN)
    x_hat, acts = sae(x)
    assert x_hat.shape == x.shape and acts.shape == (2, 5, 128)
    assert torch.equal(acts, sae.encode(x)) and torch.allclose(x_hat, sae.decode(acts))
    assert (acts >= 0).all()
    assert sae.encode(x.bfloat16()).dtype == torch.float32
    ids, values = top_features(acts, 7)
    assert ids.shape == values.shape == (2, 5, 7) and ids.dtype == torch.int64
    assert torch.equal(acts.gather(-1, ids), values)
    assert (values[..., :-1] >= values[..., 1:]).all()
    assert torch.equal(values[..., 0], acts.amax(-1))
    with pytest.raises(ValueError):
        top_features(acts, 129)


def test_loss_matches_hand_computation():
    # row 1: z − b_dec = [1, 1] → pre = [1, 1, 0.5] → x̂ = [3, 3.5]; recon 1.5² + 3² = 11.25; l1 1·1 + 1·2 + 0.5·5 = 5.5
    # row 2: z − b_dec = [0, 0] → pre = b_enc → acts [0, 0, 0.5] → x̂ = [2, 1.5]; recon 1.5² + 2² = 6.25; l1 2.5
    x = torch.tensor([[1.5, 0.5], [0.5, -0.5]])
    sae = hand_sae()
    torch.testing.assert_close(sae.encode(x), torch.tensor([[1.0, 1.0, 0.5], [0.0, 0.0, 0.5]]))
    torch.testing.assert_close(sae.decode(sae.encode(x)), torch.tensor([[3.0, 3.5], [2.0, 1.5]]))
    out = sae_loss(sae, x, l1_coef=0.1)
    torch.testing.assert_close(out["recon"], torch.tensor(8.75))
    torch.testing.assert_close(out["sparsity"], torch.tensor(4.0))
    torch.testing.assert_close(out["loss"], torch.tensor(8.75 + 0.1 * 4.0))
    # the input scale only changes units: x/2 with scale 2 is the same problem, x̂ comes back halved
    scaled = hand_sae(input_scale=2.0)
    torch.testing.assert_close(sae_loss(scaled, x / 2, 0.1)["loss"], out["loss"])
    torch.testing.assert_close(scaled(x / 2)[0], sae(x)[0] / 2)


def test_topk_keeps_exactly_k_and_ignores_l1():
    sae = SparseAutoencoder(D_IN, 64, "topk", k=4)
    with torch.no_grad():
        sae.b_enc.fill_(1.0)  # every pre-activation positive, so ReLU never removes a kept value
    x = torch.randn(50, D_IN)
    acts = sae.encode(x)
    assert ((acts != 0).sum(-1) == 4).all()
    torch.testing.assert_close(acts.amax(-1), sae.pre_activations(x).amax(-1))
    out = sae_loss(sae, x, l1_coef=100.0)
    assert out["sparsity"] > 0 and torch.equal(out["loss"], out["recon"])
    # a hand example: pre [1, 1, 0.5] with k = 1 keeps one of the tied 1s, ReLU'd
    assert (hand_sae("topk", k=1).encode(torch.tensor([[1.5, 0.5]])) != 0).sum() == 1
    with pytest.raises(ValueError):
        SparseAutoencoder(D_IN, 64, "topk", k=None)
    with pytest.raises(ValueError):
        SparseAutoencoder(D_IN, 64, "relu", k=4)


def test_topk_gradients_reach_only_the_chosen_latents():
    sae = SparseAutoencoder(D_IN, 64, "topk", k=4)
    with torch.no_grad():
        sae.b_enc.fill_(1.0)
    out = sae_loss(sae, torch.randn(1, D_IN), l1_coef=0.0)
    out["loss"].backward()
    chosen = out["acts"][0] != 0
    assert chosen.sum() == 4
    assert torch.equal(sae.W_enc.grad.abs().sum(0) > 0, chosen)
    assert torch.equal(sae.W_dec.grad.abs().sum(1) > 0, chosen)
    assert torch.equal(sae.b_enc.grad != 0, chosen)
    assert sae.b_dec.grad.abs().sum() > 0


def test_auxk_trains_only_dead_latents_towards_the_residual():
    sae = SparseAutoencoder(D_IN, 64, "topk", k=4)
    with torch.no_grad():
        sae.b_enc.fill_(1.0)
    x = torch.randn(32, D_IN)
    dead = torch.arange(64) >= 40
    alive_only = sae_loss(sae, x, 0.0, torch.zeros(64, dtype=torch.bool), aux_k=8, aux_coef=0.5)
    assert alive_only["aux"] == 0 and torch.equal(alive_only["loss"], alive_only["recon"])
    out = sae_loss(sae, x, 0.0, dead, aux_k=8, aux_coef=0.5)
    assert out["aux"] > 0
    torch.testing.assert_close(out["recon"], alive_only["recon"])
    torch.testing.assert_close(out["loss"], out["recon"] + 0.5 * out["aux"])
    assert sae_loss(sae, x, 0.0, dead, aux_k=1000, aux_coef=0.5)["aux"] > 0  # k_aux capped at the dead count
    out["aux"].backward()  # the residual is a fixed target: alive latents get nothing from it
    assert not (sae.W_enc.grad.abs().sum(0) > 0)[~dead].any() and (sae.W_enc.grad.abs().sum(0) > 0)[dead].any()
    assert not (sae.W_dec.grad.abs().sum(1) > 0)[~dead].any()
    # a few steps on AuxK alone: the dead latents learn to explain what the live ones miss
    optimizer = torch.optim.Adam([sae.W_enc, sae.b_enc, sae.W_dec], lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        sae_loss(sae, x, 0.0, dead, aux_k=8, aux_coef=1.0)["aux"].backward()
        optimizer.step()
    assert sae_loss(sae, x, 0.0, dead, aux_k=8)["aux"] < 0.5 * out["aux"]
    relu = SparseAutoencoder(D_IN, 64)  # ReLU ignores AuxK
    relu_out = sae_loss(relu, x, 0.1, dead, aux_k=8, aux_coef=0.5)
    torch.testing.assert_close(relu_out["loss"], relu_out["recon"] + 0.1 * relu_out["sparsity"])


def test_topk_decoder_rows_start_and_stay_unit_norm():
    assert torch.allclose(SparseAutoencoder(D_IN, 64).W_dec.norm(dim=1), torch.tensor(0.1))
    sae = SparseAutoencoder(D_IN, 64, "topk", k=4)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.tensor(1.0)) and torch.equal(sae.W_enc, sae.W_dec.t())
    trained, _ = train_sae(sparse_states(512, seed=6), sparse_states(64, seed=7), d_sae=64, l1_coef=0.0, lr=1e-2,
                           epochs=1, activation="topk", k=4, progress=False)
    assert torch.allclose(trained.W_dec.norm(dim=1), torch.tensor(1.0))


def test_training_recovers_sparse_structure():
    train, val = sparse_states(4096, seed=1), sparse_states(1024, seed=2)
    sae, report = train_sae(train, val, d_sae=128, l1_coef=0.1, lr=1e-3, epochs=4, progress=False)
    start, last = report["initial"], report["epochs"][-1]
    assert len(report["epochs"]) == 4 and report["steps"] == 4 * 64 and report["warmup_steps"] == 13
    assert last["val_explained_variance"] > 0.9
    assert last["val_explained_variance"] > start["explained_variance"] + 0.5
    assert last["val_mse"] < 0.1 * start["mse"]
    assert report["epochs"][0]["train_loss"] > last["train_loss"]
    held_out = evaluate_sae(sae, val)
    assert held_out["explained_variance"] == pytest.approx(last["val_explained_variance"])
    assert not any(p.requires_grad for p in sae.parameters())
    # the scale was fitted so that s·x has mean squared norm d_in
    assert (train * report["input_scale"]).pow(2).sum(-1).mean().item() == pytest.approx(D_IN, rel=1e-4)


def test_topk_training_improves_and_is_deterministic():
    train, val = sparse_states(4096, seed=3), sparse_states(512, seed=4)
    kwargs = dict(d_sae=128, l1_coef=0.0, lr=1e-2, epochs=3, activation="topk", k=4, progress=False, seed=5)
    threads = torch.get_num_threads()
    sae, report = train_sae(train, val, **kwargs, cpu_threads=2)
    assert torch.get_num_threads() == threads and report["seconds"] > 0
    last = report["epochs"][-1]["val_explained_variance"]
    assert last > 0.8 and last > report["initial"]["explained_variance"] + 0.5
    assert report["epochs"][-1]["val_l0"] <= 4
    again, _ = train_sae(train, val, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), again.state_dict().values()))


def test_dead_feature_tracking():
    tracker = DeadFeatureTracker(d_sae=4, window_tokens=10)
    fires = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 6)
    tracker.update(fires)
    assert not tracker.dead_mask().any()  # nobody has been silent for a whole window yet
    tracker.update(torch.tensor([[1.0, 0.0, 2.0, 0.0]] * 6))
    assert tracker.dead_mask().tolist() == [False, True, False, True]
    assert tracker.dead_fraction() == 0.5

    sae = SparseAutoencoder(D_IN, 16)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)
        sae.b_enc[[3, 11]] = -1e4  # forced dead
    stats = evaluate_sae(sae, torch.randn(200, D_IN))
    assert stats["dead_fraction"] == pytest.approx(2 / 16)
    assert stats["l0"] == pytest.approx(14)


def test_frozen_sae_passes_gradients_to_its_input_only():
    sae = SparseAutoencoder(D_IN, 64).freeze()
    assert not sae.training and not any(p.requires_grad for p in sae.parameters())
    states = torch.randn(8, D_IN, requires_grad=True)  # stands in for LM hidden states
    head = torch.nn.Linear(64, 1)  # stands in for the query codebook
    head(sae.encode(states)).sum().backward()
    assert states.grad is not None and states.grad.abs().sum() > 0
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in sae.parameters())


@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 5)])
def test_checkpoint_round_trips(tmp_path, activation, k):
    sae = SparseAutoencoder(D_IN, 48, activation, k, input_scale=0.37, layer=16, hook_name="model.layers.15")
    with torch.no_grad():
        sae.b_enc.uniform_(-0.2, 0.5)
        sae.b_dec.normal_()
    x = 3 * torch.randn(20, D_IN)

    ours = load_sae(save_sae(sae, tmp_path / "ours"))
    assert ours.config() == sae.config()
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), ours.state_dict().values()))

    lens = load_saelens(save_saelens(sae, tmp_path / "lens"))
    assert lens.input_scale == 1.0 and (lens.activation, lens.k, lens.layer) == (activation, k, 16)
    assert lens.hook_name == "model.layers.15"
    torch.testing.assert_close(lens.encode(x), sae.encode(x))
    torch.testing.assert_close(lens(x)[0], sae(x)[0])


def test_metrics_are_kept_beside_the_weights(tmp_path):
    sae = SparseAutoencoder(D_IN, 48, "topk", k=3)
    metrics = {"l0": 3.0, "explained_variance": 0.9, "dead_fraction": 0.05}
    assert load_sae_metrics(save_sae(sae, tmp_path, metrics=metrics)) == metrics
    save_sae(sae, tmp_path)  # retrained without metrics: the old ones would describe another SAE
    with pytest.raises(ValueError, match="metrics.json"):
        load_sae_metrics(tmp_path)


def test_loads_older_saelens_cfg(tmp_path):
    """SAELens < 6: architecture 'standard' + activation_fn_str, metadata at top level."""
    sae = SparseAutoencoder(D_IN, 48, "topk", k=3)
    folder = save_saelens(sae, tmp_path)
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": D_IN, "d_sae": 48, "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3}, "apply_b_dec_to_input": False,
        "hook_name": "blocks.16.hook_resid_post", "hook_layer": 16,
    }))
    loaded = load_saelens(folder)
    assert (loaded.activation, loaded.k, loaded.apply_b_dec_to_input) == ("topk", 3, False)
    assert (loaded.layer, loaded.hook_name) == (16, "blocks.16.hook_resid_post")


def _break_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))


def _break_weights(folder, drop=None, add=None, reshape=None):
    weights = load_file(folder / "sae_weights.safetensors")
    weights.pop(drop, None)
    if add:
        weights[add] = torch.zeros(3)
    if reshape:
        weights[reshape] = weights[reshape].t().contiguous()
    save_file(weights, folder / "sae_weights.safetensors")


@pytest.mark.parametrize("breakage,file,key", [
    (lambda f: _break_cfg(f, d_sae=None), "cfg.json", "d_sae"),
    (lambda f: _break_cfg(f, d_in="32"), "cfg.json", "d_in"),
    (lambda f: _break_cfg(f, architecture="jumprelu"), "cfg.json", "architecture"),
    (lambda f: _break_cfg(f, architecture="standard", activation_fn_str="gelu"), "cfg.json", "activation_fn_str"),
    (lambda f: _break_cfg(f, architecture="topk"), "cfg.json", "'k'"),
    (lambda f: _break_cfg(f, normalize_activations="constant_norm_rescale"), "cfg.json", "normalize_activations"),
    (lambda f: (f / "cfg.json").write_text("[1, 2]"), "cfg.json", "JSON object"),
    (lambda f: (f / "cfg.json").unlink(), "cfg.json", "not found"),
    (lambda f: _break_weights(f, drop="b_enc"), "sae_weights.safetensors", "b_enc"),
    (lambda f: _break_weights(f, add="threshold"), "sae_weights.safetensors", "threshold"),
    (lambda f: _break_weights(f, reshape="W_enc"), "sae_weights.safetensors", "W_enc"),
    (lambda f: (f / "sae_weights.safetensors").write_bytes(b"junk"), "sae_weights.safetensors", "safetensors"),
])
def test_malformed_saelens_folder_names_file_and_key(tmp_path, breakage, file, key):
    folder = save_saelens(SparseAutoencoder(D_IN, 48), tmp_path)
    breakage(folder)
    with pytest.raises(ValueError, match=file.replace(".", r"\.")) as err:
        load_saelens(folder)
    assert key in str(err.value)


def test_our_loader_refuses_a_saelens_folder(tmp_path):
    folder = save_saelens(SparseAutoencoder(D_IN, 48), tmp_path)
    (folder / "config.json").write_text(json.dumps({"d_in": D_IN, "d_sae": 48}))
    with pytest.raises(ValueError, match="config.json.*format"):
        load_sae(folder)
