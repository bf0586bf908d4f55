"""A multi-node Ray cluster on this machine whose autoscaler really launches nodes: Ray's fake
multi-node provider, started so that it can live beside other Ray clusters.

Ray's own ``ray.cluster_utils.AutoscalingCluster`` runs ``ray stop --force`` when it starts
and stops, which kills every Ray process on the machine (other runs' clusters, a test suite's),
and the Ray 2.60 wheel lacks the ``fake_multi_node/example.yaml`` it loads. Here the provider
config is written whole, the head is started by ``ray start`` in a session of its own
(``setsid``), so the head's processes and every node its autoscaler launches (they are the
monitor's children) share one process group, and ``shutdown`` ends that group and nothing
else. Every port that has a fixed default is picked free; everything listens on loopback;
token authentication is on, with a token file in the cluster's private temporary folder
(``environment()`` gives a driver what it needs to connect; set it before importing Ray).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def provider_config(head_cpus: int, node_types: dict[str, dict], gcs_address: str,
                    idle_timeout_minutes: float) -> dict:
    """An autoscaling config for the fake multi-node provider: the head (no workers of its own kind)
    and ``node_types`` ({name: {"resources": {...}, "max_workers": n}}), started on demand only."""
    types = {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}}
    for name, spec in node_types.items():
        types[name] = {"resources": dict(spec["resources"]), "node_config": {}, "min_workers": 0,
                       "max_workers": int(spec["max_workers"])}
    return {"cluster_name": "segrl-fake", "max_workers": sum(t["max_workers"] for t in types.values()),
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": gcs_address},
            "available_node_types": types, "head_node_type": "ray.head.default", "auth": {},
            "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes, "docker": {},
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": []}


class FakeCannotStart(RuntimeError):
    """The platform cannot start the fake cluster (no setsid, ``ray start`` failed): not segrl's fault."""


class FakeAutoscalingCluster:
    """``with FakeAutoscalingCluster(2, {"gpu-node": {"resources": {"CPU": 1, "GPU": 1}, "max_workers": 2}})
    as cluster:`` then, in a process whose environment has ``cluster.environment()``, ``ray.init(cluster.address)``."""

    def __init__(self, head_cpus: int, node_types: dict[str, dict], idle_timeout_minutes: float = 0.1):
        self.head_cpus, self.node_types, self.idle_timeout_minutes = head_cpus, node_types, idle_timeout_minutes
        self.folder: Path | None = None
        self.session: int | None = None
        self.address = f"{LOOPBACK}:{free_port()}"

    def environment(self) -> dict[str, str]:
        """What a driver (and the cluster's processes) need: token auth with this cluster's token, loopback only."""
        if self.folder is None:
            raise RuntimeError("start the fake cluster first")
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.folder / "token"),
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

    def start(self, timeout_s: float = 120.0) -> FakeAutoscalingCluster:
        if shutil.which("setsid") is None:
            raise FakeCannotStart("no setsid on this machine: the fake cluster cannot get a process group of its own")
        self.folder = Path(tempfile.mkdtemp(prefix="segrl-fake-", dir="/tmp"))  # short: Ray's socket paths
        token = self.folder / "token"
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        config = self.folder / "autoscaling.json"
        config.write_text(json.dumps(provider_config(self.head_cpus, self.node_types, self.address,
                                                     self.idle_timeout_minutes)))
        ray = str(Path(sys.executable).with_name("ray"))
        command = ["setsid", ray, "start", "--head", f"--port={self.address.rsplit(':', 1)[1]}",
                   f"--node-ip-address={LOOPBACK}", f"--num-cpus={self.head_cpus}", f"--temp-dir={self.folder}",
                   f"--autoscaling-config={config}", f"--ray-client-server-port={free_port()}",
                   f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                   "--include-dashboard=false", "--disable-usage-stats"]
        env = {**os.environ, **self.environment(), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
        self.session = self._session_of_gcs()
        if started.returncode != 0 or self.session is None:
            self.shutdown()
            raise FakeCannotStart(f"ray start failed (exit {started.returncode}): {started.stderr.strip()[-500:]}")
        return self

    def _session_of_gcs(self) -> int | None:
        """The session id of the cluster's GCS server (found by its log folder, under this cluster's own)."""
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if "gcs_server" in cmdline and str(self.folder) in cmdline:
                    return os.getsid(int(proc.name))
            except (OSError, ValueError):
                continue
        return None

    def shutdown(self, grace_s: float = 5.0) -> None:
        """End the cluster's process group (head and launched nodes) and remove its folder."""
        if self.session is not None and self.session != os.getsid(0):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.session, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + grace_s
                while time.monotonic() < deadline and _group_alive(self.session):
                    time.sleep(0.1)
            self.session = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> FakeAutoscalingCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False
