"""The repository's ``offline.env``: telemetry off and servers on loopback for every process it starts."""

from __future__ import annotations

import os
from pathlib import Path

#: Keys whose relative values are paths inside the repository.
PATH_KEYS = ("PREFECT_HOME", "PYTHONPATH")


def offline_env(repo: str | Path) -> dict[str, str]:
    """The ``KEY=VALUE`` switches of ``<repo>/offline.env``, relative paths made absolute against ``repo``.

    Returns an empty mapping when the file does not exist.
    """
    repo = Path(repo)
    path = repo / "offline.env"
    env: dict[str, str] = {}
    if not path.is_file():
        return env
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        if key in PATH_KEYS and not os.path.isabs(value):
            value = str(repo / value)
        env[key] = value
    return env
