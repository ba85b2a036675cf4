"""The gate's compare-and-set: when the champion moves between the gate's decision and its alias move, the gate
decides again against the new champion instead of overwriting it (#19 item 1). Quick lane: an embedded SQLite
registry and a lock file; the race is injected at the gate's own ``gate_decided`` hook."""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from birefnet.registry.errors import RegistryError
from birefnet.registry.gate import CAS_ATTEMPTS, GateDecision, GateRequest, gate_and_move
from birefnet.registry.lock import FileGateLock, hold
from birefnet.registry.tags import AUDIT_PREFIX, CHALLENGER, CHAMPION, TAG_EVAL_SETS, TAG_GATE_STATE

SETS = ("DIS-VD",)
#: The module (``birefnet.registry.gate`` the attribute is the gate function the package re-exports).
gate_module = importlib.import_module("birefnet.registry.gate")


def _version(client: Any, name: str, sm: float) -> str:
    """A registered version whose recorded metrics give S-measure ``sm`` on the selection set."""
    tags = {TAG_EVAL_SETS: json.dumps({s: {"Sm": sm} for s in SETS})}
    return str(client.create_model_version(name, f"file:///models/{sm}", tags=tags).version)


def _request(name: str, version: str, sm: float) -> GateRequest:
    return GateRequest(name=name, version=version, metrics={s: {"Sm": sm} for s in SETS}, metric="Sm",
                       min_delta=0.001, sets=SETS, run_id="run-under-test")


def _race(monkeypatch: pytest.MonkeyPatch, client: Any, name: str, moves: list[str]) -> list[str]:
    """At each ``gate_decided`` point, another actor moves ``champion`` to the next version in ``moves``."""
    done: list[str] = []
    real = gate_module.fault_point

    def racing(point: str) -> None:
        real(point)
        if point == "gate_decided" and len(done) < len(moves):
            client.set_registered_model_alias(name, CHAMPION, moves[len(done)])
            done.append(moves[len(done)])

    monkeypatch.setattr(gate_module, "fault_point", racing)
    return done


def test_champion_moved_under_the_decision_is_decided_again(mlflow_client: Any, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    name = "cas-race"
    mlflow_client.create_registered_model(name)
    v1 = _version(mlflow_client, name, 0.50)
    v2 = _version(mlflow_client, name, 0.90)  # registered by someone else, better than the challenger
    v3 = _version(mlflow_client, name, 0.70)
    mlflow_client.set_registered_model_alias(name, CHAMPION, v1)
    moved = _race(monkeypatch, mlflow_client, name, [v2])

    with caplog.at_level(logging.WARNING, "birefnet.registry"), hold(FileGateLock(tmp_path / "g.lock", "me"), 5, 30) \
            as lease:
        decision = gate_and_move(mlflow_client, _request(name, v3, 0.70), lease)

    assert moved == [v2]
    # The first decision (0.70 beats v1's 0.50) was taken against v1; the alias move found v2 and decided again.
    assert "deciding again" in caplog.text
    assert decision.decision == "rejected" and decision.champion_version == v2 and not decision.promote
    assert str(mlflow_client.get_model_version_by_alias(name, CHAMPION).version) == v2
    assert str(mlflow_client.get_model_version_by_alias(name, CHALLENGER).version) == v3
    tags = mlflow_client.get_model_version(name, v3).tags
    assert tags[TAG_GATE_STATE] == "done"
    assert GateDecision.from_tags(tags) == decision  # the recorded decision is the second one, not the stale first
    audits = [json.loads(v) for k, v in tags.items() if k.startswith(AUDIT_PREFIX)]
    assert [(a["action"], a["from_version"], a["to_version"], a["decision"]) for a in audits] == \
        [("challenger", None, v3, "rejected")]


def test_a_champion_that_keeps_moving_ends_in_a_clear_error(mlflow_client: Any, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    name = "cas-storm"
    mlflow_client.create_registered_model(name)
    versions = [_version(mlflow_client, name, 0.10 + 0.01 * i) for i in range(CAS_ATTEMPTS + 1)]
    challenger = _version(mlflow_client, name, 0.95)
    mlflow_client.set_registered_model_alias(name, CHAMPION, versions[0])
    _race(monkeypatch, mlflow_client, name, versions[1:])

    with hold(FileGateLock(tmp_path / "g.lock", "me"), 5, 30) as lease, pytest.raises(RegistryError) as info:
        gate_and_move(mlflow_client, _request(name, challenger, 0.95), lease)

    assert f"moved {CAS_ATTEMPTS} times" in str(info.value) and f"v{challenger}" in str(info.value)
    # The challenger never took the alias from under the racing mover, and its gate is left pending for a rerun.
    assert str(mlflow_client.get_model_version_by_alias(name, CHAMPION).version) == versions[CAS_ATTEMPTS]
    assert mlflow_client.get_model_version(name, challenger).tags[TAG_GATE_STATE] == "pending"
