"""``promote``: move the champion by hand, to a version or back to the previous champion, under the gate lock.

The same checks as the gate (a READY version, comparable scores, and for ``--version`` an improvement of at
least ``min_delta``), skipped by ``force``; the same compare-and-set move and audit tags. The command line is
:mod:`birefnet.commands.promote`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from birefnet.registry.client import get_alias, version_metrics
from birefnet.registry.errors import RegistryError, error_code
from birefnet.registry.gate import audit, champion_history, gate, move_champion, primary_score, set_champion_history
from birefnet.registry.lock import GateLease, LockSettings, gate_lock
from birefnet.registry.tags import CHAMPION, TAG_EVAL_SETS

log = logging.getLogger("birefnet.registry")


@dataclass(frozen=True)
class _Request:
    """One ``promote`` call's arguments."""

    name: str
    version: str | None
    rollback: bool
    force: bool
    reason: str
    metric: str
    min_delta: float
    sets: tuple[str, ...]

    @property
    def action(self) -> str:
        return "rollback" if self.rollback else "promote"


@dataclass(frozen=True)
class _Move:
    """The champion now and the version it is to move to (MLflow ``ModelVersion`` objects and their numbers)."""

    current: str | None
    champion: Any | None
    target: str
    target_version: Any
    trail: list[str]


def promote(client: Any, name: str, *, version: str | None = None, rollback: bool = False, force: bool = False,
            reason: str = "", metric: str = "Sm", min_delta: float = 0.0, sets: Sequence[str] = (),
            lock: LockSettings) -> dict[str, Any]:
    """Move ``champion`` by hand, under the gate lock, leaving an audit tag on both versions.

    The champion is read again right before the alias moves (compare-and-set); if it moved meanwhile (a change
    made without the gate lock), nothing moves and the command is refused.

    Checks (all skipped by ``force`` except that the version exists):

    * ``version``: the version is READY, was evaluated on ``sets`` like the champion, and beats it on
      ``metric`` by at least ``min_delta`` (the gate of the register stage).
    * ``rollback``: the target is the previous champion (champion history), READY and comparable on
      ``sets``; the drop in score is recorded in the audit tag (a rollback is a deliberate demotion).

    Returns:
        ``{"action", "from_version", "to_version", "forced", "scores", "audit_tag", "reason"}``.

    Raises:
        RegistryError: a check failed, the version does not exist, there is nothing to roll back to, or the
            champion moved meanwhile.
        GateLockError: the gate lock stayed held by another command.
    """
    if (version is None) == (not rollback):
        raise ValueError("give exactly one of version or rollback")
    request = _Request(name, None if version is None else str(version), rollback, force, reason, metric, min_delta,
                       tuple(sets))
    with gate_lock(client, name, lock) as lease:
        move = _plan(client, request)
        if move.target == move.current:
            return {"action": "noop", "from_version": move.current, "to_version": move.target, "forced": force,
                    "scores": {}, "audit_tag": None, "reason": f"v{move.target} is already champion"}
        scores = _scores(request, move)
        checks = [] if force else _check(request, move, scores)
        audit_tag = _move_and_audit(client, request, move, scores, checks, lease)
    _log_move(request, move, scores)
    return {"action": request.action, "from_version": move.current, "to_version": move.target, "forced": force,
            "scores": scores, "audit_tag": audit_tag, "reason": reason}


def _rollback_target(request: _Request, current: str | None, history: list[str]) -> tuple[str, list[str]]:
    """The previous champion and the history that leads to it (the current champion's entries dropped)."""
    if current is None:
        raise RegistryError(f"{request.name} has no champion: nothing to roll back")
    trail = list(history)
    while trail and trail[-1] == current:
        trail.pop()
    if not trail:
        raise RegistryError(f"{request.name}: no earlier champion than v{current} in the champion history")
    return trail[-1], trail


def _plan(client: Any, request: _Request) -> _Move:
    """The current champion, the target version (which must exist) and the champion history after the move."""
    from mlflow.exceptions import MlflowException

    name = request.name
    champion = get_alias(client, name, CHAMPION)
    current = str(champion.version) if champion else None
    history = champion_history(client, name) if champion or request.rollback else []
    if request.rollback:
        target, trail = _rollback_target(request, current, history)
    else:
        target, trail = str(request.version), [*history, str(request.version)]
    try:
        target_version = client.get_model_version(name, target)
    except MlflowException as exc:
        raise RegistryError(f"{name} v{target} does not exist ({error_code(exc)})") from None
    return _Move(current, champion, target, target_version, trail)


def _scores(request: _Request, move: _Move) -> dict[str, float | None]:
    """The primary score of the target and of the champion, each only where it has one on every set."""
    scores: dict[str, float | None] = {}
    with contextlib.suppress(KeyError):
        scores[move.target] = primary_score(version_metrics(move.target_version) or {}, request.metric, request.sets)
    if move.current is not None:
        with contextlib.suppress(KeyError):
            scores[move.current] = primary_score(version_metrics(move.champion) or {}, request.metric, request.sets)
    return scores


def _check(request: _Request, move: _Move, scores: dict[str, float | None]) -> list[str]:
    """The checks a move without ``force`` must pass; return their names.

    Raises:
        RegistryError: the target is not READY, a score is missing, or the gate refuses the target.
    """
    name, target, current, metric, sets = request.name, move.target, move.current, request.metric, list(request.sets)
    status = str(getattr(move.target_version, "status", "READY"))
    if status != "READY":
        raise RegistryError(f"{name} v{target} is {status}, not READY; use --force to promote anyway")
    if target not in scores:
        raise RegistryError(f"{name} v{target} has no {metric} on all of {sets} (tag {TAG_EVAL_SETS}); "
                            "use --force to promote anyway")
    if current is not None and current not in scores:
        raise RegistryError(f"champion v{current} has no {metric} on all of {sets}: not comparable; "
                            "use --force to promote anyway")
    if request.rollback or current is None:
        return ["ready", "comparable"]
    decision = gate(version_metrics(move.target_version) or {}, version_metrics(move.champion), current, metric,
                    request.min_delta, request.sets)
    if not decision.promote:
        raise RegistryError(f"gate refused v{target}: {decision.reason}. Use --force to promote anyway "
                            "(the audit tag records it)")
    return ["ready", "comparable", "gate"]


def _move_and_audit(client: Any, request: _Request, move: _Move, scores: dict[str, float | None], checks: list[str],
                    lease: GateLease) -> str:
    """Move the champion (compare-and-set), write the history and the audit tag; return the tag's key."""
    name, current, target = request.name, move.current, move.target
    if not move_champion(client, name, current, target, lease):
        raise RegistryError(f"{name}: the champion moved away from v{current} while this command checked "
                            f"v{target}; nothing changed: run it again")
    set_champion_history(client, name, move.trail)
    return audit(client, name, [target, current],
                 {"action": request.action, "from_version": current, "to_version": target, "forced": request.force,
                  "checks": checks, "metric": request.metric, "scores": scores, "reason": request.reason})


def _log_move(request: _Request, move: _Move, scores: dict[str, float | None]) -> None:
    drop = ""
    if move.current in scores and move.target in scores:
        drop = f" ({request.metric} {scores[move.current]:.4f} -> {scores[move.target]:.4f})"
    log.warning("%s: champion moved v%s -> v%s by %s%s%s", request.name, move.current, move.target, request.action,
                " (forced)" if request.force else "", drop)
