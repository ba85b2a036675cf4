"""MLflow tracking helpers shared by the stages: where to log, one run per stage execution, flat params.

Embedded default: a local SQLite database and a local artifact folder, no server. Production: set
``MLFLOW_TRACKING_URI`` (e.g. ``https://mlflow.example.com``) and credentials in the environment
(``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``); it overrides ``tracking.uri``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from birefnet.config import TrackingParams


def resolve_tracking_uri(tracking: TrackingParams, base: str | Path | None = None) -> str:
    """The tracking URI to use: ``MLFLOW_TRACKING_URI`` if set, else ``tracking.uri`` with a relative SQLite
    path made absolute against ``base`` (default: the working directory), so Ray workers agree."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(base or Path.cwd()) / uri[len(prefix):]
        uri = prefix + str(path.resolve())
    return uri


def resolve_artifact_location(tracking: TrackingParams, base: str | Path | None = None) -> str:
    """``tracking.artifact_location`` as a URI (a relative folder becomes an absolute ``file://`` URI)."""
    loc = tracking.artifact_location
    if "://" in loc:
        return loc
    return (Path(base or Path.cwd()) / loc).resolve().as_uri()


def flatten(prefix: str, value: Any, out: dict[str, str] | None = None) -> dict[str, str]:
    """Flatten nested params to ``a.b.c -> str(value)`` (MLflow params are flat strings of <= 6000 chars)."""
    out = {} if out is None else out
    if isinstance(value, Mapping):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        for i, v in enumerate(value):
            flatten(f"{prefix}.{i}", v, out)
    else:
        out[prefix] = str(value)[:6000]
    return out


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The current git commit of ``cwd`` (with ``-dirty`` when the tree has changes), or None outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def ensure_experiment(tracking: TrackingParams, base: str | Path | None = None) -> tuple[str, str]:
    """Set the tracking URI and create the experiment if needed; return (tracking URI, experiment id)."""
    import mlflow

    uri = resolve_tracking_uri(tracking, base)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(tracking.experiment)
    if exp is None:
        exp_id = client.create_experiment(tracking.experiment,
                                          artifact_location=resolve_artifact_location(tracking, base))
    else:
        exp_id = exp.experiment_id
    return uri, exp_id
