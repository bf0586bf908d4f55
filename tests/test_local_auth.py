"""A local cluster (the session's `ray_cluster`, started by cluster.local.connect) exposes nothing
beyond loopback, and even there its GCS refuses a call without the cluster's token."""
from __future__ import annotations

import ipaddress
import os
import stat

import grpc
import psutil
import ray
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

from cluster.local import token_path


def _listening(process: psutil.Process) -> list[tuple[str, str, int]]:
    try:
        conns = process.net_connections(kind="inet")
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []
    return [(process.name(), c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return ""


def _environ(process: psutil.Process) -> dict[str, str]:
    try:
        return process.environ()
    except psutil.Error:  # gone, or another user's
        return {}


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def test_every_ray_process_of_the_local_cluster_listens_on_loopback_only(ray_cluster):
    @ray.remote(num_cpus=0)
    def worker_pid() -> int:
        return os.getpid()

    pid = ray.get(worker_pid.remote())  # first: the call may start a worker the listing below must see
    me = psutil.Process()
    ray_processes = {p.pid: p for p in [me, *me.children(recursive=True)]}  # the driver, GCS, raylet, agents
    raylets = {str(q) for q, p in ray_processes.items() if _name(p) == "raylet"}
    for p in psutil.process_iter():  # workers by their raylet, wherever they hang in the process tree
        if _environ(p).get("RAY_RAYLET_PID") in raylets:
            ray_processes.setdefault(p.pid, p)
    assert pid in ray_processes, (pid, raylets, [(q.pid, _name(q)) for q in psutil.Process(pid).parents()])
    ray_processes = list(ray_processes.values())
    sockets = [s for p in ray_processes for s in _listening(p)]
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names and len(sockets) >= 5, sockets
    exposed = [s for s in sockets if not _loopback(s[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_the_gcs_refuses_a_call_without_the_token(ray_cluster):
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:")
    request = gcs_service_pb2.GetAllNodeInfoRequest()
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetAllNodeInfo(request, timeout=10)
            refused = None
        except grpc.RpcError as exc:
            refused = exc.code()
        bearer = (("authorization", f"Bearer {token_path().read_text()}"),)
        nodes = stub.GetAllNodeInfo(request, timeout=10, metadata=bearer).node_info_list
    assert refused == grpc.StatusCode.UNAUTHENTICATED
    assert [n.node_manager_address for n in nodes] == ["127.0.0.1"]


def test_the_token_is_private_to_this_user(ray_cluster):
    path = token_path()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(path.read_text()) == 64  # 256 bits, hex



def test_a_learner_groups_rendezvous_listens_on_loopback_only(ray_cluster):
    """torch's TCPStore alone would listen on every interface ('::'); rank 0 binds it to the node's address."""
    from actors.learner import free_port

    @ray.remote(num_cpus=0, max_calls=1)  # a process of its own, gone after
    def sockets_of_a_one_rank_group(port: int) -> list[tuple[str, int]]:
        import psutil
        import torch
        import torch.distributed as dist

        from models.process_group import join_process_group

        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR=ray.util.get_node_ip_address(), MASTER_PORT=str(port))
        join_process_group("gloo")
        tensor = torch.ones(2)
        dist.all_reduce(tensor)
        assert tensor.tolist() == [1.0, 1.0]
        conns = psutil.Process().net_connections(kind="inet")
        dist.destroy_process_group()
        return [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]

    sockets = ray.get(sockets_of_a_one_rank_group.remote(port := free_port()), timeout=120)
    assert any(p == port for _, p in sockets), sockets
    assert all(_loopback(ip) for ip, _ in sockets), sockets
