"""Retry policy, working-directory handling and the workspace lock shared by the flows.

Retries are for transient faults only: an I/O hiccup, a tracking server or a Ray cluster that does not
answer, a timeout, DVC's repository lock held by another process. Bad params (:class:`ParamsError`), bad
input data (:class:`StageInputError`) and validation errors fail at once: retrying them would only repeat the
same error after a delay.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect.tasks import exponential_backoff

from birefnet.config import ParamsError
from birefnet.stages.common import StageInputError

# Exceptions that will not fix themselves: never retried, whatever wraps them.
PERMANENT: tuple[type[BaseException], ...] = (ParamsError, StageInputError, ValueError, TypeError, KeyError,
                                              FileNotFoundError, IsADirectoryError, NotADirectoryError,
                                              PermissionError)
# Exceptions from libraries we do not import here (tracking client, HTTP clients, Ray), matched by class name.
TRANSIENT_NAMES = frozenset({
    "ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "TransportError", "RemoteProtocolError",
    "GetTimeoutError", "RaySystemError", "NodeDiedError", "ActorUnavailableError", "WorkerCrashedError",
})
# An MlflowException carries no type for "server down": its message names the failed HTTP request.
TRANSIENT_MESSAGES = ("API request to", "Max retries exceeded", "Connection refused", "Connection reset",
                      "Temporary failure in name resolution", "timed out")

RETRIES = 3
# 10 s, 20 s, 40 s (each +-20 % jitter): long enough for a restarting server, short enough for a nightly run.
RETRY_DELAYS = exponential_backoff(backoff_factor=10)
RETRY_JITTER = 0.2


class CommandError(RuntimeError):
    """A subprocess (``dvc``) failed. ``transient`` says whether running it again may succeed.

    Args:
        message: what failed, with the tail of the command's output (the stage's own error message).
        transient: True for a busy lock, a network error or a timeout; False for bad params or input.
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a fault worth retrying.

    The outermost exception decides first: a :class:`StageInputError` raised ``from`` an ``OSError`` is bad
    input, not a hiccup. Otherwise any exception in the cause chain that is a connection error, a timeout, a
    generic ``OSError`` or a known client/cluster error makes it transient.
    """
    if isinstance(exc, CommandError):
        return exc.transient
    if isinstance(exc, PERMANENT):
        return False
    for link in _chain(exc):
        if isinstance(link, CommandError):
            return link.transient
        if isinstance(link, PERMANENT):
            return False
        if isinstance(link, OSError):  # ConnectionError and TimeoutError included
            return True
        names = {cls.__name__ for cls in type(link).__mro__}
        if names & TRANSIENT_NAMES:
            return True
        if "MlflowException" in names and any(m in str(link) for m in TRANSIENT_MESSAGES):
            return True
    return False


def retry_on_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task only when its exception is transient."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        with contextlib.suppress(Exception):
            result = state.result(raise_on_failure=False)
            exc = result if isinstance(result, BaseException) else None
    return exc is not None and is_transient(exc)


RETRY_POLICY: dict[str, Any] = {
    "retries": RETRIES,
    "retry_delay_seconds": RETRY_DELAYS,
    "retry_jitter_factor": RETRY_JITTER,
    "retry_condition_fn": retry_on_transient,
}


@contextlib.contextmanager
def working_directory(path: str | Path | None) -> Iterator[Path]:
    """Run the block in ``path`` (the repository root the stage paths are relative to); None keeps the cwd."""
    old = Path.cwd()
    target = Path(path).resolve() if path else old
    os.chdir(target)
    try:
        yield target
    finally:
        os.chdir(old)


class LockTimeout(TimeoutError):
    """The workspace lock was not free within the allowed wait."""


@contextlib.contextmanager
def workspace_lock(path: str | Path, timeout_s: float, poll_s: float = 2.0, owner: dict[str, Any] | None = None,
                   on_wait: Any = None) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` for the block (``filelock``: ``flock`` on POSIX); wait (do not fail)
    while another holder has it.

    The kernel releases the lock when the holder's process dies, so a killed run never leaves a stale lock. The
    holder describes itself in ``<path>.owner`` (pid and ``owner``), which waiters report.

    Args:
        path: the lock file (created with its folder).
        timeout_s: give up waiting after this many seconds (raises :class:`LockTimeout`).
        poll_s: seconds between attempts.
        owner: written into the owner file for whoever waits (flow run id).
        on_wait: called once with the current holder's description when the first attempt finds it busy.
    """
    import filelock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner_file = path.with_name(path.name + ".owner")
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        if on_wait is not None:
            try:
                holder = owner_file.read_text(encoding="utf-8", errors="replace").strip()
            except OSError:
                holder = ""
            on_wait(holder or "unknown")
        try:
            lock.acquire(timeout=timeout_s, poll_interval=poll_s)
        except filelock.Timeout:
            raise LockTimeout(f"{path} still held after {timeout_s:.0f} s") from None
    try:
        owner_file.write_text(json.dumps({"pid": os.getpid(), **(owner or {})}), encoding="utf-8")
        yield path
    finally:
        owner_file.unlink(missing_ok=True)
        lock.release()
