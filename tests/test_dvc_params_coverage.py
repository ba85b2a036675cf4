"""Every params leaf that can change a stage's result is a DVC param of that stage, so `dvc exp run -S key=...`
reruns what it affects; every stage depends on the schema module that validates its params."""

from __future__ import annotations

import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel

from birefnet.config import Params

REPO = Path(__file__).resolve().parents[1]
#: Leaves that cannot change any stage's outputs: where things run, what runs are called, how fast data moves.
NO_EFFECT = {
    "data.workers": "processes for ingest, gradients and shard (outputs are written in manifest order)",
    "train.ray_address": "which Ray cluster runs the workers",
    "train.run_name": "name of the Ray Train run (resume bookkeeping)",
    "train.storage_path": "where Ray keeps checkpoints (not a DVC out)",
    "train.max_failures": "worker-group restarts; a restart resumes from the last checkpoint",
    "train.log_val_images": "validation mask images logged to the MLflow run (nothing the stage writes)",
    "loader.pin_memory": "host-to-GPU copy speed",
    "loader.prefetch_factor": "batches loaded ahead",
    "tracking.uri": "for train: where metrics are logged (the register stage lists it: it writes there)",
    "tracking.artifact_location": "for train: where the run's artifacts go",
}
#: Groups whose every leaf a stage must list (the example that motivated this test: model.attention_strides).
WHOLE_GROUPS = {"model": "train", "loader": "train", "register": "register", "evaluate": "evaluate"}
#: Per-group leaves a stage reads only as performance knobs (not results); exempt from WHOLE_GROUPS.
GROUP_EXEMPT = {"loader.pin_memory", "loader.prefetch_factor", "evaluate.workers"}


def _model_type(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else None
    return None


def schema_leaves(model: type[BaseModel] = Params, prefix: str = "") -> set[str]:
    """Dotted names of every leaf of the params schema (nested groups recursed, lists and dicts are leaves)."""
    out: set[str] = set()
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        inner = _model_type(field.annotation)
        out |= schema_leaves(inner, key + ".") if inner else {key}
    return out


def _stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def _covers(listed: set[str], leaf: str) -> bool:
    """A stage lists the leaf itself or a group above it (``data.synthetic`` covers its keys)."""
    parts = leaf.split(".")
    return any(".".join(parts[:i]) in listed for i in range(1, len(parts) + 1))


def _listed(stage: dict) -> set[str]:
    return {p for p in stage.get("params") or [] if isinstance(p, str)}


def test_every_schema_leaf_is_a_stage_param_or_declared_without_effect() -> None:
    stages = _stages()
    listed = set().union(*(_listed(s) for s in stages.values()))
    missing = sorted(leaf for leaf in schema_leaves() if leaf not in NO_EFFECT and not _covers(listed, leaf))
    assert not missing, f"params leaves no dvc.yaml stage lists (add them to the stages that read them): {missing}"


def test_groups_read_whole_by_one_stage_are_listed_leaf_by_leaf() -> None:
    stages = _stages()
    problems = []
    for group, stage in WHOLE_GROUPS.items():
        listed = _listed(stages[stage])
        for leaf in sorted(schema_leaves()):
            if leaf.startswith(group + ".") and leaf not in GROUP_EXEMPT and not _covers(listed, leaf):
                problems.append(f"{leaf} (stage {stage})")
    assert not problems, f"not listed by the stage that reads them: {problems}"


def test_no_effect_keys_exist() -> None:
    assert set(NO_EFFECT) <= schema_leaves()


def test_every_stage_depends_on_the_params_schema() -> None:
    for name, stage in _stages().items():
        assert "birefnet/config.py" in (stage.get("deps") or []), f"stage {name} does not depend on birefnet/config.py"
