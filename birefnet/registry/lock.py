"""The promotion gate's lock: one holder at a time per registered model, given up when the holder dies.

MLflow has no compare-and-set on aliases, so the gate's read-champion / compare / move-alias sequence runs
under this lock. Three backends, picked by :func:`open_gate_lock` from ``register.lock_uri`` (or, when that is
empty, from the tracking URI):

* ``postgresql://...`` (a PostgreSQL tracking store): a session-level advisory lock on a key derived from the
  model name. PostgreSQL itself releases it when the holder's session ends: a crash or kill closes the socket,
  TCP keepalives detect a lost host, and ``idle_session_timeout`` (``lease_s``) ends a session whose holder
  stopped sending heartbeats.
* a file path (SQLite or file tracking stores, the lock file beside the store): an OS file lock
  (``filelock``, ``flock``), released by the kernel when the holder's process ends.
* ``mlflow`` (an http tracking server, where no shared primitive is reachable): a lease on a registered model
  ``<name>.gate-lock``. Creating a registered model is atomic (a unique key in the server's store), so one
  process creates it; its tags carry the owner id and a heartbeat the holder renews every ``lease_s / 4``.
  A waiter breaks the lease only after seeing the same heartbeat unchanged for ``lease_s`` of its own clock
  (no clock comparison between hosts), and only if owner and heartbeat are still those it saw; release
  deletes the lease only when the owner tag is the releaser's.

:func:`gate_lock` opens the backend that :class:`LockSettings` (``register.lock_*``) name and holds it.
Every backend runs a heartbeat thread while held. :meth:`GateLease.ensure_held` checks just before an alias
moves that the lease is still ours (a holder frozen for longer than ``lease_s`` may have lost an MLflow lease).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import logging
import os
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from birefnet.config import Params
from birefnet.registry.errors import NOT_FOUND_CODES, RegistryError, error_code

log = logging.getLogger("birefnet.registry.lock")

MLFLOW_LEASE = "mlflow"
TAG_OWNER = "birefnet.lease.owner"
TAG_HEARTBEAT = "birefnet.lease.heartbeat"
TAG_ACQUIRED = "birefnet.lease.acquired_at"


class GateLockError(RegistryError):
    """The gate lock could not be taken in time, or was lost while held (exit code 3, as every registry error)."""


class GateLock(Protocol):
    """One backend of the gate lock; :func:`hold` drives it."""

    owner: str

    def describe(self) -> str:
        """Where the lock lives, for messages (credentials redacted)."""

    def try_acquire(self) -> bool:
        """Take the lock if it is free (or stale); never waits."""

    def holder(self) -> str:
        """Who holds the lock now, as far as the backend can tell."""

    def renew(self) -> None:
        """Heartbeat: keep the lease alive; raise :class:`GateLockError` when it is no longer ours."""

    def ensure_held(self) -> None:
        """Raise :class:`GateLockError` unless this owner still holds the lock."""

    def release(self) -> None:
        """Give the lock up if (and only if) this owner holds it."""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def lock_key(name: str) -> int:
    """The signed 64-bit advisory-lock key of a registered model's gate."""
    return int.from_bytes(hashlib.sha256(f"birefnet.gate:{name}".encode()).digest()[:8], "big", signed=True)


# ------------------------------------------------------------------------------------------- PostgreSQL


def _libpq_uri(uri: str) -> str:
    """``postgresql+psycopg2://...`` (SQLAlchemy) or ``postgres://...`` as a libpq URI."""
    return re.sub(r"^postgres(?:ql)?(?:\+[A-Za-z0-9_]+)?://", "postgresql://", uri)


