"""Small MLflow helpers of ``birefnet.tracking``: URIs, flat params, the git commit, bounded HTTP retries."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from birefnet.config import TrackingParams
from birefnet.tracking import (
    bounded_http_retries,
    check_tracking_server,
    flatten,
    git_commit,
    resolve_artifact_location,
    resolve_tracking_uri,
)

RETRY_VARIABLES = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT")


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for variable in RETRY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def test_relative_sqlite_uri_is_made_absolute_against_base(tmp_path: Path) -> None:
    uri = resolve_tracking_uri(TrackingParams(uri="sqlite:///runs/mlflow.db"), base=tmp_path)
    assert uri == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    absolute = f"sqlite:///{tmp_path}/other.db"
    assert resolve_tracking_uri(TrackingParams(uri=absolute), base="/elsewhere") == absolute
    assert resolve_tracking_uri(TrackingParams(uri="http://mlflow:5000"), base=tmp_path) == "http://mlflow:5000"


def test_relative_sqlite_uri_defaults_to_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               ) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(TrackingParams(uri="sqlite:///mlflow.db")) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_environment_tracking_uri_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://tracking.example.com")
    assert resolve_tracking_uri(TrackingParams(uri="sqlite:///mlflow.db"), base=tmp_path) == \
        "https://tracking.example.com"


def test_artifact_location_folder_becomes_a_file_uri(tmp_path: Path) -> None:
    location = resolve_artifact_location(TrackingParams(artifact_location="mlartifacts"), base=tmp_path)
    assert location == (tmp_path / "mlartifacts").resolve().as_uri() and location.startswith("file:///")
    assert resolve_artifact_location(TrackingParams(artifact_location="s3://bucket/mlflow"), base=tmp_path) == \
        "s3://bucket/mlflow"


def test_flatten_nested_params() -> None:
    params = {"train": {"lr": 1e-4, "betas": [0.9, 0.999], "stages": [{"name": "main", "epochs": 2},
                                                                      {"name": "ft", "loss": {"bce": 0}}]},
              "data": {"size": [64, 64], "root": None}, "empty": []}
    assert flatten("", params) == {
        "train.lr": "0.0001", "train.betas": "[0.9, 0.999]",
        "train.stages.0.name": "main", "train.stages.0.epochs": "2",
        "train.stages.1.name": "ft", "train.stages.1.loss.bce": "0",
        "data.size": "[64, 64]", "data.root": "None", "empty": "[]",
    }
    assert flatten("p", {"x": 1}) == {"p.x": "1"}
    assert len(flatten("", {"long": "x" * 7000})["long"]) == 6000  # MLflow's limit for a param value


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_git_commit_clean_dirty_and_outside_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # never find a repository above tmp_path
    outside = tmp_path / "plain"
    outside.mkdir()
    assert git_commit(outside) is None
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.txt").write_text("one\n", encoding="utf-8")
    _git(repo, "add", "a.txt")
    _git(repo, "commit", "-q", "-m", "first")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert git_commit(repo) == sha and len(sha) == 40
    (repo / "untracked.txt").write_text("not part of the commit\n", encoding="utf-8")
    assert git_commit(repo) == sha  # untracked files do not make the tree dirty
    (repo / "a.txt").write_text("two\n", encoding="utf-8")
    assert git_commit(repo) == f"{sha}-dirty"


def test_non_http_tracking_uris_need_no_server() -> None:
    start = time.monotonic()
    for uri in ("sqlite:////tmp/none.db", "file:///tmp/mlruns", "databricks"):
        check_tracking_server(uri, attempts=3, timeout_s=5.0, backoff_s=5.0)  # returns at once, no probe
    assert time.monotonic() - start < 1.0


def test_bounded_http_retries_sets_defaults_keeps_user_values_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with bounded_http_retries(max_retries=2, backoff_factor=1, timeout_s=60):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
        assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"  # the user's value wins
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"
    with pytest.raises(RuntimeError), bounded_http_retries():
        raise RuntimeError("boom")
    assert not any(v in os.environ for v in RETRY_VARIABLES[:2])  # restored on an error too
