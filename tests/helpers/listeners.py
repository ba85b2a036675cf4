"""Listening sockets of a process tree, sampled in the background while something runs (network exposure tests).

Every process under the given roots is walked by PID on each sample (Ray's GCS, raylet, dashboard agent, train
workers and whatever they start come and go), and each listening TCP socket is recorded with its owner.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from types import TracebackType

import psutil

WILDCARDS = frozenset({"0.0.0.0", "::", "::ffff:0.0.0.0"})


@dataclass(frozen=True)
class Listener:
    """One listening socket and the process that owns it."""

    pid: int
    process: str
    ip: str
    port: int

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.process}) listens on {self.ip}:{self.port}"


def is_loopback(ip: str) -> bool:
    """Whether ``ip`` is a loopback address (127.0.0.0/8, ::1, IPv4-mapped 127.x)."""
    return ip == "::1" or ip.startswith("127.") or ip.startswith("::ffff:127.")


def is_wildcard(ip: str) -> bool:
    """Whether ``ip`` is an any-address bind (every interface)."""
    return ip in WILDCARDS


def _describe(proc: psutil.Process) -> str:
    """The process title Ray sets (``ray::...``), or the executable's file name (``gcs_server``, ``raylet``).

    An absolute argv[0] is cut to its file name: the checkout's path varies (a CI clone lives deeper than a
    work tree), and a prefix cut of the full path lost the very names the tests look for.
    """
    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    first = cmdline[0] if cmdline else proc.name()
    if first.startswith("/") and " " not in first:
        first = os.path.basename(first)
    return first[:120]


def process_tree(roots: list[int]) -> dict[int, str]:
    """PID -> short description (the process title Ray sets, or argv[0]) for the roots and all descendants."""
    tree: dict[int, str] = {}
    for pid in roots:
        try:
            root = psutil.Process(pid)
            members = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in members:
            tree.setdefault(proc.pid, _describe(proc))
    return tree


def listening_sockets(roots: list[int]) -> set[Listener]:
    """Listening TCP sockets (IPv4 and IPv6) owned by the roots or any of their descendants, right now."""
    tree = process_tree(roots)
    return {Listener(conn.pid, tree[conn.pid], conn.laddr.ip, conn.laddr.port)
            for conn in psutil.net_connections(kind="tcp")
            if conn.pid in tree and conn.status == psutil.CONN_LISTEN}


class ListenerSampler:
    """Context manager: samples :func:`listening_sockets` every ``interval`` seconds on a thread until exit.

    Attributes:
        seen: every listener observed in any sample (one entry per pid, address and port: Ray retitles its
            processes, the first title seen is kept).
        samples: number of samples taken.
    """

    def __init__(self, roots: list[int] | None = None, interval: float = 0.5) -> None:
        self.roots = roots or [os.getpid()]
        self.interval = interval
        self._seen: dict[tuple[int, str, int], Listener] = {}
        self._titles: set[str] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="listener-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            for item in listening_sockets(self.roots):
                self._seen.setdefault((item.pid, item.ip, item.port), item)
                self._titles.add(item.process)
            self.samples += 1
            if self._stop.wait(self.interval):
                return

    @property
    def seen(self) -> list[Listener]:
        """Every listener observed so far."""
        return list(self._seen.values())

    def __enter__(self) -> ListenerSampler:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def not_loopback(self) -> list[str]:
        """Listeners bound anywhere but loopback (wildcards included), sorted, as readable lines."""
        return sorted(str(item) for item in self.seen if not is_loopback(item.ip))

    def wildcard(self) -> list[str]:
        """Listeners bound to every interface, sorted, as readable lines."""
        return sorted(str(item) for item in self.seen if is_wildcard(item.ip))

    def owners(self) -> set[str]:
        """Every description (process title) under which a listening process was seen."""
        return set(self._titles)

