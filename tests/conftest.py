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
