"""The promotion gate under concurrency and crashes, against a real ``mlflow server`` (SQLite; PostgreSQL too when
``BIREFNET_TEST_POSTGRES_URI`` is set). Slow lane: each registration is a ``birefnet register`` process.

* N processes register distinct, better models at once, with a 1 s lease and a pause inside the lock longer than
  the lease: exactly one champion (the best), and the audit tags form one unbroken chain of champion moves.
* A process killed right after creating its version, or right after moving the champion, leaves a gate that a
  rerun finishes: decision, aliases, history and audit are all there afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from birefnet.registry import AUDIT_PREFIX, CHALLENGER, CHAMPION, GATE_PREFIX, TAG_GATE_STATE, TAG_HISTORY
from tests.registry.conftest import make_params, unique_name, workspace, write_params_yaml
from tests.registry.servers import Server

pytestmark = pytest.mark.slow

N_PROCESSES = 4


def _client(url: str):  # noqa: ANN202
    import mlflow

    return mlflow.MlflowClient(url, registry_uri=url)


def _register(ws: Path, venv_bin: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([str(venv_bin / "birefnet"), "register", "--params", "params.yaml"], cwd=ws,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout_s: float = 300) -> tuple[int, str]:
    out = proc.communicate(timeout=timeout_s)[0]
    return proc.returncode, out


def _audit_records(client: Any, name: str) -> list[dict[str, Any]]:
    """Every distinct audit record of ``name`` (a move is tagged on both versions under one key)."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for version in client.search_model_versions(f"name = '{name}'"):
        for key, value in (version.tags or {}).items():
            if key.startswith(AUDIT_PREFIX):
                seen[(key, value)] = json.loads(value)
    return list(seen.values())


def _alias_chain(records: list[dict[str, Any]], action: str = "gate") -> list[str]:
    """An alias's moves (audit records of ``action``: ``gate`` moves the champion, ``challenger`` the challenger)
    as one chain from "no holder"; fails on a fork (two moves away from one holder)."""
    records = [r for r in records if r["action"] == action]
    by_from: dict[str | None, list[dict[str, Any]]] = {}
    for record in records:
        by_from.setdefault(record["from_version"], []).append(record)
    forks = {k: [r["to_version"] for r in v] for k, v in by_from.items() if len(v) > 1}
    assert not forks, f"several moves away from the same champion (a lost update): {forks}"
    chain: list[str] = []
    current: str | None = None
    while current in by_from:
        current = by_from[current][0]["to_version"]
        chain.append(current)
    assert len(chain) == len(records), f"audit records outside the chain: {records}"
    return chain


@pytest.mark.parametrize("lock", ["derived", "primitive"])
def test_concurrent_registrations_keep_one_audited_champion(server_env: Server, tmp_path: Path, tiny_model: Path,
                                                            venv_bin: Path, lock: str) -> None:
    """N processes, N better models, a 1 s lease renewed by the heartbeat while each holder pauses 2 s under it.

    ``derived``: the lock the tracking URI implies (an http server: the MLflow lease); ``primitive``: the store's
    own primitive named by ``register.lock_uri`` (a lock file for SQLite, an advisory lock for PostgreSQL)."""
    name = unique_name()
    lock_uri = ""
    if lock == "primitive":
        lock_uri = server_env.backend_uri if server_env.backend.startswith("postgres") else str(tmp_path / "gate.lock")
    scores = {f"m{i}": 0.60 + 0.05 * i for i in range(N_PROCESSES)}
    client = _client(server_env.url)
    # the experiment exists before the race: concurrent first runs also race on creating it (tracking.py)
    if client.get_experiment_by_name(make_params(name).tracking.experiment) is None:
        client.create_experiment(make_params(name).tracking.experiment)
    procs = {}
    start = time.perf_counter()
    for variant, sm in reversed(scores.items()):  # the best first: later, worse ones must not displace it
        ws = workspace(tmp_path / variant, tiny_model, variant, sm)
        write_params_yaml(ws / "params.yaml", make_params(name, lock_uri=lock_uri, lease_s=1.0, lock_timeout_s=240))
        procs[variant] = _register(ws, venv_bin, {"BIREFNET_TEST_PAUSE_AT": "gate_decided:2"})
    results = {variant: _finish(proc) for variant, proc in procs.items()}
    wall = time.perf_counter() - start
    assert all(rc == 0 for rc, _ in results.values()), "\n\n".join(out[-3000:] for _, out in results.values())

    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}
    assert len(versions) == N_PROCESSES
    holders = [v for v, mv in versions.items() if CHAMPION in (client.get_model_version(name, v).aliases or [])]
    records = {variant: json.loads((tmp_path / variant / "registry" / "registered.json").read_text())
               for variant in scores}
    best = records[max(scores, key=scores.get)]["version"]
    assert holders == [best]
    assert all(mv.tags.get(TAG_GATE_STATE) == "done" for mv in versions.values())
    decisions = {v: mv.tags[GATE_PREFIX + "decision"] for v, mv in versions.items()}
    assert list(decisions.values()).count("first") == 1, decisions

    records = _audit_records(client, name)
    chain = _alias_chain(records)
    assert chain[-1] == best
    # the challenger alias changed hands once per registration, each time audited, in one chain as well
    challenger_chain = _alias_chain(records, "challenger")
    assert len(challenger_chain) == N_PROCESSES and set(challenger_chain) == set(versions)
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == challenger_chain[-1]
    assert set(chain) == {v for v, d in decisions.items() if d in ("first", "promoted")}
    assert json.loads(client.get_registered_model(name).tags[TAG_HISTORY]) == chain
    assert not client.search_registered_models(f"name = '{name}.gate-lock'")
    print(f"[{server_env.backend}, {lock} lock] N={N_PROCESSES} concurrent registrations: champion v{best} "
          f"(the best), chain {' -> '.join(chain)}, decisions {decisions}, wall {wall:.1f} s")


