"""Process setup for training and inference entry points: seeds, threads, precision, RNG state capture, DDP.

The DDP helpers create torch.distributed's rendezvous and collectives on one given address (the node's own),
never on every interface: torch's ``TCPStore`` server otherwise listens on ``::`` / ``0.0.0.0``, and gloo
binds to whatever the machine's hostname resolves to.
"""

from __future__ import annotations

import os
import random
import socket
from datetime import timedelta
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def setup_runtime(seed: int, threads: int | None = None, deterministic: bool = True) -> None:
    """Call once per process from an entry point (never at import).

    Args:
        seed: base seed (add the rank for per-rank streams).
        threads: torch intra-op threads; None keeps torch's default.
        deterministic: prefer deterministic kernels where torch offers them (warn, don't fail).
    """
    seed_everything(seed)
    if threads:
        torch.set_num_threads(threads)
    torch.set_float32_matmul_precision("high")
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def rng_state() -> dict[str, Any]:
    """RNG states of Python, NumPy and torch, as JSON-friendly data (torch states as byte lists)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


#: Environment variables that pick the network interface of gloo's and NCCL's socket transports.
COLLECTIVE_INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def interface_for_address(address: str) -> str | None:
    """The name of the network interface that carries ``address`` (``lo`` for 127.0.0.1), or None."""
    import psutil

    wanted = address.split("%", 1)[0]
    for name, addresses in psutil.net_if_addrs().items():
        if any(entry.address.split("%", 1)[0] == wanted for entry in addresses):
            return name
    return None


def pin_collective_interfaces(address: str) -> dict[str, str]:
    """Point gloo's and NCCL's socket transports at the interface carrying ``address``.

    Variables the user already set are kept. Without this, gloo listens on the address the hostname resolves to,
    which may be another interface than the node's (or 127.0.1.1 on Debian-style hosts, which breaks multi-node).

    Returns:
        The variables this call set.

    Raises:
        ValueError: no interface of this machine carries ``address``.
    """
    interface = interface_for_address(address)
    if interface is None:
        raise ValueError(f"no network interface of this machine carries the node address {address}; set "
                         f"{' and '.join(COLLECTIVE_INTERFACE_VARIABLES)} to the interface to use")
    changed = {}
    for variable in COLLECTIVE_INTERFACE_VARIABLES:
        if not os.environ.get(variable):
            os.environ[variable] = changed[variable] = interface
    return changed


def open_rendezvous_listener(host: str) -> socket.socket:
    """A TCP socket bound to ``host`` on a free port and listening: the socket the ``TCPStore`` server serves on.

    Handing torch an already-bound socket is the only way to choose the server's address: given just a port,
    its server binds every interface.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.bind((host, 0))
        listener.listen(socket.SOMAXCONN)
    except OSError:
        listener.close()
        raise
    return listener


def init_distributed(backend: str, *, rank: int, world_size: int, host: str, port: int, timeout_s: float,
                     listener: socket.socket | None = None) -> None:
    """Join the default process group through a ``TCPStore`` served by rank 0 on ``host:port``.

    Args:
        backend: torch.distributed backend (``gloo``, ``nccl``).
        rank: this process's rank.
        world_size: number of processes in the group.
        host: address of rank 0's node; rank 0's server listens there only.
        port: the store's port.
        timeout_s: timeout of the rendezvous and of collective operations.
        listener: rank 0 only: the bound, listening socket from :func:`open_rendezvous_listener` (the store takes
            ownership of it and closes it with the group).
    """
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        if listener is None:
            raise ValueError("rank 0 serves the rendezvous: pass the listening socket from open_rendezvous_listener")
        store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout,
                              master_listen_fd=listener.detach())
    else:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
