"""`segrl ablate`'s variants: valid configs, the right folders, the main job's runs reused, a table of real numbers."""
import pytest

from config import dump_config, load_config
from data.schema import DataError
from pipelines.ablate import (
    ABLATIONS,
    Ablation,
    markdown_table,
    register_ablation,
    sft_start_config,
    variant_config,
)
from pipelines.build import grpo_params, sft_params

CONFIG = "configs/tiny.yaml"


@pytest.mark.parametrize("name", list(ABLATIONS))
@pytest.mark.parametrize("seed", [0, 1])
def test_every_variant_is_a_valid_config_in_its_own_folders(name, seed):
    base = load_config(CONFIG)
    config = variant_config(CONFIG, [], ABLATIONS[name], seed, base.seed)
    assert config.seed == seed
    out = config.resolve_path(config.train.output)
    if name == "default" and seed == base.seed:
        assert out == base.resolve_path(base.train.output)
    else:
        assert out.endswith(f"ablate/{name}-s{seed}")
        assert out != base.resolve_path(base.train.output)
    if ABLATIONS[name].own_sft or seed != base.seed:
        assert config.resolve_path(config.train.init_from) == config.resolve_path(config.sft.output) + "/model"
        assert "/ablate/sft-" in config.resolve_path(config.sft.output)


def test_each_variant_changes_what_it_names():
    base = load_config(CONFIG)
    get = {name: variant_config(CONFIG, [], ABLATIONS[name], 0, base.seed) for name in ABLATIONS}
    assert get["no-seg-loss"].seg_loss.seg_coef == 0 != base.seg_loss.seg_coef
    assert get["no-format-score"].reward.weights == (0.0, 1.0) != base.reward.weights
    assert get["staleness-0"].train.staleness == 0 != base.train.staleness
    assert get["read-head"].model.head.kind == "read" != base.model.head.kind


def test_the_default_at_the_configs_seed_is_the_main_jobs_run():
    """Same config, same cache parameters: `ablate` after `main` reuses main's SFT and GRPO runs."""
    base = load_config(CONFIG, ["model.tiny.seed=0"])
    config = variant_config(CONFIG, ["model.tiny.seed=0"], ABLATIONS["default"], base.seed, base.seed)
    assert dump_config(config) == dump_config(base)
    assert grpo_params(config, sft_params(config, base)) == grpo_params(base, sft_params(base, base))
    other = variant_config(CONFIG, [], ABLATIONS["default"], base.seed + 1, base.seed)
    assert sft_params(other, base)["sae"] == sft_params(base, base)["sae"]  # one frozen SAE for every seed
    assert sft_params(other, base)["seed"] != sft_params(base, base)["seed"]


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        register_ablation(Ablation("default", (), "again"))


def test_table_rows_show_the_gain_over_sft_and_the_reward_trend():
    metrics = {"giou": 0.5, "ciou": 0.4, "n_acc": 0.9, "t_acc": 0.95, "reasoning_acc": 0.25}
    results = {"default": {"0": {"sft": {**metrics, "giou": 0.42}, "grpo": metrics,
                                 "reward_first": 0.31, "reward_last": 0.47, "reward_change_se": 0.021,
                                 "giou_change_se": 0.014},
                           "1": {"sft": metrics, "grpo": metrics, "reward_first": 0.3, "reward_last": 0.3}}}
    lines = markdown_table(results)
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == lines[3].count("|")
    assert lines[2] == ("| default | 0 | 0.500 | 0.400 | 0.900 | 0.950 | 0.250 | +0.080 ± 0.014 | "
                        "0.310 → 0.470 (+0.160 ± 0.021) |")
    assert lines[3].endswith("| +0.000 | 0.300 → 0.300 |")  # a row from before the error was recorded


def test_a_grpo_rate_change_keeps_the_sft_start():
    """SFT trains at sft.lr: changing GRPO's optim.lr must not retrain it, changing what SFT uses must."""
    base = load_config(CONFIG)
    assert sft_params(load_config(CONFIG, ["optim.lr=3e-5"]), base) == sft_params(base, base)
    assert sft_params(load_config(CONFIG, ["optim.weight_decay=0.5"]), base) != sft_params(base, base)
    assert grpo_params(load_config(CONFIG, ["optim.lr=3e-5"]), {}) != grpo_params(base, {})


@pytest.mark.parametrize("name", [n for n in ABLATIONS if not ABLATIONS[n].own_sft])
def test_a_grpo_variant_starts_from_the_defaults_sft(name):
    base = load_config(CONFIG)
    start = sft_start_config(CONFIG, [], ABLATIONS[name], 1, base.seed)
    default = variant_config(CONFIG, [], ABLATIONS["default"], 1, base.seed)
    assert start.resolve_path(start.sft.output) == default.resolve_path(default.sft.output)
    assert sft_params(start, base) == sft_params(default, base)
    read = sft_start_config(CONFIG, [], ABLATIONS["read-head"], 1, base.seed)
    assert read.model.head.kind == "read" and read.sft.output != start.sft.output


def test_the_command_line_takes_variants_and_seeds_before_the_overrides():
    from pipelines.cli import build_parser

    args = build_parser().parse_args(["ablate", "--seed", "1", "--variant", "read-head", "--seed", "2",
                                      "optim.lr=1e-4", "train.steps=5"])
    assert (args.variants, args.seeds, args.overrides) == (["read-head"], [1, 2], ["optim.lr=1e-4", "train.steps=5"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ablate", "--variant", "no-such-variant"])


def test_a_later_call_keeps_the_earlier_rows(tmp_path, monkeypatch):
    """`segrl ablate --seed 1` after a full table adds its rows; it does not wipe seed 0's."""
    import json

    from pipelines import ablate

    path = tmp_path / "runs" / "ablate" / "ablations.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"default": {"0": {"earlier": True}}, "no-seg-loss": {"1": {"stale": True}}}))
    monkeypatch.setattr(ablate, "run_variant", lambda config, sft_config, base, force: {"seed": config.seed})
    out = ablate.run_ablations(CONFIG, [f"paths.work_dir={tmp_path}"], ["default", "no-seg-loss"], [1])
    expected = {"default": {"0": {"earlier": True}, "1": {"seed": 1}}, "no-seg-loss": {"1": {"seed": 1}}}
    assert out["results"] == expected == json.loads(path.read_text())


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"default": 3}'])
def test_an_unreadable_table_stops_the_call_before_any_run(tmp_path, monkeypatch, content):
    from pipelines import ablate

    path = tmp_path / "runs" / "ablate" / "ablations.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    monkeypatch.setattr(ablate, "run_variant", lambda *a: pytest.fail("a variant ran"))
    with pytest.raises(DataError, match="ablations.json: .*move it aside"):
        ablate.run_ablations(CONFIG, [f"paths.work_dir={tmp_path}"], ["default"], [0])
    assert path.read_text() == content  # left for the user to look at
