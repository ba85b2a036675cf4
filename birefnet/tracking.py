"""MLflow tracking helpers shared by the stages: where to log, one run per stage execution, flat params.

Embedded default: a local SQLite database and a local artifact folder, no server. Production: set
``MLFLOW_TRACKING_URI`` (e.g. ``https://mlflow.example.com``) and credentials in the environment
(``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``); it overrides ``tracking.uri``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
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


#: The most params one MLflow ``log_batch`` request may carry.
MAX_PARAMS_PER_BATCH = 100


def log_params(client: Any, run_id: str, params: Mapping[str, str]) -> None:
    """Log flat params (see :func:`flatten`) to run ``run_id``, ``MAX_PARAMS_PER_BATCH`` per request."""
    from mlflow.entities import Param

    items = list(params.items())
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + MAX_PARAMS_PER_BATCH]])


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
        # A tracking server stores artifacts where it was told (--artifacts-destination); a local folder only
        # makes sense without one, or when the location is itself a URI (s3://...).
        remote = uri.startswith(("http://", "https://", "databricks"))
        location = None if remote and "://" not in tracking.artifact_location else \
            resolve_artifact_location(tracking, base)
        try:
            exp_id = client.create_experiment(tracking.experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException as exc:
            # several first runs against a fresh store race to create it: the losers use the winner's
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(tracking.experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    return uri, exp_id


class TrackingUnavailableError(RuntimeError):
    """The tracking server cannot be reached; the message names the (redacted) URI and what was tried."""


def redact_uri(uri: str) -> str:
    """``uri`` with its credentials masked, safe to print and to write into outputs.

    ``http://user:secret@host:5000`` becomes ``http://user:***@host:5000`` (the user name tells which account was
    used); a lone user part, which may be a token (``https://TOKEN@host``), becomes ``***@``.
    """
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, has_password, _ = userinfo.partition(":")
    masked = f"{user}:***" if has_password and user else "***"
    return urlunsplit((parts.scheme, f"{masked}@{hostport}", parts.path, parts.query, parts.fragment))


def strip_credentials(uri: str) -> str:
    """``uri`` without any ``user:password@`` part (for requests that must not carry it, e.g. a health probe)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, parts.query, parts.fragment))


def check_tracking_server(uri: str, attempts: int = 3, timeout_s: float = 5.0, backoff_s: float = 1.0) -> None:
    """Fail fast, with a clear message, when an ``http(s)://`` tracking server does not answer.

    Any HTTP answer (even 401 or 404) counts as reachable: only connection errors and timeouts are retried,
    ``attempts`` times with ``backoff_s * 2**k`` seconds between them. Other URI schemes (SQLite, a folder)
    need no server and return at once.

    Raises:
        TrackingUnavailableError: no answer after every attempt; the message names the URI.
    """
    import time
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    url = strip_credentials(uri).rstrip("/") + "/health"
    start = time.monotonic()
    reason = ""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=timeout_s):  # noqa: S310 - the configured tracking server
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as exc:
            reason = str(getattr(exc, "reason", exc))
        if attempt + 1 < attempts:
            time.sleep(backoff_s * 2**attempt)
    raise TrackingUnavailableError(
        f"MLflow tracking server {redact_uri(uri)} is unreachable ({reason}) after {attempts} attempts in "
        f"{time.monotonic() - start:.1f} s: start it, or point MLFLOW_TRACKING_URI (or tracking.uri) at a running "
        "server")


@contextlib.contextmanager
def bounded_http_retries(max_retries: int = 3, backoff_factor: int = 1, timeout_s: int = 60) -> Iterator[None]:
    """Bound MLflow's own HTTP retries for the duration of a stage (its defaults can wait minutes).

    Values already set in the environment (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``..._BACKOFF_FACTOR``,
    ``..._TIMEOUT``) win; the previous environment is restored on exit.
    """
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries),
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(backoff_factor),
              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    added = [k for k in wanted if k not in os.environ]
    for key in added:
        os.environ[key] = wanted[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class RegistryRequestError(RuntimeError):
    """The model registry answered a ``models:/`` request with an error other than "not found" (e.g. refused
    credentials); the message names the URI, the (redacted) registry and MLflow's error code."""


#: Seconds per attempt, and attempts, of the server probe before a ``models:/`` download (about 9 s at most in
#: all, against minutes of MLflow's own retries).
REGISTRY_PROBE_TIMEOUT_S = 2.0
REGISTRY_PROBE_ATTEMPTS = 3
#: MLflow error codes that mean the model, alias or version does not exist.
_NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


def download_registered_model(uri: str, tracking_uri: str | None = None) -> Path:
    """Download a registered model ``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``) and return the
    ``.safetensors`` file inside.

    Without ``tracking_uri`` the tracking and registry URIs are MLflow's own (the environment's, as every MLflow
    client). With it, ``NAME@ALIAS`` and ``NAME/VERSION`` are resolved against that server for both tracking and
    registry: MLflow's own ``models:/`` download reads the process-wide registry URI (``./mlflow.db`` in a fresh Ray
    worker) even when given another one. An ``http(s)`` server is probed first, so an unreachable one fails in
    seconds, and MLflow's own HTTP retries are bounded for the download.

    Raises:
        FileNotFoundError: the registry has no such model, alias or version, or the registered model holds no
            ``.safetensors``; the message starts with ``uri``.
        TrackingUnavailableError: the tracking (or registry) server does not answer; the message names its URI
            with the credentials masked.
        RegistryRequestError: the registry answered with another error.
    """
    import re

    import mlflow
    from mlflow.exceptions import MlflowException

    if tracking_uri is None:
        servers = [mlflow.get_registry_uri() or mlflow.get_tracking_uri(), mlflow.get_tracking_uri()]
    else:
        servers = [tracking_uri]
    servers = list(dict.fromkeys(servers))
    with bounded_http_retries(max_retries=2, backoff_factor=1, timeout_s=60):
        for server in servers:
            check_tracking_server(server, attempts=REGISTRY_PROBE_ATTEMPTS, timeout_s=REGISTRY_PROBE_TIMEOUT_S)
        try:
            artifact_uri = uri
            match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))/?", uri)
            if match and tracking_uri:
                name, alias, version = match.groups()
                client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
                if alias:
                    version = client.get_model_version_by_alias(name, alias).version
                artifact_uri = client.get_model_version_download_uri(name, version)
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, tracking_uri=tracking_uri))
        except MlflowException as exc:
            message = _mask_secrets(str(exc), servers)[:500]
            where = f"the registry at {redact_uri(servers[0])}"
            if exc.error_code in _NOT_FOUND_CODES:
                raise FileNotFoundError(f"{uri}: not found in {where}: {message}") from None
            raise RegistryRequestError(f"{uri}: {where} failed ({exc.error_code}): {message}") from None
    found = [local] if local.is_file() and local.suffix == ".safetensors" else sorted(local.rglob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"{uri}: no .safetensors file in the registered model's artifacts ({local})")
    return found[0]


def _mask_secrets(text: str, uris: list[str]) -> str:
    """``text`` with every URI of ``uris`` redacted, and their passwords masked wherever else they appear."""
    from urllib.parse import urlsplit

    for uri in uris:
        text = text.replace(uri, redact_uri(uri))
        password = urlsplit(uri).password
        if password:
            text = text.replace(password, "***")
    return text
