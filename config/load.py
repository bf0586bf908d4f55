"""Load a YAML config, apply dotted command-line overrides, validate into `Config`.

Every failure is a `ConfigError` naming the file (or the override) and the
dotted key, so a typo never becomes a silently ignored setting. A key given twice
in one mapping is an error too (YAML would keep the last one silently).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from config.schema import Config
from config.section import short_repr


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says where and what."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then own keys: overrides, not repeats
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in first
            except TypeError:  # an unhashable key: SafeLoader says so itself
                continue
            if repeated:
                problem = f"key {short_repr(key)} given twice (first on line {first[key]})"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """YAML text -> Python objects (safe types only; a repeated key is an error). PyYAML recurses
    per nesting level: a value nested a few hundred levels deep is a YAMLError here, not a crash."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: plain data only
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: where (line, column) and what, without the source excerpt."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    return where + problem + (f" ({context})" if context else "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], value parsed as YAML, or the raw string if it is not YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}': expected KEY=VALUE, e.g. model.tiny.lm.hidden_size=256")
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override '{text}': empty component in key '{key}'")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: a plain string such as {runs_dir}/run-1
    if isinstance(value, dict) and value and all(v is None for v in value.values()):
        value = raw  # `{runs_dir}` is a path placeholder, not the YAML mapping {runs_dir: null}
    return parts, value


def apply_override(tree: dict, parts: list[str], value: Any, origin: str) -> None:
    """Set a nested key, creating sections as needed; validation catches unknown keys later."""
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise ConfigError(f"{origin}: '{prefix}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            got = f" (got {short_repr(err['input'])})" if "input" in err and not isinstance(err["input"], dict) else ""
            lines.append(f"{source}: {key}: {err['msg']}{got}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    try:
        tree = parse_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(tree).__name__}")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the run config from a YAML file (or defaults) plus `key=value` overrides."""
    tree = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    try:
        Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
    applied = []
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(tree, parts, value, f"override '{text}'")
        applied.append((text, parts))
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, _blamed(source, applied, exc))) from None


def _blamed(source: str, applied: list[tuple[str, list[str]]], exc: ValidationError) -> str:
    """The file plus the overrides at or under a failing key. All overrides are applied before
    validating, so keys that must change together (e.g. an activation and its k) can."""
    locs = [[str(p) for p in err["loc"]] for err in exc.errors()]
    named = [text for text, parts in applied
             if any(parts[:len(loc)] == loc or loc[:len(parts)] == parts for loc in locs)]
    return source + "".join(f" + override '{text}'" for text in named)


def dump_config(config: Config) -> str:
    """YAML text of a fully resolved config (saved beside every run for reproducibility)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
