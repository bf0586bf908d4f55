"""The `segrl` subcommands' registry and the helpers several command groups share.

A command module registers each subcommand with `@command(name, help, add_args)`;
`pipelines.cli` imports the modules (their order is the help's) and dispatches.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from config import Config, load_config
from data.schema import DataError

DEFAULT_CONFIG = "configs/tiny.yaml"
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, help_text: str, add_args: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register a subcommand: `fn(config, args)`."""

    def wrap(fn: Callable) -> Callable:
        COMMANDS[name] = (help_text, add_args, fn)
        return fn

    return wrap


def force_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date copy exists")


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (``--limit -1`` would silently drop a sample)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return value


def address_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a new local cluster)")


def run_folder_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a GRPO run folder (train.output)")


def check_model_folder(config: Config, checkpoint: str | None) -> None:
    """``--checkpoint`` (default model.name_or_path) names a folder; for the tiny family, a segrl model folder
    (make-tiny's, a run's model/, or a `segrl export` folder, which has a model folder's layout)."""
    folder = Path(checkpoint or config.resolve_path(config.model.name_or_path))
    if checkpoint is None and config.model.family != "tiny" and not folder.exists():
        return  # an upstream model named by its hub id
    if not folder.is_dir():
        raise DataError(folder, None, "--checkpoint", "no such model folder")
    if config.model.family == "tiny" and not (folder / "projector" / "config.json").is_file():
        raise DataError(folder, None, "--checkpoint", "not a segrl model folder (no projector/config.json): give "
                        "make-tiny's folder, a run's model/ or an export")


def run_config(config: Config, args: argparse.Namespace) -> Config:
    """The config of run folder ``args.run`` (its config.yaml plus the overrides) unless --config names one."""
    saved = Path(args.run) / "config.yaml"
    return load_config(str(saved), args.overrides) if args.config is None and saved.is_file() else config
