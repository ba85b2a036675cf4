"""Ray Train's torch backend with the process group bound to each node's own address.

Ray Train's ``TorchConfig`` makes rank 0 host torch's ``TCPStore`` through ``env://`` (or ``tcp://``), whose
server listens on every interface (``::`` / ``0.0.0.0``), and leaves gloo to bind wherever the hostname
resolves. :class:`BoundTorchConfig` keeps Ray's configuration (backend, timeout, device context) and replaces
only the process-group setup: rank 0 binds a socket to its node's IP (``ray.util.get_node_ip_address()``,
127.0.0.1 for a single machine), hands it to the store, and every rank pins gloo's / NCCL's socket interface to
the interface carrying its own node's IP. Multi-node works as before: each node binds its own address.

Imported by the driver only when training starts (it imports Ray at module level).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError
from ray.train.backend import Backend
from ray.train.torch import TorchConfig

from birefnet.training.runtime import init_distributed, open_rendezvous_listener, pin_collective_interfaces

log = logging.getLogger("birefnet.train")

#: Seconds the workers get to leave the process group when the group shuts down.
SHUTDOWN_TIMEOUT_S = 30.0

# rank 0's listening socket between opening it and handing it to the store (one per worker process)
_listener: socket.socket | None = None


@dataclass
class BoundTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group listens on the node's address only (see the module docstring)."""

    @property
    def backend_cls(self) -> type[Backend]:
        """The backend Ray instantiates on the controller."""
        return _BoundTorchBackend


def _open_listener() -> tuple[str, int]:
    """On rank 0: bind the rendezvous socket to this node's IP; return ``(ip, port)``."""
    global _listener
    host = ray.util.get_node_ip_address()
    if _listener is not None:
        _listener.close()
    _listener = open_rendezvous_listener(host)
    return host, int(_listener.getsockname()[1])


def _join(backend: str, world_rank: int, world_size: int, host: str, port: int, timeout_s: float) -> None:
    """On every rank: set the torch launcher's variables, pin the collectives' interface, join the group."""
    global _listener
    context = ray.train.get_context()
    os.environ.update({"RANK": str(world_rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(context.get_local_rank()),
                       "LOCAL_WORLD_SIZE": str(context.get_local_world_size()),
                       "NODE_RANK": str(context.get_node_rank()), "MASTER_ADDR": host, "MASTER_PORT": str(port)})
    pin_collective_interfaces(ray.util.get_node_ip_address())
    listener, _listener = (_listener, None) if world_rank == 0 else (None, _listener)
    init_distributed(backend, rank=world_rank, world_size=world_size, host=host, port=port, timeout_s=timeout_s,
                     listener=listener)


def _leave() -> None:
    """On every rank: destroy the process group (closing the store and gloo's sockets) and free cached GPU memory."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _BoundTorchBackend(Backend):
    """Sets up and tears down the default process group on the workers (runs on Ray Train's controller)."""

    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group, backend_config: BoundTorchConfig) -> None:  # noqa: ANN001 - Ray's type
        """Open rank 0's listener on its node's IP, then have every rank join the group."""
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        host, port = worker_group.execute_single(0, _open_listener)
        log.info("process group: %s rendezvous on %s:%d for %d workers", backend, host, port, len(worker_group))
        ray.get([worker_group.execute_single_async(rank, _join, backend=backend, world_rank=rank,
                                                   world_size=len(worker_group), host=host, port=port,
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config: BoundTorchConfig) -> None:  # noqa: ANN001
        """Leave the group on every worker, bounded by :data:`SHUTDOWN_TIMEOUT_S`."""
        try:
            ray.get(worker_group.execute_async(_leave), timeout=SHUTDOWN_TIMEOUT_S)
        except GetTimeoutError:
            log.warning("the torch process group did not shut down within %.0f s", SHUTDOWN_TIMEOUT_S)
