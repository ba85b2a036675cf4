"""MLflow artifacts in an S3 bucket: a real ``mlflow server --artifacts-destination s3://...`` on 127.0.0.1 (the
session's moto server as S3), a model registered through :func:`birefnet.registry.register`, then read back by
alias with its files coming from the bucket. Slow lane."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from birefnet import registry
from tests.registry.conftest import make_params, unique_name, workspace
from tests.registry.servers import Server, free_port, start_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_tracking_server(s3_server, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN001, ANN201
    """``mlflow server`` (SQLite backend) proxying artifacts to ``s3://mlflow-artifacts/mlflow`` on moto."""
    root = tmp_path_factory.mktemp("mlflow-s3")
    bucket = s3_server.make_bucket("mlflow-artifacts")
    port = free_port()
    args = [str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{(root / 'mlflow.db').resolve()}",
            "--artifacts-destination", f"{bucket}/mlflow",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # the server (not the client) talks to S3: endpoint and test credentials go to its environment
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **s3_server.client_env()}
    server = start_process(args, f"http://127.0.0.1:{port}", "/health", root / "server.log", env=env, cwd=root)
    try:
        yield server
    finally:
        server.stop()


def test_register_and_load_champion_with_artifacts_in_s3(s3_tracking_server: Server, s3_server, tmp_path: Path,  # noqa: ANN001
                                                         tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    url = s3_tracking_server.url
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    # the client reaches the bucket only through the server's artifact proxy: no S3 endpoint on this side
    for key in ("AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(key, raising=False)

    name = unique_name("birefnet-s3")
    record = registry.register(make_params(name, uri=url), base=workspace(tmp_path / "ws", tiny_model, "v1", 0.7))
    assert record["gate"]["decision"] == "first" and registry.CHAMPION in record["aliases"]

    keys = s3_server.list_keys("mlflow-artifacts", "mlflow/")
    assert any(k.endswith("/MLmodel") for k in keys), keys
    assert any(k.endswith(".safetensors") for k in keys), keys
    assert not (Path(s3_tracking_server.log).parent / "mlartifacts").exists()

    client = mlflow.MlflowClient(url, registry_uri=url)
    version = client.get_model_version_by_alias(name, registry.CHAMPION)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{registry.CHAMPION}",
                                                     dst_path=str(tmp_path / "download")))
    downloaded = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert "MLmodel" in downloaded and any(p.endswith(".safetensors") for p in downloaded)
    # every downloaded file is an object in the bucket, byte for byte (``registered_model_meta`` is written by the
    # download itself)
    fs = s3_server.filesystem()
    prefix = next(k for k in keys if k.endswith("/MLmodel")).removesuffix("MLmodel")
    for rel in (r for r in downloaded if r != "registered_model_meta"):
        assert fs.cat_file(f"mlflow-artifacts/{prefix}{rel}") == (local / rel).read_bytes(), rel

    model = mlflow.pyfunc.load_model(f"models:/{name}@{registry.CHAMPION}")
    mask = model.predict(np.random.default_rng(0).integers(0, 256, (1, 45, 61, 3), dtype=np.uint8))
    assert mask.shape == (1, 45, 61) and mask.dtype == np.uint8
    assert str(version.version) == record["version"]
