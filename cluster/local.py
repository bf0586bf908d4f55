"""Start or join a Ray cluster: the same call works on a laptop and under `ray job submit`."""
from __future__ import annotations

import os

import ray


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address` (or $RAY_ADDRESS, set by `ray job submit`), else start a local cluster.

    A local cluster binds to 127.0.0.1 only, so token auth is off unless the
    user chose a mode ($RAY_AUTH_MODE); a remote cluster keeps its own setting.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
    )


def disconnect() -> None:
    """Leave the cluster; a local one started by `connect` is shut down with it."""
    if ray.is_initialized():
        ray.shutdown()
