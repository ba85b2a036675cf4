"""Tracking helpers: credentials never printed, an unreachable server fails fast and is named."""

from __future__ import annotations

import socket
import time

import pytest

from birefnet.tracking import TrackingUnavailableError, check_tracking_server, redact_uri, strip_credentials


@pytest.mark.parametrize(
    ("uri", "redacted", "stripped"),
    [
        ("http://user:pw@127.0.0.1:5000/p?q=1", "http://user:***@127.0.0.1:5000/p?q=1", "http://127.0.0.1:5000/p?q=1"),
        ("https://TOKEN@mlflow.example.com", "https://***@mlflow.example.com", "https://mlflow.example.com"),
        ("http://u:p@ss@h:1", "http://u:***@h:1", "http://h:1"),
        ("postgresql://mlflow:pg-pw@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow",
         "postgresql://db:5432/mlflow"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:///abs/mlflow.db", "sqlite:///abs/mlflow.db", "sqlite:///abs/mlflow.db"),
    ],
)
def test_redact_and_strip_credentials(uri: str, redacted: str, stripped: str) -> None:
    assert redact_uri(uri) == redacted
    assert strip_credentials(uri) == stripped


def test_check_tracking_server_names_the_redacted_uri_quickly() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://user:secret@127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(TrackingUnavailableError) as info:
        check_tracking_server(uri, attempts=2, timeout_s=1.0, backoff_s=0.1)
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert f"http://user:***@127.0.0.1:{port}" in msg and "secret" not in msg and "2 attempts" in msg
    check_tracking_server("sqlite:///nowhere.db")  # no server needed: returns at once


def test_ensure_experiment_survives_losing_the_creation_race(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another first run created the experiment between our look-up and our create: we use theirs."""
    import mlflow

    from birefnet.config import TrackingParams
    from birefnet.tracking import ensure_experiment

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # another test may have pointed it elsewhere
    tracking = TrackingParams(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=str(tmp_path / "art"),
                              experiment="raced")
    winner = mlflow.MlflowClient(tracking.uri).create_experiment("raced")
    real = mlflow.MlflowClient.get_experiment_by_name
    calls = []

    def stale_first_lookup(self, name):  # noqa: ANN001, ANN202 - the look-up that ran before the winner's create
        calls.append(name)
        return None if len(calls) == 1 else real(self, name)

    monkeypatch.setattr(mlflow.MlflowClient, "get_experiment_by_name", stale_first_lookup)
    uri, experiment_id = ensure_experiment(tracking)
    assert experiment_id == winner and len(calls) == 2


def test_log_params_batches_at_most_100_per_request() -> None:
    from birefnet.tracking import MAX_PARAMS_PER_BATCH, log_params

    class Client:
        def __init__(self) -> None:
            self.batches: list[list[tuple[str, str]]] = []

        def log_batch(self, run_id: str, params: list) -> None:  # noqa: ANN001
            assert run_id == "run"
            self.batches.append([(p.key, p.value) for p in params])

    client = Client()
    flat = {f"k{i}": str(i) for i in range(2 * MAX_PARAMS_PER_BATCH + 1)}
    log_params(client, "run", flat)
    assert [len(b) for b in client.batches] == [MAX_PARAMS_PER_BATCH, MAX_PARAMS_PER_BATCH, 1]
    assert dict(p for b in client.batches for p in b) == flat
