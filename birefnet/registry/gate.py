"""The promotion gate: the pure decision, and moving the aliases by compare-and-set with history and audit.

:func:`gate` decides from two sets of metrics alone. :func:`gate_and_move` applies it to a registered version
under the gate lock: the decision is tagged (state ``pending``) before any alias moves, ``champion`` moves only
if it is still the version the decision was taken against (:func:`move_champion`), and the state becomes
``done`` after the champion history and the audit tag, so a rerun finishes a gate that a crash interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from birefnet.config import GATE_METRICS
from birefnet.publish import crash_point
from birefnet.registry.client import get_alias, version_metrics
from birefnet.registry.errors import RegistryError
from birefnet.registry.lock import GateLease, actor
from birefnet.registry.tags import (
    AUDIT_PREFIX,
    CHALLENGER,
    CHAMPION,
    GATE_PREFIX,
    TAG_GATE_STATE,
    TAG_HISTORY,
)

log = logging.getLogger("birefnet.registry")

#: How often the gate decides again when the champion moved between its decision and the alias move.
CAS_ATTEMPTS = 5
#: The champion history keeps this many moves.
HISTORY_LENGTH = 200
#: Test hook: ``BIREFNET_TEST_PAUSE_AT=<point>:<seconds>`` pauses at a :func:`fault_point`.
PAUSE_ENV = "BIREFNET_TEST_PAUSE_AT"


def fault_point(point: str) -> None:
    """Test hook: crash (``BIREFNET_TEST_CRASH_AT=register:<point>``) or pause (``BIREFNET_TEST_PAUSE_AT``).

    The crash is :func:`birefnet.publish.crash_point` with stage ``register`` (points ``after_version_created``,
    ``gate_decided``, ``champion_moved``).
    """
    crash_point("register", point)
    where, _, seconds = os.environ.get(PAUSE_ENV, "").partition(":")
    if where == point:
        time.sleep(float(seconds or 1))


# ----------------------------------------------------------------------------------------- scores, gate


def set_metrics(eval_doc: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The numeric per-set metrics of an ``eval.json`` document: ``{set: {metric: value}}``, the reported test sets
    (``sets``) and the gate's selection sets (``selection``) together.

    Raises:
        RegistryError: the document has no ``sets``.
    """
    sets = eval_doc.get("sets")
    if not isinstance(sets, Mapping) or not sets:
        raise RegistryError("eval metrics have no 'sets' (expected the evaluate stage's eval.json)")
    selection = eval_doc.get("selection")
    merged = {**(selection if isinstance(selection, Mapping) else {}), **sets}
    return {name: {k: float(v) for k, v in values.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and k != "n" and math.isfinite(v)}
            for name, values in merged.items() if isinstance(values, Mapping)}


def primary_score(metrics: Mapping[str, Mapping[str, float]], metric: str, sets: Sequence[str]) -> float:
    """Mean of ``metric`` over ``sets`` (unweighted, like the paper's tables).

    Raises:
        KeyError: a set or the metric is missing; the message names it.
    """
    values = []
    for name in sets:
        if name not in metrics:
            raise KeyError(f"no metrics for test set {name!r}")
        if metric not in metrics[name]:
            raise KeyError(f"no {metric!r} for test set {name!r}")
        values.append(metrics[name][metric])
    if not values:
        raise KeyError("no test sets to score")
    return sum(values) / len(values)


