"""Shared test setup: the offline/loopback switches from offline.env for this process and its children."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from birefnet.offline import offline_env

REPO = Path(__file__).resolve().parents[1]


for _k, _v in offline_env(REPO).items():
    if _k == "PYTHONPATH" and os.environ.get(_k):
        if _v not in os.environ[_k].split(os.pathsep):
            os.environ[_k] = _v + os.pathsep + os.environ[_k]
    else:
        os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def venv_bin() -> Path:
    """Folder of the console scripts (birefnet, dvc) of the running interpreter's environment."""
    import sys

    return Path(sys.executable).parent
