"""The `segrl` command: the main job's report, conversion, and clear errors."""
import json
from pathlib import Path

import pytest
from tests_support import overrides_for
from upstream_fixtures import reasonseg_ann, write_reasonseg

from data.schema import read_samples
from pipelines.cli import build_parser, main


def test_every_subcommand_has_help():
    parser = build_parser()
    names = parser._subparsers._group_actions[0].choices
    assert {"config", "make-data", "make-tiny", "precompute", "convert", "main", "ablate", "serve"} <= set(names)
    for name, sub in names.items():  # every option's help renders (a bare % raises here)
        assert sub.format_help(), name
    assert "no-seg-loss: GRPO without the segmentation loss" in " ".join(names["ablate"].format_help().split())


def test_the_command_list_prints(capsys):
    """`segrl --help` lists every command (a help text with a bare % once broke it)."""
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "95% band" in out and "ablate" in out


def test_main_job_builds_and_reports(tiny_workspace, ray_cluster, capsys):
    config = tiny_workspace["config"]
    quick = ["model.sae.epochs=2", "sft.epochs=1", "sft.eval_samples=8", "eval.max_new_tokens=16",
             "train.steps=1", "grpo.prompts_per_step=2", "rollout.group_size=2", "train.groups_per_call=1",
             "train.eval_samples=4", "data.max_response_length=32", "cluster.rollout.num_cpus=0.1",
             "cluster.learner.num_cpus=0.1", "cluster.reference.num_cpus=0.1", "cluster.reward.num_cpus=0.1"]
    assert main(["main", *overrides_for(config), *quick]) == 0
    out = capsys.readouterr().out
    assert "is up to date" in out  # the session fixture already built data and models
    n_train = config.data.synthetic.n_train
    assert f"train      {n_train} samples" in out
    assert "tokenizer" in out and "LM " in out and "SAM " in out
    assert "0 failed" in out
    assert "explained variance" in out and "after SFT" in out and "after GRPO" in out and "reward: first" in out
    assert "GRPO - SFT on the same 4 samples (paired, ± standard error): gIoU " in out  # SFT's 8 and GRPO's 4
    report = json.loads((Path(config.resolve_path("{work_dir}")) / "report.json").read_text())
    assert report["grpo_vs_sft"]["giou"]["n"] == 4 and report["grpo_vs_sft"]["reasoning_acc"]["n"] == 4
    assert main(["main", *overrides_for(config), *quick]) == 0  # a rerun skips every finished step
    again = capsys.readouterr().out
    assert "sae-train:" in again and "sft:" in again and "train:" in again and again.count("is up to date") == 5


def test_convert_writes_canonical_split(tmp_path, capsys):
    src = write_reasonseg(tmp_path, reasonseg_ann(), split="val", name="img1")
    out_file = tmp_path / "out" / "val.parquet"
    assert main(["convert", "reasonseg", str(src), "--split", "val", "--out", str(out_file)]) == 0
    assert "wrote 1 samples" in capsys.readouterr().out
    assert read_samples(out_file)[0].dataset == "reasonseg"


def test_data_error_is_one_line(tmp_path, capsys):
    root = write_reasonseg(tmp_path, "{ truncated", split="val", name="img1")
    code = main(["convert", "reasonseg", str(root), "--split", "val", "--out", str(tmp_path / "o.parquet")])
    err = capsys.readouterr().err
    assert code == 2
    assert "img1.json" in err and "Traceback" not in err


def test_make_tiny_without_data_says_what_to_run(tmp_path, capsys):
    assert main(["make-tiny", f"paths.work_dir={tmp_path}"]) == 2
    assert "run `segrl make-data` first" in capsys.readouterr().err


def test_serve_config_writes_what_serve_deploys_and_starts_nothing(tmp_path, capsys, monkeypatch):
    """`serve-config -o FILE` writes the file `serve --checkpoint` deploys: the folder at an absolute path (it
    is not looked at) as the weights version asked, the listen address as asked; no Ray is started or joined
    (whether this test process is connected to the suite's cluster depends on the tests before it)."""
    import ray
    import yaml

    def refuse(*args, **kwargs):
        raise AssertionError("serve-config must not start or join Ray")

    monkeypatch.setattr(ray, "init", refuse)
    out = tmp_path / "serve.yaml"
    assert main(["serve-config", "--checkpoint", "somewhere/model", "--port", "8123", "-o", str(out),
                 "--weights-version", "3", "paths.work_dir=/srv/w"]) == 0
    assert capsys.readouterr().out == ""
    (app,) = yaml.safe_load(out.read_text())["applications"]
    model_dirs = {d["name"]: d["user_config"].get("model_dir") for d in app["deployments"]}
    expected = str((Path.cwd() / "somewhere" / "model").resolve())
    assert model_dirs == {"ingress": None, "policy": expected, "segment": expected}
    assert {d["user_config"].get("version") for d in app["deployments"][1:]} == {3}
    assert yaml.safe_load(out.read_text())["http_options"]["port"] == 8123
    assert app["args"]["config"]["paths"]["cache_dir"] == "/srv/w/cache"
