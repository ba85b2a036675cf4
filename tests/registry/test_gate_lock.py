"""The gate lock's backends (MLflow lease, lock file, PostgreSQL advisory lock): a holder that heartbeats keeps
its lock past ``lease_s``, release by a non-owner does nothing, a silent holder's lease is broken. Quick lane
(PostgreSQL only when ``BIREFNET_TEST_POSTGRES_URI`` is set)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from birefnet.registry.lock import (
    MLFLOW_LEASE,
    TAG_OWNER,
    FileGateLock,
    GateLock,
    GateLockError,
    MlflowLease,
    PostgresLock,
    derived_lock_uri,
    hold,
    open_gate_lock,
)
from tests.registry.conftest import POSTGRES_ENV, unique_name

KINDS = ["mlflow", "file", "postgresql"]


@pytest.fixture
def make_lock(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str, str, float], GateLock]:
    """``make(name, owner, lease_s)`` for the backend named by the test's ``kind`` parameter."""
    kind = request.node.callspec.params["kind"]
    if kind == "postgresql" and not os.environ.get(POSTGRES_ENV):
        pytest.skip(f"{POSTGRES_ENV} not set (CI's PostgreSQL lane sets it)")
    client = request.getfixturevalue("mlflow_client") if kind == "mlflow" else None

    def make(name: str, owner: str, lease_s: float) -> GateLock:
        if kind == "mlflow":
            return MlflowLease(client, name, owner, lease_s)
        if kind == "file":
            return FileGateLock(tmp_path / f"{name}.gate.lock", owner)
        return PostgresLock(os.environ[POSTGRES_ENV], name, owner, lease_s)

    return make


