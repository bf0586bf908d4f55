"""Load a YAML config, apply dotted command-line overrides, validate into `Config`.

Every failure is a `ConfigError` naming the file (or the override) and the
dotted key, so a typo never becomes a silently ignored setting.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from config.schema import Config


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says where and what."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], value parsed as YAML, or the raw string if it is not YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}': expected KEY=VALUE, e.g. model.tiny.lm.hidden_size=256")
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override '{text}': empty component in key '{key}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: a plain string such as {runs_dir}/run-1
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
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            lines.append(f"{source}: {key}: {err['msg']}{got}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
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
