"""Joining the learner ranks' process group with rank 0's rendezvous store bound to one address.

Why: torch's TCPStore server listens on every interface (``::``) whatever address the ranks
are told to reach it at, so a learner on a local cluster would expose an unauthenticated
key-value store beyond loopback. Rank 0 binds the listening socket itself to
``MASTER_ADDR`` (the node's address Ray gave it: 127.0.0.1 on a local cluster) and hands
it to the store; the group then forms over that store as DeepSpeed's ``env://`` would.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch.distributed as dist

DEFAULT_TIMEOUT = timedelta(minutes=30)  # torch's default for a process group


def join_process_group(backend: str, timeout: timedelta = DEFAULT_TIMEOUT) -> None:
    """Form the group from RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (set by the learner actor)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    listen_fd = None
    if rank == 0:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        listen_fd = socket.create_server((address, port), family=family, backlog=max(world_size, 128)).detach()
    store = dist.TCPStore(address, port, world_size, rank == 0, timeout=timeout, master_listen_fd=listen_fd)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