@dataclass(frozen=True)
class GateDecision:
    """The promotion gate's verdict on one challenger.

    Attributes:
        promote: whether ``champion`` moves to the challenger.
        decision: ``first`` (no champion yet), ``promoted``, ``rejected`` or ``incomparable``.
        reason: one human sentence with both scores.
    """

    promote: bool
    decision: str
    metric: str
    higher_is_better: bool
    sets: tuple[str, ...]
    challenger_score: float
    champion_version: str | None
    champion_score: float | None
    min_delta: float
    improvement: float | None
    reason: str

    def to_tags(self) -> dict[str, str]:
        """Version tags ``birefnet.gate.*`` (MLflow tags are strings)."""
        out = {}
        for key, value in asdict(self).items():
            if isinstance(value, tuple | list):
                value = ",".join(value)
            out[GATE_PREFIX + key] = "" if value is None else str(value)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``registered.json``)."""
        return {**asdict(self), "sets": list(self.sets)}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> GateDecision:
        """The decision recorded by :meth:`to_tags` on a model version, with its types restored."""
        raw = {k[len(GATE_PREFIX):]: v for k, v in tags.items() if k.startswith(GATE_PREFIX)}

        def number(key: str) -> float | None:
            return float(raw[key]) if raw.get(key) else None

        return cls(promote=raw.get("promote") == "True", decision=raw.get("decision", ""),
                   metric=raw.get("metric", ""), higher_is_better=raw.get("higher_is_better") == "True",
                   sets=tuple(x for x in raw.get("sets", "").split(",") if x),
                   challenger_score=number("challenger_score") or 0.0,
                   champion_version=raw.get("champion_version") or None, champion_score=number("champion_score"),
                   min_delta=number("min_delta") or 0.0, improvement=number("improvement"),
                   reason=raw.get("reason", ""))


def gate(challenger: Mapping[str, Mapping[str, float]], champion: Mapping[str, Mapping[str, float]] | None,
         champion_version: str | None, metric: str, min_delta: float, sets: Sequence[str]) -> GateDecision:
    """Decide whether a challenger replaces the champion (pure function).

    Args:
        challenger: the challenger's per-set metrics ``{set: {metric: value}}``.
        champion: the champion's per-set metrics, or None when there is no champion.
        champion_version: the champion's version number, or None.
        metric: the primary metric (a key of ``GATE_METRICS``).
        min_delta: the smallest improvement that moves the champion.
        sets: the test sets both are compared on.

    Returns:
        The decision; ``promote`` is true only for ``first`` and ``promoted``.
    """
    higher = GATE_METRICS[metric]
    sets = tuple(sets)
    score = primary_score(challenger, metric, sets)
    common = {"metric": metric, "higher_is_better": higher, "sets": sets, "challenger_score": score,
              "champion_version": champion_version, "min_delta": min_delta}
    if champion_version is None:
        return GateDecision(promote=True, decision="first", champion_score=None, improvement=None,
                            reason=f"no champion yet: the first model becomes champion ({metric} {score:.4f})",
                            **common)
    try:
        best = primary_score(champion or {}, metric, sets)
    except KeyError as exc:
        return GateDecision(promote=False, decision="incomparable", champion_score=None, improvement=None,
                            reason=f"champion v{champion_version} cannot be compared on {', '.join(sets)} "
                                   f"({exc.args[0]}); champion kept (move it with birefnet promote --force)",
                            **common)
    improvement = (score - best) if higher else (best - score)
    better = "higher" if higher else "lower"
    if improvement > 0 and improvement >= min_delta - 1e-12:
        return GateDecision(promote=True, decision="promoted", champion_score=best, improvement=improvement,
                            reason=f"{metric} {score:.4f} vs champion v{champion_version} {best:.4f}: improves by "
                                   f"{improvement:.4f} >= min_delta {min_delta} ({better} is better)", **common)
    verdict = "equal to" if improvement == 0 else ("worse than" if improvement < 0 else "not enough better than")
    return GateDecision(promote=False, decision="rejected", champion_score=best, improvement=improvement,
                        reason=f"{metric} {score:.4f} is {verdict} champion v{champion_version} {best:.4f} "
                               f"(improvement {improvement:+.4f}, needs >= {min_delta}, {better} is better); "
                               "champion kept", **common)


# ------------------------------------------------------------------------------- history, audit, move


def champion_history(client: Any, name: str) -> list[str]:
    """The versions ``champion`` pointed to, oldest first (registered-model tag ``birefnet.champion_history``)."""
    model = client.get_registered_model(name)
    try:
        return [str(v) for v in json.loads((model.tags or {}).get(TAG_HISTORY, "[]"))]
    except ValueError:
        return []


def set_champion_history(client: Any, name: str, history: list[str]) -> None:
    """Write the champion history (its last ``HISTORY_LENGTH`` moves)."""
    client.set_registered_model_tag(name, TAG_HISTORY, json.dumps(history[-HISTORY_LENGTH:]))


def audit(client: Any, name: str, versions: Sequence[str | None], record: Mapping[str, Any]) -> str:
    """Write one audit record as a ``birefnet.audit.<UTC time>`` tag on each of ``versions``; return the key."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    key = f"{AUDIT_PREFIX}{stamp}"
    value = json.dumps({"at": stamp, "by": actor(), **record}, sort_keys=True)
    for version in dict.fromkeys(v for v in versions if v is not None):
        client.set_model_version_tag(name, version, key, value)
    return key


def move_champion(client: Any, name: str, expected: str | None, target: str, lease: GateLease) -> bool:
    """Compare-and-set: move ``champion`` to ``target`` only if it is still ``expected``; False if it moved."""
    lease.ensure_held()
    champion = get_alias(client, name, CHAMPION)
    if (str(champion.version) if champion else None) != expected:
        return False
    client.set_registered_model_alias(name, CHAMPION, target)
    return True


def move_challenger(client: Any, request: GateRequest, decision: GateDecision) -> None:
    """Point ``challenger`` at the gated version, audited on both versions when the alias changes hands.

    The audit record goes first: a crash between it and the alias move leaves a record that a rerun repeats
    (a duplicate), never an alias that left a version without one.
    """
    previous = get_alias(client, request.name, CHALLENGER)
    previous_version = str(previous.version) if previous else None
    if previous_version != request.version:
        audit(client, request.name, [request.version, previous_version],
              {"action": "challenger", "from_version": previous_version, "to_version": request.version,
               "decision": decision.decision, "forced": False, "reason": decision.reason, "run_id": request.run_id})
    client.set_registered_model_alias(request.name, CHALLENGER, request.version)


