"""MLflow model registry for BiRefNet: versions, aliases ``challenger``/``champion`` and the promotion gate.

A registered version is identified by the sha256 of its safetensors file (version tag
``birefnet.content_sha256``): registering unchanged weights again reuses the version. Every new version gets
the alias ``challenger``; the gate then compares it with the ``champion`` on the primary metric (its mean over
the same test sets, read from the versions' ``birefnet.eval.sets`` tags) and moves ``champion`` only when the
challenger improves by at least ``register.min_delta`` (strictly better; the first model becomes champion).
The champion is never replaced by a worse, equal or incomparable version except by ``birefnet promote
--force``, and every move leaves an audit tag on both versions.

Concurrency: MLflow has no compare-and-set on aliases, so the read-champion / compare / move-alias sequence runs
under a registry-wide gate lock (:mod:`birefnet.registry.lock`: a PostgreSQL advisory lock, a lock file, or a lease
on a registered model renewed by a heartbeat), and the champion is read again right before the alias moves: if
it changed since the decision, the gate decides again. The content-hash check is repeated under the lock, so two
processes registering the same weights create one version.

Crashes: the decision is written to the version (``birefnet.gate_state: pending``) before any alias moves and
marked ``done`` after the audit tag, so a rerun that finds the version by its content hash finishes the gate
of a version whose gate never completed.

Metrics are bound to weights: ``eval.json`` records the sha256 of the model file it scored
(``meta.model_sha256``); ``register`` refuses a model whose bytes have another hash.

``birefnet promote --version N`` and ``birefnet promote --rollback`` move the champion by hand with the same
checks (``--force`` skips them) and the same lock.

Modules: :mod:`~birefnet.registry.gate` (the decision, the compare-and-set move, history and audit),
:mod:`~birefnet.registry.lock` (the gate lock), :mod:`~birefnet.registry.registration` (:func:`register`),
:mod:`~birefnet.registry.promotion` (:func:`promote`), :mod:`~birefnet.registry.pyfunc` (the model's MLflow
packaging), :mod:`~birefnet.registry.lineage` (content hash, data and code version),
:mod:`~birefnet.registry.client` (MLflow reads), :mod:`~birefnet.registry.tags` (tag keys and aliases) and
:mod:`~birefnet.registry.errors`. Every failure is a :class:`RegistryError`; the command lines exit 3 on it.
"""

from __future__ import annotations

from birefnet.registry.client import find_version_by_sha, get_alias, mlflow_client, reachable_tracking
from birefnet.registry.errors import RegistryError
from birefnet.registry.gate import (
    CAS_ATTEMPTS,
    GateDecision,
    GateRequest,
    gate,
    gate_and_move,
    gate_done,
    primary_score,
    set_metrics,
)
from birefnet.registry.lineage import model_content_hash
from birefnet.registry.lock import GateLockError, LockSettings, gate_lock
from birefnet.registry.promotion import promote
from birefnet.registry.pyfunc import log_pyfunc_model, pip_requirements
from birefnet.registry.registration import register
from birefnet.registry.tags import (
    AUDIT_PREFIX,
    CHALLENGER,
    CHAMPION,
    GATE_PREFIX,
    PROMOTING,
    TAG_EVAL_SETS,
    TAG_GATE_STATE,
    TAG_HISTORY,
    TAG_SHA,
)

__all__ = [
    "AUDIT_PREFIX", "CAS_ATTEMPTS", "CHALLENGER", "CHAMPION", "GATE_PREFIX", "PROMOTING", "TAG_EVAL_SETS",
    "TAG_GATE_STATE", "TAG_HISTORY", "TAG_SHA", "GateDecision", "GateLockError", "GateRequest", "LockSettings",
    "RegistryError", "find_version_by_sha", "gate", "gate_and_move", "gate_done", "gate_lock", "get_alias",
    "log_pyfunc_model", "mlflow_client", "model_content_hash", "pip_requirements", "primary_score", "promote",
    "reachable_tracking", "register", "set_metrics",
]