class PostgresLock:
    """A session-level advisory lock (``pg_try_advisory_lock``) on :func:`lock_key` of the model name."""

    def __init__(self, uri: str, name: str, owner: str, lease_s: float) -> None:
        self.uri, self.name, self.owner, self.lease_s = _libpq_uri(uri), name, owner, lease_s
        self.key = lock_key(name)
        self._conn: Any = None
        self._mutex = threading.Lock()

    def describe(self) -> str:
        from birefnet.tracking import redact_uri

        return f"PostgreSQL advisory lock {self.key} on {redact_uri(self.uri)}"

    def _connect(self) -> Any:
        import psycopg2

        idle = max(1, int(self.lease_s))
        keepalive = f"-c tcp_keepalives_idle={idle} -c tcp_keepalives_interval={max(1, idle // 3)} " \
                    "-c tcp_keepalives_count=3"
        kwargs = {"connect_timeout": 10, "application_name": f"birefnet-gate {self.owner}"[:63]}
        try:  # idle_session_timeout (PostgreSQL 14+) ends a holder that stopped its heartbeat
            conn = psycopg2.connect(self.uri, options=f"{keepalive} -c idle_session_timeout={idle * 1000}", **kwargs)
        except psycopg2.OperationalError as exc:
            if "idle_session_timeout" not in str(exc):
                raise GateLockError(f"{self.describe()}: cannot connect ({str(exc).strip()})") from None
            conn = psycopg2.connect(self.uri, options=keepalive, **kwargs)
        conn.autocommit = True
        return conn

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        with self._mutex, self._conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchone()[0]

    def try_acquire(self) -> bool:
        import psycopg2

        if self._conn is not None and not self._conn.closed:
            try:
                return bool(self._query("SELECT pg_try_advisory_lock(%s)", (self.key,)))
            except psycopg2.OperationalError:
                pass  # a waiter's session ended (idle, network): it held nothing, so a new one is as good
        self._conn = self._connect()
        return bool(self._query("SELECT pg_try_advisory_lock(%s)", (self.key,)))

    def holder(self) -> str:
        high, low = (self.key >> 32) & 0xFFFFFFFF, self.key & 0xFFFFFFFF
        try:
            row = self._query(
                "SELECT string_agg(a.application_name || ' (backend ' || a.pid || ')', ', ') FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                "AND l.classid::bigint = %s AND l.objid::bigint = %s AND l.objsubid = 1", (high, low))
        except Exception as exc:  # noqa: BLE001 - only for the message
            return f"unknown ({exc})"
        return row or "unknown"

    def renew(self) -> None:
        self.ensure_held()

    def ensure_held(self) -> None:
        import psycopg2

        if self._conn is None:
            raise GateLockError(f"{self.describe()} is not held by {self.owner}")
        high, low = (self.key >> 32) & 0xFFFFFFFF, self.key & 0xFFFFFFFF
        try:
            held = self._query("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                               "AND pid = pg_backend_pid() AND classid::bigint = %s AND objid::bigint = %s "
                               "AND objsubid = 1", (high, low))
        except psycopg2.Error as exc:
            raise GateLockError(f"{self.describe()}: lost the session holding it ({str(exc).strip()})") from None
        if not held:
            raise GateLockError(f"{self.describe()} is no longer held by {self.owner}")

    def release(self) -> None:
        if self._conn is None:
            return
        with contextlib.suppress(Exception):
            self._query("SELECT pg_advisory_unlock(%s)", (self.key,))
        with contextlib.suppress(Exception):
            self._conn.close()  # ending the session releases every lock it held in any case
        self._conn = None


# ------------------------------------------------------------------------------------------- lock file


class FileGateLock:
    """An OS file lock (``flock`` through ``filelock``); the owner id is written beside it for messages."""

    def __init__(self, path: Path, owner: str) -> None:
        from filelock import FileLock

        self.path, self.owner = Path(path), owner
        # the file is kept: unlinking a flock file lets a waiter lock the old inode while a newcomer locks a new one
        self._lock = FileLock(str(self.path), thread_local=False, fallback_to_soft=False, preserve_lock_file=True)
        self._owner_file = self.path.with_name(self.path.name + ".owner")

    def describe(self) -> str:
        return f"lock file {self.path}"

    def try_acquire(self) -> bool:
        from filelock import Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return False
        with contextlib.suppress(OSError):
            self._owner_file.write_text(f"{self.owner} since {time.time():.3f}\n", encoding="utf-8")
        return True

    def holder(self) -> str:
        try:
            return self._owner_file.read_text(encoding="utf-8").strip() or "unknown"
        except OSError:
            return "unknown"

    def renew(self) -> None:
        self.ensure_held()  # the kernel holds the lock while this process lives

    def ensure_held(self) -> None:
        if not self._lock.is_locked:
            raise GateLockError(f"{self.describe()} is not held by {self.owner}")

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()


# ---------------------------------------------------------------------------------------- MLflow lease


class MlflowLease:
    """A lease on the registered model ``<name>.gate-lock`` (owner and heartbeat in its tags)."""

    def __init__(self, client: Any, name: str, owner: str, lease_s: float) -> None:
        self.client, self.owner, self.lease_s = client, owner, lease_s
        self.lock_name = f"{name}.gate-lock"
        self._seen: dict[tuple[str, str], float] = {}

    def describe(self) -> str:
        return f"MLflow lease {self.lock_name}"

    def _read(self) -> tuple[str, str] | None:
        """(owner, heartbeat) of the current lease, or None when there is none."""
        from mlflow.exceptions import MlflowException

        try:
            tags = self.client.get_registered_model(self.lock_name).tags or {}
        except MlflowException as exc:
            if error_code(exc) in NOT_FOUND_CODES:
                return None
            raise
        return tags.get(TAG_OWNER, ""), tags.get(TAG_HEARTBEAT, "")

    def try_acquire(self) -> bool:
        from mlflow.exceptions import MlflowException

        now = f"{time.time():.3f}"
        try:
            self.client.create_registered_model(
                self.lock_name, tags={TAG_OWNER: self.owner, TAG_HEARTBEAT: now, TAG_ACQUIRED: now},
                description="promotion-gate lease (owner and heartbeat in the tags; deleted on release)")
            return True
        except MlflowException as exc:
            code = error_code(exc)
            if code in NOT_FOUND_CODES:
                # MLflow answers a name clash by reading the existing model back; its holder released (deleted)
                # it in between: free again, so the next poll tries again
                return False
            if code != "RESOURCE_ALREADY_EXISTS":
                raise
        current = self._read()
        if current is not None:
            self._break_if_stale(current)
        return False

    def _break_if_stale(self, current: tuple[str, str]) -> None:
        """Delete a lease whose heartbeat this process has seen unchanged for ``lease_s``."""
        first_seen = self._seen.setdefault(current, time.monotonic())
        unchanged_s = time.monotonic() - first_seen
        if unchanged_s <= self.lease_s:
            return
        if self._read() != current:
            return
        log.warning("breaking the stale gate lease %s of %s: its heartbeat %s did not change for %.1f s (lease_s "
                    "%.1f)", self.lock_name, current[0], current[1], unchanged_s, self.lease_s)
        self._delete()

    def _delete(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_registered_model(self.lock_name)
        except MlflowException as exc:
            if error_code(exc) not in NOT_FOUND_CODES:
                raise

    def holder(self) -> str:
        current = self._read()
        return "nobody" if current is None else f"{current[0]} (heartbeat {current[1]})"

    def renew(self) -> None:
        self.ensure_held()
        self.client.set_registered_model_tag(self.lock_name, TAG_HEARTBEAT, f"{time.time():.3f}")

    def ensure_held(self) -> None:
        current = self._read()
        if current is None or current[0] != self.owner:
            holder = "nobody" if current is None else current[0]
            raise GateLockError(f"{self.describe()} is no longer held by {self.owner} (now: {holder}); it was "
                                f"broken as stale (no heartbeat for {self.lease_s} s)")

    def release(self) -> None:
        current = self._read()
        if current is None or current[0] != self.owner:
            log.warning("%s is not held by %s (holder: %s): left alone", self.describe(), self.owner,
                        "nobody" if current is None else current[0])
            return
        self._delete()


# ------------------------------------------------------------------------------------- choose and hold


def derived_lock_uri(tracking_uri: str) -> str:
    """The lock a tracking URI implies: its PostgreSQL database, a lock file beside a SQLite or file store, or
    ``mlflow`` (a lease in the registry) for a server reached over http."""
    scheme = tracking_uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in tracking_uri else ""
    if scheme in ("postgresql", "postgres"):
        return tracking_uri
    if scheme == "sqlite":
        path = tracking_uri[len("sqlite:///"):] if tracking_uri.startswith("sqlite:///") else ""
        return f"{path}.gate.lock" if path and path != ":memory:" else MLFLOW_LEASE
    if scheme == "file":
        return tracking_uri[len("file://"):].rstrip("/") + ".gate.lock"
    if not scheme:
        return tracking_uri.rstrip("/") + ".gate.lock"
    return MLFLOW_LEASE


def open_gate_lock(lock_uri: str, tracking_uri: str, client: Any, name: str, owner: str, lease_s: float,
                   base: str | Path | None = None) -> GateLock:
    """The gate lock of registered model ``name``.

    Args:
        lock_uri: ``postgresql://...``, a lock file (a folder holds one file per model), ``mlflow``, or empty
            to derive it from ``tracking_uri`` with :func:`derived_lock_uri`.
        tracking_uri: the tracking URI in use.
        client: an ``MlflowClient`` on the registry (for the ``mlflow`` lease).
        name: the registered model whose aliases the lock guards.
        owner: this holder's id (unique per process and attempt).
        lease_s: how long a holder may go without a heartbeat before its lease is stale.
        base: the folder a relative lock file path is resolved against (default: the working directory).
    """
    target = lock_uri or derived_lock_uri(tracking_uri)
    scheme = target.split("://", 1)[0].split("+", 1)[0].lower() if "://" in target else ""
    if target == MLFLOW_LEASE:
        return MlflowLease(client, name, owner, lease_s)
    if scheme in ("postgresql", "postgres"):
        return PostgresLock(target, name, owner, lease_s)
    if scheme == "file":
        target = target[len("file://"):]
    elif scheme:
        raise GateLockError(f"register.lock_uri: expected postgresql://..., a lock file path or 'mlflow', "
                            f"got scheme {scheme!r}")
    path = Path(target)
    if not path.is_absolute():
        path = Path(base or Path.cwd()) / path
    if path.is_dir():
        path = path / f"{_safe(name)}.gate.lock"
    return FileGateLock(path, owner)


class GateLease:
    """A held gate lock and its heartbeat thread (what :func:`hold` yields)."""

    def __init__(self, lock: GateLock, interval_s: float) -> None:
        self.lock = lock
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(interval_s,), name="birefnet-gate-heartbeat",
                                        daemon=True)

    def _beat(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.lock.renew()
            except GateLockError as exc:
                self.lost = str(exc)
                log.error("%s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - a transient error: the next beat retries
                log.warning("gate heartbeat of %s failed: %s", self.lock.describe(), exc)

    def ensure_held(self) -> None:
        """Raise :class:`GateLockError` unless the lock is still ours (call it right before moving an alias)."""
        if self.lost:
            raise GateLockError(self.lost)
        self.lock.ensure_held()


@contextlib.contextmanager
def hold(lock: GateLock, timeout_s: float, lease_s: float, poll_s: float = 0.25) -> Iterator[GateLease]:
    """Wait at most ``timeout_s`` for ``lock``, renew it every ``lease_s / 4`` while the block runs, release it.

    Raises:
        GateLockError: the lock stayed held by someone else for ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while not lock.try_acquire():
        if time.monotonic() > deadline:
            raise GateLockError(f"{lock.describe()} is held by {lock.holder()}: another registration or promotion "
                                f"is running (waited {timeout_s:g} s, register.lock_timeout_s); retry later")
        time.sleep(poll_s * (0.5 + random.random()))
    lease = GateLease(lock, max(0.05, lease_s / 4))
    lease._thread.start()
    try:
        yield lease
    finally:
        lease._stop.set()
        lease._thread.join(timeout=30)
        lock.release()


def actor() -> str:
    """Who acts, for lock owners and audit records: ``<user>@<host>:<pid>`` (the MLflow user when one is set)."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if not user:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknown"
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class LockSettings:
    """Where the gate lock lives and how long to wait for it (``register.lock_*``, ``register.lease_s``).

    Attributes:
        tracking_uri: the tracking URI in use (the lock is derived from it when ``lock_uri`` is empty).
        lock_uri: ``postgresql://...``, a lock file, ``mlflow`` or empty (see :func:`open_gate_lock`).
        timeout_s: the longest wait for another holder.
        lease_s: how long a holder may go without a heartbeat before its lease is stale.
        base: the folder a relative lock file is resolved against.
    """

    tracking_uri: str
    lock_uri: str = ""
    timeout_s: float = 120.0
    lease_s: float = 30.0
    base: Path | None = None

    @classmethod
    def from_params(cls, params: Params, tracking_uri: str, base: Path | None = None) -> LockSettings:
        """The settings of ``params.register`` for ``tracking_uri``."""
        rp = params.register
        return cls(tracking_uri, rp.lock_uri, rp.lock_timeout_s, rp.lease_s, base)


@contextlib.contextmanager
def gate_lock(client: Any, name: str, settings: LockSettings) -> Iterator[GateLease]:
    """Hold the gate lock of ``name`` (renewed by a heartbeat thread) for the block; yield the lease.

    Raises:
        GateLockError: another holder kept it for ``settings.timeout_s`` (exit code 3).
    """
    owner = f"{actor()}:{random.getrandbits(32):08x}"
    lock = open_gate_lock(settings.lock_uri, settings.tracking_uri, client, name, owner, settings.lease_s,
                          settings.base)
    with hold(lock, settings.timeout_s, settings.lease_s) as lease:
        log.debug("%s held by %s", lock.describe(), owner)
        yield lease
