"""Typed config: shipped files validate; bad keys, types and values are named errors."""
import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from config import Config, ConfigError, dump_config, load_config
from config.builders import learner_settings, loss_settings, rollout_settings
from config.load import parse_override
from config.model import (
    TinyConfig,
    TinyLMAlignConfig,
    TinyLMConfig,
    TinySamConfig,
    TinyVisionConfig,
    TinyVisionPretrainConfig,
)
from config.paths import FOLDERS, expand
from models.tiny_specs import (
    TinyLMAlignSpec,
    TinyLMSpec,
    TinySamSpec,
    TinySpec,
    TinyVisionPretrainSpec,
    TinyVisionSpec,
)
from pipelines.build import tiny_spec
from pipelines.cli import main as cli_main

CONFIGS = sorted(Path("configs").glob("*.yaml"))


def test_all_shipped_configs_are_listed():
    assert {p.name for p in CONFIGS} >= {"tiny.yaml", "llava15-7b-reasonseg.yaml", "qwen25vl-7b-grefcoco.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    config = load_config(path)
    assert config.model.ref_token == "<SEG>"


@pytest.mark.parametrize(
    "name, family, sae_layer, slots",
    [("llava15-7b-reasonseg.yaml", "llava", 16, 1), ("qwen25vl-7b-grefcoco.yaml", "qwen2_5_vl", 13, 4)],
)
def test_paper_configs_carry_segcompass_a2_settings(name, family, sae_layer, slots):
    c = load_config(Path("configs") / name)
    assert (c.model.family, c.model.sae.layer, c.model.num_slots) == (family, sae_layer, slots)
    assert (c.data.max_prompt_length, c.data.max_response_length) == (1400, 2000)
    assert c.global_batch_size == 128 and c.rollout.group_size == 8 and c.grpo.prompts_per_step == 16
    assert (c.grpo.clip_ratio, c.grpo.kl_coef, c.optim.one_cycle_final_div) == (0.2, 0.2, 6.7)
    assert c.optim.lr == 2e-6
    m = c.optim.lr_multipliers
    assert (m.query_codebook, m.slot_mapper, m.mask_decoder) == (25.0, 80.0, 10.0)
    assert (c.optim.weight_decay, c.optim.betas, c.optim.grad_clip) == (0.01, (0.9, 0.999), 1.0)
    assert c.model.sam.variant == "vit_h"


@pytest.mark.parametrize("name", ["llava15-7b-reasonseg.yaml", "qwen25vl-7b-grefcoco.yaml"])
def test_paper_configs_show_no_tiny_sft_or_eval_value(name, capsys):
    def shown(path):
        assert cli_main(["config", "--config", str(path)]) == 0
        return yaml.safe_load(capsys.readouterr().out)

    tiny_file, paper_file = Path("configs/tiny.yaml"), Path("configs") / name
    tiny, paper, tiny_set = shown(tiny_file), shown(paper_file), yaml.safe_load(tiny_file.read_text())
    for section in ("sft", "eval"):
        for key in tiny_set[section]:  # every value tuned for the tiny model is replaced
            assert paper[section][key] != tiny[section][key], f"{section}.{key}"
    assert paper["eval"]["max_new_tokens"] == paper["data"]["max_response_length"] == 2000
    assert load_config("configs/tiny.yaml").eval_max_new_tokens == 96  # null: the rollout's length, as before


def test_loss_settings_carry_the_grpo_options():
    c = load_config("configs/tiny.yaml", ["grpo.policy_loss=grpo_dual_clip", "grpo.dual_clip_c=4",
                                          "grpo.loss_aggregation=seq_mean_token_sum_norm", "grpo.is_cap=3"])
    s = loss_settings(c)
    assert (s.policy_loss, s.dual_clip_c, s.loss_aggregation) == ("grpo_dual_clip", 4.0, "seq_mean_token_sum_norm")
    assert (s.is_correction, s.is_cap, s.max_response_length) == (False, 3.0, 96)
    assert loss_settings(load_config("configs/llava15-7b-reasonseg.yaml")).is_correction


@pytest.mark.parametrize("name", ["llava15-7b-reasonseg.yaml", "qwen25vl-7b-grefcoco.yaml"])
def test_paper_configs_carry_a2_gpu_memory_and_engine_settings(name):
    c = load_config(Path("configs") / name)
    s = learner_settings(c)
    assert (s.dtype, s.gradient_checkpointing, s.zero_offload) == ("bfloat16", True, "optimizer")
    assert c.rollout.tensor_parallel_size == 4
    assert rollout_settings(c).engine == {"max_num_seqs": 64, "max_num_batched_tokens": 17408}


def test_tiny_config_keeps_the_cpu_learner_and_vllm_defaults():
    c = load_config("configs/tiny.yaml")
    s = learner_settings(c)
    assert (s.dtype, s.gradient_checkpointing, s.zero_offload) == ("float32", False, "none")
    assert rollout_settings(c).engine == {}


def test_dotted_override_sets_nested_value():
    c = load_config("configs/tiny.yaml", ["model.tiny.lm.hidden_size=256", "rollout.temperature=0.7"])
    assert c.model.tiny.lm.hidden_size == 256
    assert c.rollout.temperature == 0.7


@pytest.mark.parametrize("section, spec", [(TinyLMConfig, TinyLMSpec), (TinyVisionConfig, TinyVisionSpec),
                                           (TinySamConfig, TinySamSpec), (TinyConfig, TinySpec),
                                           (TinyVisionPretrainConfig, TinyVisionPretrainSpec),
                                           (TinyLMAlignConfig, TinyLMAlignSpec)])
def test_tiny_sections_have_the_model_specs_fields(section, spec):
    fields = {f.name for f in dataclasses.fields(spec)} - {"ref_token"}  # TinySpec's is model.ref_token
    assert set(section.model_fields) == fields


def test_default_tiny_section_builds_the_default_tiny_spec():
    assert tiny_spec(Config()) == TinySpec()


def _write(tmp_path, tree) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize(
    "tree, needle",
    [
        ({"model": {"tiny": {"lm": {"hiden_size": 64}}}}, "unknown key 'model.tiny.lm.hiden_size'"),
        ({"optimm": {}}, "unknown key 'optimm'"),
        ({"rollout": {"group_size": "eight"}}, "rollout.group_size"),
        ({"grpo": {"clip_ratio": 1.5}}, "grpo.clip_ratio"),
        ({"optim": {"zero_offload": "params"}}, "optim.zero_offload"),
        ({"optim": {"gradient_checkpointing": "sometimes"}}, "optim.gradient_checkpointing"),
        ({"rollout": {"gpu_memory_utilization": 1.5}}, "rollout.gpu_memory_utilization"),
        ({"rollout": {"max_num_seqs": 0}}, "rollout.max_num_seqs"),
        ({"model": {"family": "gpt"}}, "model.family"),
        ({"model": {"tiny": {"lm": {"hidden_size": 64, "num_heads": 4}}}}, "head dim"),
        ({"data": {"image_min_pixels": 10, "image_max_pixels": 5}}, "image_min_pixels"),
        ({"grpo": {"kl_estimator": "k9"}}, "grpo.kl_estimator: Value error, unknown KL estimator 'k9'"),
        ({"grpo": {"policy_loss": "ppo2"}}, "grpo.policy_loss"),
        ({"grpo": {"dual_clip_c": 3.0}}, "dual_clip_c is only for policy_loss grpo_dual_clip, not grpo_clip"),
        ({"grpo": {"policy_loss": "grpo_dual_clip", "dual_clip_c": 0.5}}, "grpo.dual_clip_c"),
        ({"sft": {"max_new_tokens": 96}}, "unknown key 'sft.max_new_tokens'"),
        ({"reward": {"preset": "nope"}}, "reward.preset: Value error, unknown reward preset 'nope'"),
        ({"model": {"sae": {"activation": "topk"}}}, "k is required for activation topk"),
        ({"data": {"synthetic": {"image_size": 32}}}, "data.synthetic.image_size"),
        ({"model": {"head": {"kind": "sam2"}}}, "model.head.kind: Value error, unknown segmentation head 'sam2'"),
        ({"model": {"head": {"kind": "read"}, "num_slots": 4}}, "head.kind read decodes one mask per response"),
    ],
)
def test_bad_file_names_key_and_file(tmp_path, tree, needle):
    path = _write(tmp_path, tree)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.tiny.lm.hidden_sze=3", "unknown key 'model.tiny.lm.hidden_sze'"),
        ("model.tiny.lm.hidden_size=-4", "model.tiny.lm.hidden_size"),
        ("seed.value=1", "'seed' is a value"),
        ("novalue", "expected KEY=VALUE"),
        ("train.resume=maybe", "train.resume: Value error, expected true, false or auto (got 'maybe')"),
        ("train.resume=1", "train.resume: Value error, expected true, false or auto (got 1)"),
    ],
)
def test_bad_override_is_named(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", [override])
    assert needle in str(err.value)
    assert override.split("=")[0] in str(err.value)


def test_unknown_head_kind_is_one_line_naming_the_known_kinds():
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", ["model.head.kind=sam2"])
    assert "\n" not in str(err.value) and "known: read, segcompass" in str(err.value)
    assert load_config("configs/tiny.yaml", ["model.head.kind=read"]).model.head.kind == "read"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_dump_round_trips(tmp_path):
    config = load_config("configs/qwen25vl-7b-grefcoco.yaml", ["seed=7"])
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_paths_expand_from_work_dir():
    c = load_config("configs/tiny.yaml", ["paths.work_dir=/scratch/run"])
    assert c.resolve_path(c.model.name_or_path) == "/scratch/run/models/tiny"
    assert c.resolve_path(c.data.root) == "/scratch/run/data/synthetic"


@given(key=st.lists(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), min_size=1, max_size=4), value=st.integers())
def test_parse_override_splits_key_and_parses_value(key, value):
    parts, parsed = parse_override(f"{'.'.join(key)}={value}")
    assert parts == key and parsed == value


