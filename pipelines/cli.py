"""The `segrl` command. Each subcommand takes `--config FILE` and `key=value` overrides.

Errors a user can fix (bad config, bad data file) print one clear line and
exit with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from config import ConfigError, load_config
from data.integrity import IntegrityError
from data.schema import DataError
from models.export_format import ExportError
from pipelines.commands.registry import COMMANDS, DEFAULT_CONFIG
from pipelines.grpo.ledger import LedgerError
from pipelines.grpo.run_folder import RunFolderError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segrl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)  # help is %-formatted
        p.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG}; with --resume, the run's)")
        add_args(p)
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. seed=1")
    return parser


def config_source(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(config file, overrides): a resumed run reads its own config and keeps its folder."""
    resume = getattr(args, "resume", None)
    if not resume:
        return args.config or DEFAULT_CONFIG, args.overrides
    saved = Path(resume) / "config.yaml"
    if args.config is None and not saved.is_file():
        raise FileNotFoundError(f"--resume {resume}: no config.yaml there (is it a `segrl train` output folder?)")
    return args.config or str(saved), [*args.overrides, f"train.output={Path(resume).resolve()}"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(*config_source(args))
        COMMANDS[args.command][2](config, args)
    except (ConfigError, DataError, ExportError, FileNotFoundError, LedgerError, IntegrityError, RunFolderError,
            IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        cause = getattr(exc, "cause", exc)  # raised in a Ray task or actor: its own error, not Ray's traceback
        print(f"segrl {args.command}: error: {cause}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