def test_rerun_finishes_an_interrupted_gate(server_env: Server, tmp_path: Path, tiny_model: Path,
                                           venv_bin: Path) -> None:
    """Killed right after its version is created (the crashed holder's MLflow lease goes stale and is broken), and
    killed right after moving the champion (before history and audit): each rerun completes the gate."""
    name = unique_name()
    client = _client(server_env.url)
    first = workspace(tmp_path / "first", tiny_model, "first", 0.60)
    write_params_yaml(first / "params.yaml", make_params(name, lease_s=1.0))
    rc, out = _finish(_register(first, venv_bin, {"BIREFNET_TEST_CRASH_AT": "register:after_version_created"}))
    assert rc == 137, out[-3000:]
    crashed = client.get_model_version(name, "1")
    assert GATE_PREFIX + "decision" not in crashed.tags and not crashed.aliases

    rc, out = _finish(_register(first, venv_bin))
    assert rc == 0, out[-3000:]
    record = json.loads((first / "registry" / "registered.json").read_text())
    assert not record["created"] and record["version"] == "1" and record["gate"]["decision"] == "first"
    assert "interrupted" in record["gate"]["note"] and record["aliases"] == [CHALLENGER, CHAMPION]
    assert client.get_model_version(name, "1").tags[TAG_GATE_STATE] == "done"
    assert _alias_chain(_audit_records(client, name)) == ["1"]
    assert _alias_chain(_audit_records(client, name), "challenger") == ["1"]

    second = workspace(tmp_path / "second", tiny_model, "second", 0.70)
    write_params_yaml(second / "params.yaml", make_params(name, lease_s=1.0))
    rc, out = _finish(_register(second, venv_bin, {"BIREFNET_TEST_CRASH_AT": "register:champion_moved"}))
    assert rc == 137, out[-3000:]
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "2"
    assert client.get_model_version(name, "2").tags[TAG_GATE_STATE] == "pending"

    rc, out = _finish(_register(second, venv_bin))
    assert rc == 0, out[-3000:]
    record = json.loads((second / "registry" / "registered.json").read_text())
    assert record["version"] == "2" and record["gate"]["decision"] == "promoted"
    assert record["gate"]["champion_version"] == "1" and record["aliases"] == [CHALLENGER, CHAMPION]
    assert client.get_model_version(name, "2").tags[TAG_GATE_STATE] == "done"
    chain = _alias_chain(_audit_records(client, name))
    assert chain == ["1", "2"] == json.loads(client.get_registered_model(name).tags[TAG_HISTORY])
    assert _alias_chain(_audit_records(client, name), "challenger") == ["1", "2"]

    rc, out = _finish(_register(second, venv_bin))
    assert rc == 0, out[-3000:]
    again = json.loads((second / "registry" / "registered.json").read_text())
    assert "weights unchanged" in again["gate"]["note"] and again["gate"]["decision"] == "promoted"
    assert _alias_chain(_audit_records(client, name)) == ["1", "2"]