FOLDERS_SET = {"work_dir": "/w", "models_dir": "{data_dir}/m", "data_dir": "{work_dir}/d", "cache_dir": "c",
               "runs_dir": "{work_dir}/{{r}}"}


@given(st.lists(st.one_of(st.sampled_from(FOLDERS).map(lambda name: "{" + name + "}"),
                          st.text(max_size=6).map(lambda t: t.replace("{", "{{").replace("}", "}}"))), max_size=6))
def test_path_templates_expand_as_str_format_would(parts):
    template = "".join(parts)
    resolved = {name: expand(FOLDERS_SET[name], FOLDERS_SET, (name,)) for name in FOLDERS}
    assert resolved["models_dir"] == "/w/d/m" and resolved["runs_dir"] == "/w/{r}"
    assert expand(template, FOLDERS_SET) == template.format(**resolved)


@given(st.text(alphabet="{}0ab_dirwok.!:", max_size=12))
def test_a_path_template_expands_or_says_why(template):
    try:
        expand(template, FOLDERS_SET)
    except ValueError as exc:
        assert repr(template) in str(exc)


def test_cli_reports_config_error_without_traceback(capsys):
    assert cli_main(["config", "--config", "configs/tiny.yaml", "grpo.kl_coef=-1"]) == 2
    err = capsys.readouterr().err
    assert "grpo.kl_coef" in err and "Traceback" not in err


def test_override_that_is_not_yaml_is_a_string():
    c = load_config("configs/tiny.yaml", ["train.output={runs_dir}/bench-1"])
    assert c.resolve_path(c.train.output) == "work/runs/bench-1"


def test_overrides_that_must_change_together_are_validated_together():
    config = load_config("configs/tiny.yaml", ["model.sae.activation=relu", "model.sae.k=null"])
    assert (config.model.sae.activation, config.model.sae.k) == ("relu", None)
    with pytest.raises(ConfigError, match=r"override 'model.sae.activation=relu'.*k is required"):
        load_config("configs/tiny.yaml", ["model.sae.activation=relu", "rollout.temperature=0.5"])
