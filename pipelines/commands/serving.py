"""Commands that serve a trained model with Ray Serve, or write the Serve config a cluster deploys."""
from __future__ import annotations

import argparse
from pathlib import Path

from config import Config, load_config
from data.schema import DataError
from pipelines.commands.registry import address_flag, check_model_folder, command, positive_int


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (1..65535)")
    return value


def _serve_args(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", help="model folder to serve (default: model.name_or_path)")
    which.add_argument("--follow", metavar="RUN", help="serve the newest complete model of GRPO run folder RUN, "
                       "swapping in each new one without a restart")
    p.add_argument("--host", help="HTTP bind address (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=_port, help="HTTP port (default: serve.port, 8000)")
    p.add_argument("--write-config", metavar="FILE", help="also write the Serve config (serve deploy, RayService)")
    address_flag(p)


def listening_as_asked(config: Config, args: argparse.Namespace) -> Config:
    """The config with --host/--port, where given, in its serve section."""
    config = config.model_copy(deep=True)
    for key in ("host", "port"):
        if getattr(args, key) is not None:
            setattr(config.serve, key, getattr(args, key))
    return config


@command("serve", "serve a trained model over HTTP with Ray Serve: POST /v1/segment, GET /healthz, a web page at /",
         _serve_args)
def cmd_serve(config: Config, args: argparse.Namespace) -> None:
    from pipelines.serve.run import serve_forever

    if args.follow is None:
        check_model_folder(config, args.checkpoint)
    elif not Path(args.follow).is_dir():
        raise DataError(Path(args.follow), None, "--follow", "no such run folder")
    elif args.config is None and (Path(args.follow) / "config.yaml").is_file():
        config = load_config(str(Path(args.follow) / "config.yaml"), args.overrides)  # the run's head, SAE, paths
    serve_forever(listening_as_asked(config, args), args.checkpoint, args.follow, args.address, args.write_config)


def _serve_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="model folder the replicas load, as they see it (default: "
                   "model.name_or_path); not looked at here: it may exist only in the cluster's pods")
    p.add_argument("--host", help="HTTP bind address (default: serve.host, 127.0.0.1; 0.0.0.0 in a pod)")
    p.add_argument("--port", type=_port, help="HTTP port (default: serve.port, 8000)")
    p.add_argument("--weights-version", type=positive_int, default=1, help="the version answers name (default 1); "
                   "raise it with each new folder: running replicas load a folder only under a new version")
    p.add_argument("--output", "-o", metavar="FILE", help="write the YAML here (default: standard output)")


@command("serve-config", "write the Serve config `segrl serve --checkpoint` deploys (for `serve deploy` or a KubeRay "
         "RayService's serveConfigV2) without starting anything", _serve_config_args)
def cmd_serve_config(config: Config, args: argparse.Namespace) -> str:
    from pipelines.serve.run import checkpoint_serve_config, serve_config_text

    text = serve_config_text(checkpoint_serve_config(listening_as_asked(config, args), args.checkpoint,
                                                     args.weights_version))
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text, end="")
    return text
