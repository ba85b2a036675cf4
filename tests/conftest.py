"""Shared test setup: the offline/loopback switches from offline.env for this process and its children."""

from __future__ import annotations

from pathlib import Path

import pytest

from birefnet.offline import apply_offline_env

REPO = Path(__file__).resolve().parents[1]

apply_offline_env(REPO)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def venv_bin() -> Path:
    """Folder of the console scripts (birefnet, dvc) of the running interpreter's environment."""
    import sys

    return Path(sys.executable).parent


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - Iterator[S3Server]
    """A moto S3 server on 127.0.0.1 for the session (tests/helpers/s3.py), stopped by PID at the end.

    While it runs, this process (and every child: DVC, DataLoader and Ray workers) has the test credentials
    (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` = ``test``, ``AWS_DEFAULT_REGION``) and
    ``AWS_ENDPOINT_URL_S3`` pointing at it, so boto3, s3fs and DVC reach it with no endpoint option.
    """
    from tests.helpers.s3 import FOREIGN_VARS, start_s3_server

    server = start_s3_server(log=tmp_path_factory.mktemp("s3") / "moto.log")
    with pytest.MonkeyPatch.context() as patch:
        for name in FOREIGN_VARS:
            patch.delenv(name, raising=False)
        for name, value in server.client_env().items():
            patch.setenv(name, value)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server, request: pytest.FixtureRequest) -> str:  # noqa: ANN001
    """A fresh bucket on the session's moto server for this test; returns its name."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    return s3_server.make_bucket(f"{name}-{uuid.uuid4().hex[:8]}").removeprefix("s3://")
