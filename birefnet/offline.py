"""The repository's ``offline.env``: telemetry off and servers on loopback for every process it starts.

The Makefile, ``.ci/run`` and the test suite read it, and so do the entry points themselves (the ``birefnet``
command that ``dvc repro`` / ``dvc exp run`` stages call, and ``python -m pipelines.<flow>``): a user who runs
``dvc repro`` in a fresh shell, without ``make``, gets the same switches. Values already in the environment win,
except ``PYTHONPATH``, which gains the repository's hook folder after its own entries.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path

#: Keys whose relative values are paths inside the repository.
PATH_KEYS = ("PREFECT_HOME", "PYTHONPATH")
#: Name of the file at the repository root.
FILENAME = "offline.env"


def offline_env(repo: str | Path) -> dict[str, str]:
    """The ``KEY=VALUE`` switches of ``<repo>/offline.env``, relative paths made absolute against ``repo``.

    Returns an empty mapping when the file does not exist.
    """
    repo = Path(repo)
    path = repo / FILENAME
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


def find_repo(start: str | Path | None = None) -> Path | None:
    """The repository whose ``offline.env`` applies: the nearest folder at or above ``start`` (default: the
    working directory) holding both ``offline.env`` and ``dvc.yaml``, else the checkout this package was
    imported from (an editable install), else ``None`` (an installed wheel: its image sets the switches)."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / FILENAME).is_file() and (folder / "dvc.yaml").is_file():
            return folder
    checkout = Path(__file__).resolve().parents[1]
    return checkout if (checkout / FILENAME).is_file() else None


def merge_offline_env(env: MutableMapping[str, str], switches: Mapping[str, str]) -> list[str]:
    """Fill ``env`` with ``switches`` where it has no value; ``PYTHONPATH`` gains the switch's folders after its own.

    Returns:
        The keys that changed.
    """
    changed = []
    for key, value in switches.items():
        if key == "PYTHONPATH":
            paths = [p for p in env.get(key, "").split(os.pathsep) if p]
            if value not in paths:
                env[key] = os.pathsep.join([*paths, value])
                changed.append(key)
        elif key not in env:
            env[key] = value
            changed.append(key)
    return changed


def apply_offline_env(repo: str | Path | None = None) -> list[str]:
    """Apply the repository's ``offline.env`` to this process (and so to every process it starts).

    Called first by the entry points, before Ray, MLflow, Prefect or DVC are imported (Prefect reads
    ``PREFECT_HOME`` at import). Returns the keys that were set here.
    """
    root = Path(repo) if repo is not None else find_repo()
    if root is None:
        return []
    return merge_offline_env(os.environ, offline_env(root))
