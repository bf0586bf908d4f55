"""A corpus of careless and hostile inputs: each is refused with exit status 2 and one line naming
the file, the record or the field, nothing is written half-way, and nothing crashes or runs code.
Config files, split files, eval and run folders here; converting upstream datasets in
test_bad_convert_inputs."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from refusals import nothing_written, refuse

from config import load_config
from pipelines.cli import main

# ---------------------------------------------------------------- config files and overrides

BAD_OVERRIDES = {
    "group of one": ("rollout.group_size=1", "rollout.group_size", "greater than or equal to 2"),
    "group as boolean": ("rollout.group_size=true", "rollout.group_size", "not a boolean"),
    "staleness as boolean": ("train.staleness=true", "train.staleness", "not a boolean"),
    "temperature inf": ("rollout.temperature=.inf", "rollout.temperature", "must be finite"),
    "temperature 'inf' string": ("rollout.temperature=inf", "rollout.temperature", "must be finite"),
    "weight nan": ("reward.weights=[-5,.nan]", "reward.weights", "must be finite"),
    "beta boolean": ("optim.betas=[true,0.5]", "optim.betas", "not a boolean"),
    "query weight inf": ("data.synthetic.query_weights={colour_word: .inf}", "data.synthetic.query_weights",
                         "must be finite"),
    "no eval split": ("data.eval_splits=[]", "data.eval_splits", "at least 1 item"),
    "unknown placeholder": ("data.root={nope}/x", "data.root", "unknown placeholder {nope}"),
    "positional placeholder": ("train.output={0}/x", "train.output", "unknown placeholder {0}"),
    "attribute placeholder": ("sft.output={runs_dir.x}", "sft.output", "unknown placeholder {runs_dir.x}"),
    "lone brace": ("model.name_or_path=a{b", "model.name_or_path", "not a path template"),
    "lone closing brace": ("paths.cache_dir=a}b", "paths.cache_dir", "not a path template"),
    "folder through itself": ("paths.work_dir={runs_dir}", "paths.work_dir -> paths.runs_dir -> paths.work_dir"),
    "a value is not a section": ("seed.x=1", "'seed' is a value"),
    "number beyond float": ("train.steps=1.0e+400", "train.steps", "finite"),
}


@pytest.mark.parametrize("case", BAD_OVERRIDES)
def test_bad_override(case, capsys):
    override, *fragments = BAD_OVERRIDES[case]
    refuse(["config", override], capsys, f"override '{override}'", *fragments)


def test_a_folder_may_be_defined_through_another(capsys):
    assert main(["config", "paths.models_dir={data_dir}/models", "paths.work_dir=/w"]) == 0
    capsys.readouterr()
    config = load_config("configs/tiny.yaml", ["paths.models_dir={data_dir}/models", "paths.work_dir=/w",
                                               "model.name_or_path={models_dir}/{{x}}"])
    assert config.resolve_path(config.model.name_or_path) == "/w/data/models/{x}"


TINY_FILE = Path("configs/tiny.yaml").resolve()
TINY = TINY_FILE.read_text()


def alias_bomb(levels: int = 8, width: int = 9) -> str:
    """A YAML list of nested aliases: width**levels leaves if expanded, a few hundred bytes as written."""
    lines, previous = [], "x"
    for i in range(levels):
        lines.append(f"  - &l{i} [{', '.join([previous] * width)}]\n")
        previous = f"*l{i}"
    return "".join(lines)


BAD_FILES = {
    "duplicate key": (TINY + "seed: 3\nseed: 4\n", "line", "key 'seed' given twice"),
    "duplicate nested key": ("rollout:\n  group_size: 4\n  temperature: 1.0\n  group_size: 2\n",
                             "line 4, column 3: key 'group_size' given twice (first on line 2)"),
    "duplicate key in a flow mapping": ("rollout: {group_size: 4, group_size: 2}\n", "key 'group_size' given twice"),
    "malformed": ("model: [unclosed\n", "not valid YAML: line 2, column 1"),
    "tab indent": ("rollout:\n\tgroup_size: 4\n", "not valid YAML: line 2"),
    "truncated": (TINY[: len(TINY) // 2] + "\n  oops: [", "not valid YAML"),
    "not a mapping": ("- 1\n- 2\n", "top level must be a mapping"),
    "python object tag": ("seed: !!python/object/apply:os.system ['touch pwned']\n",
                          "could not determine a constructor"),
    "nested 2000 deep": ("seed: " + "[" * 2000 + "]" * 2000 + "\n", "nested too deeply"),
    "alias bomb in an unknown key": ("bomb:\n" + alias_bomb(), "unknown key 'bomb'"),
    "alias bomb as a number": ("seed:\n" + alias_bomb(), "seed: Input should be a valid integer"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_config_file(case, tmp_path, capsys, monkeypatch):
    text, *fragments = BAD_FILES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    monkeypatch.chdir(tmp_path)  # a payload that ran would leave its file here
    refuse(["config", "--config", str(path)], capsys, str(path), *fragments)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("damage", ["non-utf8", "bit flip", "folder", "missing"])
def test_unreadable_config_file(damage, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    raw = bytearray(Path("configs/tiny.yaml").read_bytes())
    if damage == "non-utf8":
        path.write_bytes(b"seed: 1\nrollout: {group_size: \xff\xfe}\n")
        refuse(["config", "--config", str(path)], capsys, str(path), "not UTF-8", "0xff")
    elif damage == "bit flip":
        raw[raw.index(b"group_size")] ^= 0x01  # g -> f: the key becomes "froup_size"
        path.write_bytes(bytes(raw))
        refuse(["config", "--config", str(path)], capsys, str(path), "unknown key 'rollout.froup_size'")
    elif damage == "folder":
        path.mkdir()
        refuse(["config", "--config", str(path)], capsys, str(path))
    else:
        refuse(["config", "--config", str(path)], capsys, str(path), "not found")


# ---------------------------------------------------------------- split files, eval and run folders


@pytest.fixture(scope="module")
def split_root(tmp_path_factory) -> Path:
    """A small synthetic val split (no models: the split is what is under test)."""
    from data.synthetic.generate import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, n_train=0, n_val=6, n_test=0, progress=False)
    return root


@pytest.fixture
def eval_argv(split_root, tmp_path, monkeypatch):
    """`segrl eval` on a copy of the split at ``tmp_path``, with a model folder that is never loaded:
    the model builder is replaced, so what fails is the split (read before any sample is scored)."""
    import config.builders

    model = tmp_path / "model"
    (model / "projector").mkdir(parents=True)
    (model / "projector" / "config.json").write_text("{}")
    monkeypatch.setattr(config.builders, "build_segmenter", lambda config, path: (None, None, 64))
    (tmp_path / "images").symlink_to(split_root / "images")
    return ["eval", f"paths.work_dir={tmp_path / 'work'}", f"data.root={tmp_path}", "--split", "val",
            "--checkpoint", str(model), "--out", str(tmp_path / "metrics.json")]


def _set(table: pa.Table, name: str, row: int, value) -> pa.Table:
    column = table.column(name).to_pylist()
    column[row] = value
    return table.set_column(table.schema.get_field_index(name), name, pa.array(column, table.schema.field(name).type))


OTHER_TYPE = {"single": "no_target", "multi": "single", "no_target": "single"}
BAD_SPLITS = {
    "null height": (lambda t: _set(t, "height", 1, None), "record {id1}", "field 'height'", "missing (null)"),
    "null question": (lambda t: _set(t, "question", 0, None), "record {id0}", "field 'question'", "missing (null)"),
    "duplicate sample_id": (lambda t: _set(t, "sample_id", 2, t.column("sample_id")[0].as_py()),
                            "record {id0}", "field 'sample_id'", "duplicate sample id"),
    "bogus answer_type": (lambda t: _set(t, "answer_type", 0, "several"), "record {id0}", "field 'answer_type'",
                          "'several' is not one of single, multi, no_target"),
    "answer_type against masks": (lambda t: _set(t, "answer_type", 0, OTHER_TYPE[t.column("answer_type")[0].as_py()]),
                                  "record {id0}", "field 'answer_type'", "makes it"),
    "huge image": (lambda t: _set(_set(t, "height", 0, 10**6), "width", 0, 10**6), "record {id0}", "height/width"),
    "negative size": (lambda t: _set(t, "width", 0, -5), "record {id0}", "height/width"),
    "garbage mask": (lambda t: _set(t, "masks", 0, [{"counts": "0000", "size": [64, 64]}]), "record {id0}",
                     "field 'masks'", "undecodable RLE"),
    "mask claiming 10^12 pixels": (lambda t: _set(t, "masks", 0, [{"counts": "0", "size": [10**6, 10**6]}]),
                                   "record {id0}", "field 'masks'", "exceeds the cap"),
    "empty split": (lambda t: t.slice(0, 0), "val.parquet", "no samples"),
    "missing column": (lambda t: t.drop_columns(["question"]), "field 'question'", "missing column"),
}


@pytest.mark.parametrize("case", BAD_SPLITS)
def test_eval_on_a_bad_split(case, split_root, eval_argv, tmp_path, capsys):
    mutate, *fragments = BAD_SPLITS[case]
    table = pq.read_table(split_root / "val.parquet")
    ids = {f"id{i}": table.column("sample_id")[i].as_py() for i in range(3)}
    pq.write_table(mutate(table), tmp_path / "val.parquet")
    refuse(eval_argv, capsys, str(tmp_path / "val.parquet"), *(f.format(**ids) for f in fragments))
    nothing_written(tmp_path, "metrics.json")


@pytest.mark.parametrize("damage", ["truncated", "bit flip", "page bit flip", "not parquet"])
def test_eval_on_a_damaged_split_file(damage, split_root, eval_argv, tmp_path, capsys):
    raw = bytearray((split_root / "val.parquet").read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "bit flip":
        raw[-7] ^= 0xFF  # the footer's length
    elif damage == "page bit flip":  # in the sample ids' page: without its CRC, read back as another id
        ids = pq.ParquetFile(split_root / "val.parquet").metadata.row_group(0).column(0)
        raw[(ids.dictionary_page_offset or ids.data_page_offset) + 44] ^= 0x01
    else:
        raw = b"PAR1 this is not a parquet file"
    (tmp_path / "val.parquet").write_bytes(bytes(raw))
    refuse(eval_argv, capsys, "val.parquet", "not a readable Parquet file")
    nothing_written(tmp_path, "metrics.json")


def test_eval_checkpoint_that_is_missing_or_not_a_model(tmp_path, capsys):
    work = f"paths.work_dir={tmp_path}"
    refuse(["eval", work, "--checkpoint", str(tmp_path / "nope")], capsys, "nope", "--checkpoint",
           "no such model folder")
    refuse(["eval", work, "--checkpoint", str(tmp_path)], capsys, str(tmp_path), "not a segrl model folder")
    refuse(["eval", work], capsys, "models/tiny", "--checkpoint", "no such model folder")  # before make-tiny
    nothing_written(tmp_path, "eval-val.json")


@pytest.mark.parametrize("damage", ["null image_path", "missing split", "truncated"])
def test_precompute_on_a_bad_split(damage, split_root, tmp_path, capsys, ray_cluster):
    table = pq.read_table(split_root / "val.parquet")
    if damage == "null image_path":
        pq.write_table(_set(table, "image_path", 3, None), tmp_path / "val.parquet")
        fragments = (f"record {table.column('sample_id')[3].as_py()}", "field 'image_path'", "missing")
    elif damage == "truncated":
        (tmp_path / "val.parquet").write_bytes((split_root / "val.parquet").read_bytes()[:100])
        fragments = ("not a readable Parquet file",)
    else:
        fragments = ("file not found",)
    refuse(["precompute", f"paths.work_dir={tmp_path / 'work'}", f"data.root={tmp_path}", "--splits", "val"],
           capsys, str(tmp_path / "val.parquet"), *fragments)
    assert not (tmp_path / "work" / "cache").exists()


@pytest.mark.parametrize("argv", [["eval", "--limit", "-1"], ["eval", "--limit", "0"],
                                  ["precompute", "--batch-size", "0"], ["precompute", "--concurrency", "x"]])
def test_bad_numbers_on_the_command_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {argv[1]}" in err and "Traceback" not in err


def test_plan_on_a_manifest_that_is_not_a_raycluster(capsys):
    refuse(["plan", "--cluster", "cluster/kuberay/networkpolicy.yaml"], capsys, "networkpolicy.yaml",
           "not one YAML document")


def test_ledger_of_a_run_with_a_bad_config(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("train: {staleness: true}\n")
    refuse(["ledger", str(tmp_path)], capsys, str(tmp_path / "config.yaml"), "train.staleness")
    (tmp_path / "config.yaml").write_text("train: {staleness: 1\n")
    refuse(["ledger", str(tmp_path)], capsys, "config.yaml", "not valid YAML")


def test_an_actor_that_can_never_be_placed_fails_at_once_naming_it(ray_cluster):
    import time

    from cluster.placement import PlacementError
    from cluster.topology import reserve

    config = load_config("configs/tiny.yaml", ["cluster.rollout.num_cpus=1000"])
    start = time.monotonic()
    with pytest.raises(PlacementError, match=r"rollout does not fit: a rollout engine needs 1000 CPUs"):
        reserve(config)
    assert time.monotonic() - start < 10  # not the 300 s placement timeout
