"""`segrl serve`'s driver: join or start Ray, deploy the application, follow a run, stop cleanly."""
from __future__ import annotations

import threading
from pathlib import Path

from config import Config
from pipelines.serve.app import absolute_paths, deploy, serve_config, undeploy
from pipelines.serve.follow import Follower


def serve_config_text(serve_cfg: dict) -> str:
    """The Serve config as YAML, in the order ``serve_config`` builds it."""
    import yaml

    return yaml.safe_dump(serve_cfg, sort_keys=False)


def write_serve_config(serve_cfg: dict, path: str) -> None:
    Path(path).write_text(serve_config_text(serve_cfg))


def model_folder(config: Config, checkpoint: str | None) -> str:
    """``checkpoint`` (default model.name_or_path) as an absolute path: replicas run elsewhere."""
    return str(Path(checkpoint or config.resolve_path(config.model.name_or_path)).resolve())


def checkpoint_serve_config(config: Config, checkpoint: str | None, version: int = 1) -> dict:
    """What `segrl serve --checkpoint` deploys (weights version 1), also `segrl serve-config`'s output: the
    replicas load a folder when its version is new to them, so another folder needs another version."""
    config = absolute_paths(config)
    return serve_config(config, model_folder(config, checkpoint), version)


def say(line: str) -> None:
    print(f"[segrl serve] {line}", flush=True)


def follow_loop(config: Config, follower: Follower, stop: threading.Event) -> None:
    """Every ``serve.follow_interval_s`` until ``stop``: a new complete model of the run is deployed
    (the replicas reconfigure in place; requests meanwhile are answered by the old weights)."""
    while not stop.wait(config.serve.follow_interval_s):
        if found := follower.poll():
            deploy(serve_config(config, *found))
            say(f"now serving {found[0]} (weights version {found[1]})")


def start(config: Config, checkpoint: str | None, follow: str | None, config_out: str | None = None
          ) -> Follower | None:
    """Deploy ``checkpoint`` (default model.name_or_path) as weights version 1, or the newest model of run
    ``follow`` (none yet: requests get 503 until one appears); the follower to keep polling, if any."""
    follower = Follower(follow, say) if follow else None
    found = follower.poll() if follower else (model_folder(config, checkpoint), 1)
    serve_cfg = serve_config(config, *(found or (None, 0)))
    if config_out:
        write_serve_config(serve_cfg, config_out)
    deploy(serve_cfg)
    s = config.serve
    what = f"{found[0]} (weights version {found[1]})" if found else f"nothing yet (following {follow})"
    say(f"http://{s.host}:{s.port}/ serving {what}")
    return follower


def serve_forever(config: Config, checkpoint: str | None, follow: str | None, address: str | None,
                  config_out: str | None = None) -> None:
    """``start``, then follow the run until interrupted; then delete the application (a cluster this
    command started stops with it) and the follower's snapshots."""
    from cluster.local import connect, disconnect

    config = absolute_paths(config)
    connect(address)
    follower = None
    try:
        follower = start(config, checkpoint, follow, config_out)
        stop = threading.Event()
        if follower is not None:
            follow_loop(config, follower, stop)
        else:
            stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        undeploy()
        disconnect()
        if follower is not None:
            follower.close()
