"""Fixtures for the registry tests: a tiny model, eval.json writers, params, and real MLflow servers.

The ``tracking_server`` fixture is parametrized over backends: SQLite always, PostgreSQL as well when
``BIREFNET_TEST_POSTGRES_URI`` is set (``.ci/run`` starts a loopback cluster and sets it); each session gets a
fresh database there, dropped at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.registry.servers import Server, start_mlflow_server

TEST_SETS = ("DIS-TE1", "DIS-TE2")
#: The promotion gate's validation set (``register.selection_sets`` default).
SELECTION_SET = "DIS-VD"
POSTGRES_ENV = "BIREFNET_TEST_POSTGRES_URI"
BACKENDS = ["sqlite", *(["postgresql"] if os.environ.get(POSTGRES_ENV) else [])]


@pytest.fixture(scope="module")
def mlflow_client(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """An MlflowClient on an embedded SQLite registry (no server), one per test module."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    return mlflow.MlflowClient(uri, registry_uri=uri)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``test_convnext`` BiRefNet saved with ``save_model`` (random init: no training needed)."""
    import torch

    from birefnet.config import ModelParams
    from birefnet.models import build_model, save_model

    torch.manual_seed(0)
    params = ModelParams(encoder="test_convnext", attention="none", multiscale_input="none")
    return save_model(build_model(params), params, tmp_path_factory.mktemp("model") / "model.safetensors")


def write_model(tiny_model: Path, dst: Path, variant: str) -> Path:
    """The tiny model's weights under a new content hash (``variant`` goes into the file's metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tiny_model), framework="pt") as fh:
        metadata = dict(fh.metadata() or {})
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(tiny_model)), str(dst), metadata={**metadata, "test.variant": variant})
    return dst


def write_eval(path: Path, sm: float, mae: float = 0.05, sets: tuple[str, ...] = TEST_SETS,
               model: Path | None = None, selection_sm: float | None = None) -> Path:
    """An ``eval.json`` in the evaluate stage's schema with the same scores on every set.

    ``model`` is the file it "scored": its sha256 goes into ``meta.model_sha256`` (the register stage checks it).
    The gate's selection set (``SELECTION_SET``) scores ``selection_sm`` (default: ``sm``) for Sm and its F and E
    measures.
    """
    def scores(value: float) -> dict[str, float]:
        return {"n": 4, "Sm": value, "maxF": value, "meanF": value, "adpF": value, "wF": value, "maxE": value,
                "meanE": value, "adpE": value, "MAE": mae, "HCE": 10.0}

    metrics = scores(sm)
    meta = {"model_sha256": hashlib.sha256(model.read_bytes()).hexdigest()} if model is not None else {}
    doc = {"sets": {s: dict(metrics) for s in sets}, "mean": {**metrics, "sets": list(sets)},
           "selection": {SELECTION_SET: scores(sm if selection_sm is None else selection_sm)}, "meta": meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def make_params(name: str, min_delta: float = 0.001, metric: str = "Sm", uri: str = "sqlite:///mlflow.db",  # noqa: ANN201
                **register: object):
    """Pipeline params for a registry test workspace (relative paths resolve against it); ``register`` overrides
    other ``register.*`` fields (``lock_uri``, ``lease_s``, ...)."""
    from birefnet.config import DataParams, Params, RegisterParams, TrackingParams

    return Params(data=DataParams(test_sets=list(TEST_SETS), size=(64, 64)),
                  tracking=TrackingParams(uri=uri, experiment="birefnet-registry-tests"),
                  register=RegisterParams(model_name=name, min_delta=min_delta, primary_metric=metric,
                                          **{"lock_timeout_s": 60, **register}))


def write_params_yaml(path: Path, params) -> Path:  # noqa: ANN001
    """``params`` as a params.yaml (for the CLI in subprocesses)."""
    from birefnet.config import params_to_dict

    path.write_text(yaml.safe_dump(params_to_dict(params), sort_keys=False), encoding="utf-8")
    return path


def workspace(root: Path, tiny_model: Path, variant: str, sm: float, mae: float = 0.05) -> Path:
    """A folder with ``models/model.safetensors`` (content ``variant``) and ``metrics/eval.json``."""
    root.mkdir(parents=True, exist_ok=True)
    model = write_model(tiny_model, root / "models" / "model.safetensors", variant)
    write_eval(root / "metrics" / "eval.json", sm, mae, model=model)
    return root


def unique_name(prefix: str = "birefnet-test") -> str:
    """A registered-model name no other test (or earlier run on a shared database) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _postgres_database(base_uri: str) -> tuple[str, str | None]:
    """A fresh database on the server of ``base_uri``; returns (its URI, its name to drop, or None)."""
    import psycopg2
    from psycopg2 import sql
    from sqlalchemy.engine import make_url

    url = make_url(base_uri)
    name = f"birefnet_test_{uuid.uuid4().hex[:10]}"
    try:
        conn = psycopg2.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                                dbname=url.database or "postgres", connect_timeout=10)
    except psycopg2.Error as exc:
        pytest.fail(f"{POSTGRES_ENV}={url.render_as_string(hide_password=True)}: cannot connect ({exc})")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg2.Error:
        name = None  # no CREATEDB right: share the given database (names are unique per test)
    finally:
        conn.close()
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the suite installs psycopg2-binary
    url = url.set(drivername="postgresql+psycopg2", database=name or url.database)
    return url.render_as_string(hide_password=False), name


def _drop_postgres_database(base_uri: str, name: str) -> None:
    import psycopg2
    from psycopg2 import sql
    from sqlalchemy.engine import make_url

    url = make_url(base_uri)
    conn = psycopg2.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                            dbname=url.database or "postgres", connect_timeout=10)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    finally:
        conn.close()


@pytest.fixture(scope="session", params=BACKENDS)
def tracking_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite, or PostgreSQL from ``BIREFNET_TEST_POSTGRES_URI``)."""
    root = tmp_path_factory.mktemp(f"mlflow-{request.param}")
    dropped = None
    if request.param == "sqlite":
        backend = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    else:
        backend, dropped = _postgres_database(os.environ[POSTGRES_ENV])
    server = start_mlflow_server(backend, root)
    try:
        yield server
    finally:
        server.stop()
        if dropped:
            _drop_postgres_database(os.environ[POSTGRES_ENV], dropped)


@pytest.fixture
def server_env(tracking_server: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    """Point this test's MLflow client (and subprocesses) at ``tracking_server``."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.url)
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    return tracking_server
