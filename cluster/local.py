"""Start or join a Ray cluster: the same call works on a laptop and under `ray job submit`.

A local cluster is reachable from this machine only, and there only with its token:

- Ray binds its gRPC servers (GCS, raylet, every worker) and its agents to loopback only when
  the node's IP is 127.0.0.1. On Linux, ``ray.init`` swaps 127.0.0.1 for the host's outward
  address unless Ray runs in its single-machine mode ($RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
  read when ``ray`` is imported), so that mode is switched on while the node starts and in
  the environment its processes inherit. The dashboard is not started.
- Token authentication stays on, as Ray 2.60 does by default for a new local cluster when
  $RAY_AUTH_MODE is unset (it then sets RAY_AUTH_MODE=token for itself and its processes):
  a random token (256 bits) per process that starts local clusters, in a 0600 file of a
  private temporary folder, reaches Ray's processes through $RAY_AUTH_TOKEN_PATH. A mode
  set in the environment is put aside meanwhile. Leaving the cluster removes the file and
  gives back the environment as it was.

A remote cluster ($RAY_ADDRESS, ``--address``) keeps its own settings.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import ray
from ray._private import ray_constants
from ray._private.authentication import authentication_token_setup

LOOPBACK = "127.0.0.1"
SINGLE_MACHINE = {ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", *SINGLE_MACHINE)
_TOKEN = secrets.token_hex(32)  # one per process: Ray's token loader caches what it read first

_local: dict = {}  # the local cluster this process started: its token folder, the environment it replaced


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address` (or $RAY_ADDRESS, set by `ray job submit`), else start a local cluster."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    _start_local(num_cpus)


def disconnect() -> None:
    """Leave the cluster; a local one started by `connect` is shut down with it."""
    if ray.is_initialized():
        ray.shutdown()
    if _local:
        _restore(_local.pop("environ"), _local.pop("folder"))


def started_here() -> bool:
    """Whether the cluster this process is connected to is a local one it started (no autoscaler)."""
    return bool(_local) and ray.is_initialized()


def token_path() -> Path | None:
    """The token file of the running local cluster (None: no local cluster started here)."""
    return Path(os.environ["RAY_AUTH_TOKEN_PATH"]) if _local else None


def _start_local(num_cpus: int | None) -> None:
    folder = Path(tempfile.mkdtemp(prefix="segrl-ray-"))  # mode 0700
    token = folder / "auth_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(_TOKEN)
    environ = {name: os.environ.get(name) for name in AUTH_VARS}
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):  # Ray's default mode for a new cluster; the file's token
        os.environ.pop(name, None)
    os.environ.update({"RAY_AUTH_TOKEN_PATH": str(token), **SINGLE_MACHINE})
    try:
        with _single_machine_mode():
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK,
                     log_to_driver=True)
    except BaseException:
        _restore(environ, folder)
        raise
    _local.update(environ=environ, folder=folder)


@contextlib.contextmanager
def _single_machine_mode() -> Iterator[None]:
    """Ray's single-machine mode in this process, where the flag was read at import; Ray's note
    that token auth is on (and how to opt out, which a local segrl cluster does not offer) is muted."""
    before, notes = ray_constants.ENABLE_RAY_CLUSTER, logging.getLogger(authentication_token_setup.__name__)
    level, ray_constants.ENABLE_RAY_CLUSTER = notes.level, False
    notes.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
        notes.setLevel(level)


def _restore(environ: dict[str, str | None], folder: Path) -> None:
    for name, value in environ.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    shutil.rmtree(folder, ignore_errors=True)


atexit.register(disconnect)  # before Ray's exit hook (registered earlier): stops the cluster, then removes the token