def _run_threads(target: Callable[[int], None], count: int, timeout_s: float) -> None:
    """Run ``target(0) .. target(count - 1)`` in threads at once and wait for them all."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)


@pytest.mark.parametrize("kind", KINDS)
def test_heartbeat_keeps_a_short_lease(kind: str, make_lock: Callable[[str, str, float], GateLock]) -> None:
    """Three holders, a 1 s lease, each working 3 s: the old lock (broken after its timeout, never renewed) let
    them overlap; a renewed lease is held by one at a time, and every holder gets it in turn."""
    name = unique_name()
    intervals: list[tuple[float, float]] = []
    errors: list[BaseException] = []

    def holder(i: int) -> None:
        try:
            with hold(make_lock(name, f"holder-{i}", 1.0), timeout_s=60, lease_s=1.0, poll_s=0.1) as lease:
                start = time.monotonic()
                time.sleep(3.0)
                lease.ensure_held()
                intervals.append((start, time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    _run_threads(holder, 3, timeout_s=90)
    assert not errors, errors
    assert len(intervals) == 3
    ordered = sorted(intervals)
    overlaps = [(a, b) for a, b in zip(ordered, ordered[1:], strict=False) if b[0] < a[1]]
    assert not overlaps, f"holders overlapped: {overlaps}"


@pytest.mark.parametrize("kind", KINDS)
def test_release_by_non_owner_does_nothing(kind: str, make_lock: Callable[[str, str, float], GateLock]) -> None:
    name = unique_name()
    owner = make_lock(name, "owner", 30.0)
    assert owner.try_acquire()
    try:
        intruder = make_lock(name, "intruder", 30.0)
        intruder.release()
        owner.ensure_held()
        assert not intruder.try_acquire()
        with pytest.raises(GateLockError):
            intruder.ensure_held()
        intruder.release()
        owner.ensure_held()
    finally:
        owner.release()
    again = make_lock(name, "next", 30.0)
    assert again.try_acquire()
    again.release()


def test_silent_holder_loses_its_lease(mlflow_client) -> None:  # noqa: ANN001
    """A holder that stops renewing (a crashed process) is broken after ``lease_s`` unchanged, not before; the
    old holder then finds out before it could move an alias, and its release leaves the new lease alone."""
    name = unique_name()
    crashed = MlflowLease(mlflow_client, name, "crashed", 1.0)
    assert crashed.try_acquire()  # no heartbeat thread: it never renews
    start = time.monotonic()
    with hold(MlflowLease(mlflow_client, name, "waiter", 1.0), timeout_s=30, lease_s=1.0, poll_s=0.1) as lease:
        waited = time.monotonic() - start
        lease.ensure_held()
        with pytest.raises(GateLockError, match="no longer held by crashed"):
            crashed.ensure_held()
        crashed.release()
        lease.ensure_held()
        assert mlflow_client.get_registered_model(f"{name}.gate-lock").tags[TAG_OWNER] == "waiter"
    assert 1.0 < waited < 10.0


def test_postgres_ends_a_silent_holder() -> None:
    """PostgreSQL ends the session of a holder that sent no heartbeat for ``lease_s`` (idle_session_timeout),
    which releases its advisory lock: a frozen holder cannot keep the gate forever."""
    if not os.environ.get(POSTGRES_ENV):
        pytest.skip(f"{POSTGRES_ENV} not set (CI's PostgreSQL lane sets it)")
    name = unique_name()
    silent = PostgresLock(os.environ[POSTGRES_ENV], name, "silent", 1.0)
    assert silent.try_acquire()
    waiter = PostgresLock(os.environ[POSTGRES_ENV], name, "waiter", 1.0)
    try:
        assert not waiter.try_acquire()
        assert "silent" in waiter.holder()
        time.sleep(2.5)
        assert waiter.try_acquire()
        with pytest.raises(GateLockError):
            silent.ensure_held()
    finally:
        waiter.release()
        silent.release()


def test_wait_is_bounded_and_names_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "gate.lock"
    first = FileGateLock(path, "first-holder")
    assert first.try_acquire()
    try:
        start = time.monotonic()
        with pytest.raises(GateLockError, match="first-holder"), hold(FileGateLock(path, "second"), 0.5, 30.0):
            pass
        assert time.monotonic() - start < 5
    finally:
        first.release()


@pytest.mark.parametrize(("tracking", "expected"), [
    ("postgresql://u:p@db:5432/mlflow", "postgresql://u:p@db:5432/mlflow"),
    ("postgresql+psycopg2://u@db/mlflow", "postgresql+psycopg2://u@db/mlflow"),
    ("sqlite:////abs/mlflow.db", "/abs/mlflow.db.gate.lock"),
    ("file:///abs/mlruns", "/abs/mlruns.gate.lock"),
    ("/abs/mlruns", "/abs/mlruns.gate.lock"),
    ("http://127.0.0.1:5000", MLFLOW_LEASE),
    ("https://mlflow.example.com", MLFLOW_LEASE),
])
def test_lock_derived_from_the_tracking_uri(tracking: str, expected: str) -> None:
    assert derived_lock_uri(tracking) == expected


def test_lock_uri_overrides_the_tracking_uri(tmp_path: Path) -> None:
    lock = open_gate_lock("locks", "http://127.0.0.1:5000", None, "my model", "me", 30.0, base=tmp_path)
    assert isinstance(lock, FileGateLock) and lock.path == tmp_path / "locks"
    (tmp_path / "dir").mkdir()
    lock = open_gate_lock(str(tmp_path / "dir"), "http://x", None, "my model", "me", 30.0)
    assert isinstance(lock, FileGateLock) and lock.path == tmp_path / "dir" / "my_model.gate.lock"
    lock = open_gate_lock("postgresql://u:secret@db/x", "http://x", None, "m", "me", 30.0)
    assert isinstance(lock, PostgresLock) and "secret" not in lock.describe()
    assert isinstance(open_gate_lock("", "http://x", object(), "m", "me", 30.0), MlflowLease)
    with pytest.raises(GateLockError, match="'s3'"):
        open_gate_lock("s3://bucket/lock", "http://x", None, "m", "me", 30.0)


@pytest.mark.parametrize("kind", KINDS)
def test_acquire_racing_a_release_waits_instead_of_failing(kind: str,
                                                          make_lock: Callable[[str, str, float], GateLock]) -> None:
    """Holders that take and release the lock back to back: an acquire that meets a release in flight is "not
    yet", never an error. (MLflow's create_registered_model, on a name clash, reads the existing model back and
    answers RESOURCE_DOES_NOT_EXIST when its holder deleted it in between; seen in CI's PostgreSQL lane.)"""
    name = unique_name()
    errors: list[BaseException] = []
    inside: list[int] = []
    overlap: list[int] = []

    def holder(i: int) -> None:
        try:
            for _ in range(15):
                with hold(make_lock(name, f"holder-{i}", 30.0), timeout_s=60, lease_s=30.0, poll_s=0.002):
                    inside.append(i)
                    if len(inside) > 1:
                        overlap.append(i)
                    inside.remove(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    _run_threads(holder, 4, timeout_s=120)
    assert not errors, errors
    assert not overlap
