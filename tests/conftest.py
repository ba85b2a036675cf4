"""Shared test setup: the offline/loopback switches from offline.env for this process and its children."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PATH_KEYS = ("PREFECT_HOME", "PYTHONPATH")


def offline_env(repo: Path = REPO) -> dict[str, str]:
    """The KEY=VALUE switches of offline.env, relative paths made absolute against the repository."""
    env: dict[str, str] = {}
    for line in (repo / "offline.env").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        if key in PATH_KEYS and not os.path.isabs(value):
            value = str(repo / value)
        env[key] = value
    return env


for _k, _v in offline_env().items():
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