def gate_done(tags: Mapping[str, str]) -> bool:
    """Whether a version's gate completed (state ``done``, or a decision from before the state tag existed)."""
    state = tags.get(TAG_GATE_STATE)
    return state == "done" or (state is None and bool(tags.get(GATE_PREFIX + "decision")))


def _has_gate_audit(tags: Mapping[str, str], version: str) -> bool:
    """Whether the version's tags hold the audit record of the gate promotion to ``version``."""
    for key, value in tags.items():
        if key.startswith(AUDIT_PREFIX):
            with contextlib.suppress(ValueError, AttributeError):
                record = json.loads(value)
                if record.get("action") == "gate" and record.get("to_version") == version:
                    return True
    return False


def record_move(client: Any, name: str, version: str, decision: GateDecision, run_id: str | None) -> None:
    """Champion history and audit tag of a gate promotion (idempotent: a rerun after a crash adds what is missing)."""
    history = champion_history(client, name)
    if not history or history[-1] != version:
        set_champion_history(client, name, [*history, version])
    if _has_gate_audit(client.get_model_version(name, version).tags or {}, version):
        return
    audit(client, name, [version, decision.champion_version],
          {"action": "gate", "from_version": decision.champion_version, "to_version": version,
           "decision": decision.decision, "forced": False, "reason": decision.reason, "run_id": run_id})


# -------------------------------------------------------------------------------------- gate a version


@dataclass(frozen=True)
class GateRequest:
    """A registered version going through the gate, and the rule it is judged by (``register.*``).

    Attributes:
        name: the registered model.
        version: the version number.
        metrics: its per-set metrics ``{set: {metric: value}}``.
        metric: the primary metric.
        min_delta: the smallest improvement that moves the champion.
        sets: the test sets compared on.
        run_id: the register run (recorded in the audit tag).
    """

    name: str
    version: str
    metrics: Mapping[str, Mapping[str, float]]
    metric: str
    min_delta: float
    sets: tuple[str, ...]
    run_id: str | None = None


def gate_and_move(client: Any, request: GateRequest, lease: GateLease) -> GateDecision:
    """Under the gate lock: decide, move the aliases (compare-and-set on the champion), record history and audit.

    The decision is tagged (state ``pending``) before any alias moves and the state set to ``done`` last, so a
    rerun finishes a gate an interrupted run left: a pending decision still stands while the champion it was
    taken against is champion (or the interrupted run already moved the champion to ``version``).

    Raises:
        RegistryError: the champion kept moving under the decision ``CAS_ATTEMPTS`` times.
        GateLockError: the lease was lost before an alias moved.
    """
    decision = _move_aliases(client, request, lease)
    if decision.promote:
        fault_point("champion_moved")
        record_move(client, request.name, request.version, decision, request.run_id)
    client.set_model_version_tag(request.name, request.version, TAG_GATE_STATE, "done")
    return decision


def _move_aliases(client: Any, request: GateRequest, lease: GateLease) -> GateDecision:
    """Decide and move ``champion`` (when the decision promotes) and ``challenger``; decide again if raced."""
    name, version = request.name, request.version
    tags = client.get_model_version(name, version).tags or {}
    pending = GateDecision.from_tags(tags) if tags.get(TAG_GATE_STATE) == "pending" else None
    for _ in range(CAS_ATTEMPTS):
        decision, current = _decide(client, request, pending)
        fault_point("gate_decided")
        lease.ensure_held()
        if decision.promote and current != version and not move_champion(client, name, current, version, lease):
            log.warning("%s: champion moved away from v%s while v%s was gated: deciding again", name, current, version)
            pending = None
            continue
        move_challenger(client, request, decision)
        return decision
    raise RegistryError(f"{name}: the champion moved {CAS_ATTEMPTS} times while v{version} was gated (someone "
                        "moves it without the gate lock?); rerun the register stage to finish the gate")


def _decide(client: Any, request: GateRequest, pending: GateDecision | None) -> tuple[GateDecision, str | None]:
    """The decision against the current champion, and that champion's version.

    A pending decision stands while its champion is still champion (or the challenger already is); otherwise a
    new decision is taken and tagged on the version (state ``pending``) before any alias moves.
    """
    champion = get_alias(client, request.name, CHAMPION)
    current = str(champion.version) if champion else None
    if pending is not None and current in (pending.champion_version, request.version):
        return pending, current
    decision = gate(request.metrics, version_metrics(champion) if champion else None, current, request.metric,
                    request.min_delta, request.sets)
    for key, value in {**decision.to_tags(), TAG_GATE_STATE: "pending"}.items():
        client.set_model_version_tag(request.name, request.version, key, value)
    return decision, current
