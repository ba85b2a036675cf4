"""The DDP helpers of ``birefnet.training.runtime``: the rendezvous store and gloo listen on the given address only."""

from __future__ import annotations

import os
from datetime import timedelta

import psutil
import pytest
import torch
import torch.distributed as dist

from birefnet.training.runtime import (
    COLLECTIVE_INTERFACE_VARIABLES,
    init_distributed,
    interface_for_address,
    open_rendezvous_listener,
    pin_collective_interfaces,
)
from tests.helpers.listeners import is_loopback, is_wildcard


def _own_listeners() -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def test_torch_store_alone_listens_on_every_interface() -> None:
    """Why the helpers exist: given a host and port only, torch's store server binds the wildcard address."""
    before = _own_listeners()
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=10))
    try:
        opened = _own_listeners() - before
        assert opened and all(is_wildcard(ip) for ip, _ in opened), opened
    finally:
        del store


def test_process_group_listens_on_the_node_address_only(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in COLLECTIVE_INTERFACE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    assert not dist.is_initialized()
    before = _own_listeners()
    pin_collective_interfaces("127.0.0.1")
    listener = open_rendezvous_listener("127.0.0.1")
    port = listener.getsockname()[1]
    init_distributed("gloo", rank=0, world_size=1, host="127.0.0.1", port=port, timeout_s=30, listener=listener)
    try:
        opened = _own_listeners() - before
        assert ("127.0.0.1", port) in opened, opened
        assert all(is_loopback(ip) for ip, _ in opened), opened
        total = torch.ones(3)
        dist.all_reduce(total)
        assert total.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.destroy_process_group()


def test_rank0_needs_its_listener() -> None:
    with pytest.raises(ValueError, match="listening socket"):
        init_distributed("gloo", rank=0, world_size=1, host="127.0.0.1", port=1, timeout_s=5)


def test_collective_interfaces_follow_the_node_address(monkeypatch: pytest.MonkeyPatch) -> None:
    loopback = interface_for_address("127.0.0.1")
    assert loopback  # "lo" on Linux
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")  # the user's choice is kept
    changed = pin_collective_interfaces("127.0.0.1")
    assert changed == {"GLOO_SOCKET_IFNAME": loopback}
    assert os.environ["GLOO_SOCKET_IFNAME"] == loopback and os.environ["NCCL_SOCKET_IFNAME"] == "ib0"


def test_unknown_node_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in COLLECTIVE_INTERFACE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ValueError, match="192.0.2.77"):  # TEST-NET-1: on no interface here
        pin_collective_interfaces("192.0.2.77")
    assert not any(os.environ.get(v) for v in COLLECTIVE_INTERFACE_VARIABLES)
