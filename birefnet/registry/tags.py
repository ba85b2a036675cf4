"""What the registry writes into MLflow: aliases, version tags and registered-model tags."""

from __future__ import annotations

CHAMPION = "champion"
CHALLENGER = "challenger"
#: Version tag: the model's content hash (:func:`birefnet.registry.lineage.model_content_hash`).
TAG_SHA = "birefnet.content_sha256"
#: Version tag: the per-set metrics the version was registered with, as compact JSON.
TAG_EVAL_SETS = "birefnet.eval.sets"
#: Registered-model tag: the champion's versions in order, as a JSON list.
TAG_HISTORY = "birefnet.champion_history"
#: Prefix of the version tags that hold the gate's decision (:meth:`GateDecision.to_tags`).
GATE_PREFIX = "birefnet.gate."
#: ``pending`` once the decision is written, ``done`` once aliases, history and audit are; absent before.
TAG_GATE_STATE = "birefnet.gate_state"
#: Prefix of the audit tags (``birefnet.audit.<UTC time>``) every champion move leaves on both versions.
AUDIT_PREFIX = "birefnet.audit."
#: Decisions written to ``birefnet.gate.decision``; the first two moved ``champion``.
PROMOTING = ("first", "promoted")
