"""Parameter groups with A.2's learning-rate multipliers, AdamW, the one-cycle schedule, clipping."""
import math

import pytest
import torch
from torch import nn

from config.schema import LRMultipliers, OptimConfig
from models.optim import build_optimizer, clip_grad_norm, one_cycle, one_cycle_factor, param_groups

BASE_LR = OptimConfig().lr  # 2e-6


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


def _modules() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    sae = nn.Linear(4, 8)
    sae.requires_grad_(False)
    return {
        "lm": nn.ModuleDict({"embed": nn.Embedding(10, 4), "layer": nn.Linear(4, 4), "norm": RMSNorm(4)}),
        "projector": nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 4)),
        "query_codebook": nn.Embedding(16, 4),
        "slot_mapper": nn.Linear(4, 4),
        "mask_decoder": nn.Sequential(nn.Conv2d(4, 4, 3), nn.LayerNorm(4)),
        "sae": sae,
    }


def _groups_by_name(groups):
    return {g["name"]: g for g in groups}


def test_groups_get_the_paper_multipliers():
    groups = _groups_by_name(param_groups(_modules(), BASE_LR, LRMultipliers().model_dump(), 0.01))
    expected = {"lm": 1.0, "projector": 1.0, "query_codebook": 25.0, "slot_mapper": 80.0, "mask_decoder": 10.0}
    for name, group in groups.items():
        assert group["lr"] == pytest.approx(BASE_LR * expected[name.split("/")[0]])
    assert groups["slot_mapper/decay"]["lr"] == pytest.approx(1.6e-4)
    assert not any(name.startswith("sae") for name in groups)  # frozen: no group at all


def test_biases_and_norm_weights_are_not_decayed():
    modules = _modules()
    groups = _groups_by_name(param_groups(modules, BASE_LR, {}, 0.01))
    no_decay = {id(p) for g in groups.values() if g["weight_decay"] == 0.0 for p in g["params"]}
    decay = {id(p) for g in groups.values() if g["weight_decay"] == 0.01 for p in g["params"]}
    lm, decoder = modules["lm"], modules["mask_decoder"]
    for p in (lm["layer"].bias, lm["norm"].weight, decoder[1].weight, decoder[1].bias, decoder[0].bias):
        assert id(p) in no_decay
    for p in (lm["layer"].weight, lm["embed"].weight, decoder[0].weight, modules["query_codebook"].weight):
        assert id(p) in decay
    assert set(groups) >= {"lm/decay", "lm/no_decay", "query_codebook/decay"}
    assert "query_codebook/no_decay" not in groups  # empty groups are dropped


def test_every_trainable_parameter_is_in_exactly_one_group():
    modules = _modules()
    modules["lm"]["layer"].bias.requires_grad_(False)
    groups = param_groups(modules, BASE_LR, {}, 0.01)
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for m in modules.values() for p in m.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable


def test_a_parameter_shared_by_two_roles_is_rejected():
    shared = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="also in 'lm'"):
        param_groups({"lm": shared, "projector": nn.Sequential(shared)}, BASE_LR)
    with pytest.raises(ValueError, match="base_lr"):
        param_groups({"lm": shared}, 0.0)


def test_adamw_decays_weights_but_not_biases_or_norms():
    modules = {"lm": nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))}
    optimizer = build_optimizer(param_groups(modules, 0.1, {}, 0.5))
    assert optimizer.defaults["betas"] == (0.9, 0.999)
    before = [p.detach().clone() for p in modules["lm"].parameters()]
    for p in modules["lm"].parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    weight, bias, norm_w, norm_b = (p.detach() for p in modules["lm"].parameters())
    assert torch.allclose(weight, before[0] * (1 - 0.1 * 0.5))  # decoupled decay: w ← w(1 − lr·wd)
    assert torch.equal(bias, before[1]) and torch.equal(norm_w, before[2]) and torch.equal(norm_b, before[3])


def _scheduled(total_steps: int, **kwargs):
    """Per-step lr of two groups (max lr 1.0 and 25.0) under one_cycle."""
    params = [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2, 2))]
    optimizer = build_optimizer([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 25.0}])
    scheduler = one_cycle(optimizer, total_steps, **kwargs)
    lrs = []
    for _ in range(total_steps + 2):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return lrs


def test_one_cycle_without_warmup_starts_at_max_and_ends_at_max_over_final_div():
    lrs = _scheduled(101, final_div=6.7)
    floor = 1 / 6.7
    assert lrs[0] == pytest.approx([1.0, 25.0])
    # halfway through the cosine: (1 + cos(π/2)) / 2 = 1/2 of the way down
    assert lrs[50][0] == pytest.approx(floor + (1 - floor) * 0.5)
    assert lrs[25][0] == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lrs[100] == pytest.approx([1 / 6.7, 25 / 6.7])
    assert lrs[102] == lrs[100]  # held after the last step
    assert all(b / a == pytest.approx(25.0) for a, b in lrs)  # group ratios never change
    assert all(x[0] >= y[0] for x, y in zip(lrs, lrs[1:]))


def test_one_cycle_with_warmup_rises_linearly_from_max_over_25():
    lrs = _scheduled(100, final_div=6.7, warmup_fraction=0.1)
    assert lrs[0][0] == pytest.approx(1 / 25)
    assert lrs[5][0] == pytest.approx(1 / 25 + (1 - 1 / 25) * 0.5)
    assert lrs[10][0] == pytest.approx(1.0)
    assert lrs[99][0] == pytest.approx(1 / 6.7)


def test_one_cycle_factor_edges_and_errors():
    assert one_cycle_factor(0, 1, 6.7) == 1.0  # a one-step run has nothing to anneal
    assert one_cycle_factor(9, 10, 6.7, warmup_steps=9) == 1.0
    optimizer = build_optimizer([{"params": [nn.Parameter(torch.zeros(1))], "lr": 1.0}])
    for kwargs, message in [({"total_steps": 0}, "total_steps"), ({"total_steps": 5, "final_div": 0.5}, "final_div"),
                            ({"total_steps": 5, "warmup_fraction": 1.0}, "warmup_fraction")]:
        with pytest.raises(ValueError, match=message):
            one_cycle(optimizer, **kwargs)


def test_clip_grad_norm_returns_the_norm_before_clipping():
    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))]
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert clip_grad_norm(params, 1.0) == pytest.approx(5.0)
    assert torch.cat([p.grad for p in params]).norm().item() == pytest.approx(1.0, rel=1e-5)
