"""``register``: log the trained model, register it (or reuse the version of the same weights) and gate it.

One MLflow run per call (tag ``birefnet.stage: register``) carries the flattened params, the per-set metrics,
the data version (:mod:`birefnet.registry.lineage`), the evaluation report and the decision; the version is
created and gated under the gate lock (:mod:`birefnet.registry.gate`), and ``registered.json`` records it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from birefnet.config import Params
from birefnet.hashing import sha256_file
from birefnet.registry.client import (
    find_version_by_sha,
    get_alias,
    mlflow_client,
    reachable_tracking,
    version_aliases,
)
from birefnet.registry.errors import RegistryError, error_code, explain
from birefnet.registry.gate import (
    GateDecision,
    GateRequest,
    fault_point,
    gate_and_move,
    gate_done,
    primary_score,
    set_metrics,
)
from birefnet.registry.lineage import code_version, data_digest, log_data_inputs, log_params, model_content_hash
from birefnet.registry.lock import LockSettings, gate_lock
from birefnet.registry.pyfunc import log_pyfunc_model
from birefnet.registry.tags import CHALLENGER, CHAMPION, TAG_EVAL_SETS, TAG_SHA

log = logging.getLogger("birefnet.registry")

#: MLflow accepts at most this many metrics per ``log_batch`` request.
MAX_METRICS_PER_BATCH = 500


@dataclass(frozen=True)
class RegisterInputs:
    """What ``register`` reads from disk, checked, before it contacts the tracking server.

    Attributes:
        model_path: ``register.model``.
        eval_path: ``register.metrics`` (the evaluate stage's ``eval.json``).
        metrics: its per-set metrics ``{set: {metric: value}}`` (test and selection sets).
        sets: the sets the gate compares on (:meth:`Params.gate_sets`: ``register.selection_sets``, else
            ``data.test_sets``), each with the primary metric.
        sha: the model's content hash (the version's identity).
        eval_sha: the sha256 of ``eval.json``.
        train_summary: the train stage's ``train.json`` beside the model (empty when absent or unreadable).
    """

    model_path: Path
    eval_path: Path
    metrics: Mapping[str, Mapping[str, float]]
    sets: list[str]
    sha: str
    eval_sha: str
    train_summary: Mapping[str, Any]


@dataclass(frozen=True)
class RegisterJob:
    """What one register call works on inside its MLflow run (passed between its steps)."""

    client: Any
    params: Params
    base: Path
    run_id: str
    inputs: RegisterInputs
    lock: LockSettings
    commit: str
    digest: str

    @property
    def name(self) -> str:
        """The registered model (``register.model_name``)."""
        return self.params.register.model_name


# ------------------------------------------------------------------------------------------ inputs


def check_eval_binding(eval_doc: Mapping[str, Any], model_path: Path, eval_path: Path) -> None:
    """Refuse metrics that were not computed on these weights (``meta.model_sha256`` against the model's bytes).

    Raises:
        RegistryError: the key is missing, or names another file's hash (both hashes and both files named).
    """
    meta = eval_doc.get("meta")
    recorded = meta.get("model_sha256") if isinstance(meta, Mapping) else None
    if not recorded:
        raise RegistryError(f"{eval_path}: no meta.model_sha256 (the sha256 of the model it scored), so its metrics "
                            f"cannot be bound to {model_path}: rerun `dvc repro evaluate` (or birefnet evaluate)")
    actual = sha256_file(model_path)
    if str(recorded).lower() != actual:
        raise RegistryError(f"{eval_path} scored a model with sha256 {recorded} (meta.model_sha256), but {model_path} "
                            f"has sha256 {actual}: the metrics are not those of this model; rerun `dvc repro "
                            "evaluate`")


def _read_eval(eval_path: Path, label: str) -> Mapping[str, Any]:
    """The ``eval.json`` document at ``eval_path`` (``label``: its path as configured, for messages)."""
    if not eval_path.is_file():
        raise RegistryError(f"metrics {label} not found: run the evaluate stage first (birefnet evaluate)")
    try:
        eval_doc = json.loads(eval_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RegistryError(f"{label}: not valid JSON ({exc})") from exc
    if not isinstance(eval_doc, Mapping):
        raise RegistryError(f"{label}: expected a JSON object (the evaluate stage's eval.json)")
    return eval_doc


def _read_train_summary(model_path: Path) -> Mapping[str, Any]:
    """The train stage's ``train.json`` beside the model, or an empty mapping."""
    train_json = model_path.parent / "train.json"
    if train_json.is_file():
        with contextlib.suppress(ValueError):
            return json.loads(train_json.read_text(encoding="utf-8"))
    return {}


def read_inputs(params: Params, base: Path) -> RegisterInputs:
    """The model and its metrics, checked: present, valid, scoring every test set, and computed on these weights.

    Raises:
        RegistryError: a missing or invalid file, metrics missing a test set, or metrics of other weights.
    """
    from birefnet.publish import finish_pending

    rp = params.register
    model_path, eval_path = base / rp.model, base / rp.metrics
    for folder in dict.fromkeys((model_path.parent, eval_path.parent)):
        finish_pending(folder)  # a train or evaluate run killed after its commit point left its outputs half-swapped
    if not model_path.is_file():
        raise RegistryError(f"model {rp.model} not found: run the train stage first (birefnet train)")
    eval_doc = _read_eval(eval_path, str(rp.metrics))
    metrics = set_metrics(eval_doc)
    sets = params.gate_sets()
    for key, names in (("data.test_sets", list(params.data.test_sets)), ("register.selection_sets", sets)):
        missing = [s for s in names if rp.primary_metric not in metrics.get(s, {})]
        if missing:
            raise RegistryError(f"{rp.metrics} has no {rp.primary_metric} for set(s) {missing} of {key} {names}: "
                                "re-run the evaluate stage")
    check_eval_binding(eval_doc, model_path, eval_path)
    return RegisterInputs(model_path, eval_path, metrics, sets, model_content_hash(model_path),
                          sha256_file(eval_path), _read_train_summary(model_path))


# ------------------------------------------------------------------------------------------ the run


def _run_tags(job_name: str, inputs: RegisterInputs, commit: str, digest: str) -> dict[str, str]:
    """Tags of the register run (stage, names, code and data version, content hash, train run)."""
    run_name = f"register-{inputs.sha[:12]}"
    tags = {"birefnet.stage": "register", "birefnet.run_name": str(inputs.train_summary.get("run_name", run_name)),
            "mlflow.source.git.commit": commit, "birefnet.data_digest": digest, TAG_SHA: inputs.sha,
            "birefnet.model_name": job_name}
    if inputs.train_summary.get("mlflow_run_id"):
        tags["birefnet.train_run_id"] = str(inputs.train_summary["mlflow_run_id"])
    return tags


@contextlib.contextmanager
def _ending_run() -> Iterator[None]:
    """End the active run when the block leaves: ``FINISHED`` if it completed, else ``FAILED``."""
    import mlflow

    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    finally:
        mlflow.end_run(status=status)


def _log_metrics(job: RegisterJob, model_id: str | None = None) -> None:
    """The per-set metrics (``<set>.<metric>``) and the gate's primary score (``gate.<metric>``).

    Into the register run; with ``model_id`` also onto that logged model (MLflow 3 model metrics: what the
    model version's page shows). Every call stamps the metrics with the run's start time, so the second call
    adds no duplicate points to the run's history (MLflow skips rows that exist), only the model's metrics.
    """
    from mlflow.entities import Metric

    metrics, metric = job.inputs.metrics, job.params.register.primary_metric
    stamp = int(job.client.get_run(job.run_id).info.start_time or time.time() * 1000)
    values = [(f"{s}.{m}", v) for s, per_set in metrics.items() for m, v in per_set.items()]
    values.append((f"gate.{metric}", primary_score(metrics, metric, job.inputs.sets)))
    metric_list = [Metric(key, float(value), stamp, 0, model_id=model_id, run_id=job.run_id if model_id else None)
                   for key, value in values]
    for i in range(0, len(metric_list), MAX_METRICS_PER_BATCH):
        job.client.log_batch(job.run_id, metrics=metric_list[i:i + MAX_METRICS_PER_BATCH])


def _log_run_inputs(job: RegisterJob) -> dict[str, str]:
    """Params, metrics, data version and the evaluation files into the active run; return the data tags."""
    import mlflow

    log_params(job.client, job.run_id, job.params)
    _log_metrics(job)
    data_tags = log_data_inputs(job.params, job.base)
    mlflow.log_artifact(str(job.inputs.eval_path), "evaluation")
    plots = job.base / job.params.evaluate.plots / "png"
    if plots.is_dir():
        mlflow.log_artifacts(str(plots), "evaluation/plots")
    report = job.base / job.params.evaluate.reports  # the hardest samples as figures, index.md, per_image.csv
    if report.is_dir():
        mlflow.log_artifacts(str(report), "evaluation/report")
    return data_tags


def _log_model(job: RegisterJob) -> str:
    """Log the model of ``job`` with its serving limits; return its ``models:/m-<id>`` URI."""
    params = job.params
    return log_pyfunc_model(job.inputs.model_path, params.data.size, params.serving.max_image_pixels).model_uri


def _version_tags(job: RegisterJob, data_tags: Mapping[str, str]) -> dict[str, str]:
    """Tags of a new version: content hash, metrics, eval hash, runs, code and data version."""
    inputs = job.inputs
    eval_tag = json.dumps({s: {m: round(v, 6) for m, v in inputs.metrics[s].items()} for s in sorted(inputs.metrics)},
                          separators=(",", ":"), sort_keys=True)
    tags = {TAG_SHA: inputs.sha, TAG_EVAL_SETS: eval_tag, "birefnet.eval_sha256": inputs.eval_sha,
            "birefnet.register_run_id": job.run_id, "birefnet.git_commit": job.commit,
            "birefnet.data_digest": job.digest, **data_tags}
    if inputs.train_summary.get("mlflow_run_id"):
        tags["birefnet.train_run_id"] = str(inputs.train_summary["mlflow_run_id"])
    return tags


# ------------------------------------------------------------------------------- version and gate


def _logged_model_id(model_uri: str) -> str | None:
    """The logged model's id in a ``models:/m-<id>`` URI, or None for other URIs."""
    rest = model_uri.removeprefix("models:/")
    return rest if rest != model_uri and rest.startswith("m-") and "/" not in rest else None


def _version_run_id(job: RegisterJob) -> str:
    """The run the new version links to: the training run (``mlflow_run_id`` of ``train.json``) when this
    tracking server has it, else the register run (which logged the model)."""
    from mlflow.exceptions import MlflowException

    train_run_id = str(job.inputs.train_summary.get("mlflow_run_id") or "")
    if not train_run_id:
        return job.run_id
    try:
        job.client.get_run(train_run_id)
    except MlflowException as exc:
        if error_code(exc) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise
        log.warning("%s names training run %s (mlflow_run_id), which this tracking server does not have: the new "
                    "version links to the register run %s instead", job.inputs.model_path.parent / "train.json",
                    train_run_id, job.run_id)
        return job.run_id
    return train_run_id


def _ensure_registered_model(client: Any, name: str) -> None:
    """Create the registered model ``name`` unless it exists."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if error_code(exc) not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _link_logged_model(client: Any, model_id: str, name: str, version: str) -> None:
    """Record the version on its logged model (tag ``mlflow.modelVersions``, as ``mlflow.register_model`` does;
    a tracking server adds it itself, with the version as a number, so an existing entry is not repeated)."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    recorded = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    if not any(e.get("name") == name and str(e.get("version")) == version for e in recorded if isinstance(e, dict)):
        entry = {"name": name, "version": int(version)}
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*recorded, entry])})


def _create_version(job: RegisterJob, model_uri: str, version_tags: Mapping[str, str]) -> str:
    """Register ``model_uri`` as a new version of the model; return its number.

    The evaluation metrics go onto the logged model first (the version's metrics in MLflow 3); the version's
    ``run_id`` is the training run when known (:func:`_version_run_id`), its source the logged model.
    """
    model_id = _logged_model_id(model_uri)
    if model_id is not None:
        _log_metrics(job, model_id=model_id)
    _ensure_registered_model(job.client, job.name)
    version = job.client.create_model_version(job.name, model_uri, run_id=_version_run_id(job),
                                              tags=dict(version_tags), model_id=model_id,
                                              await_creation_for=job.params.register.await_registration_s)
    if model_id is not None:
        _link_logged_model(job.client, model_id, job.name, str(version.version))
    fault_point("after_version_created")
    return str(version.version)


def _gate_request(job: RegisterJob, version: str) -> GateRequest:
    rp = job.params.register
    return GateRequest(job.name, version, job.inputs.metrics, rp.primary_metric, rp.min_delta,
                       tuple(job.inputs.sets), job.run_id)


def _create_or_finish(job: RegisterJob, model_uri: str | None, version_tags: Mapping[str, str],
                      ) -> tuple[str, bool, GateDecision | None]:
    """Under the gate lock: register a new version and gate it, or finish the gate of an existing version.

    Returns:
        (version, created, decision); the decision is None when the existing version's gate had completed.
    """
    with gate_lock(job.client, job.name, job.lock) as lease:
        existing = find_version_by_sha(job.client, job.name, job.inputs.sha)
        if existing is None and model_uri is None:  # the version found before the lock was deleted meanwhile
            model_uri = _log_model(job)
        if existing is not None and gate_done(existing.tags or {}):
            return str(existing.version), False, None
        if existing is None:
            version = _create_version(job, model_uri, version_tags)
        else:
            version = str(existing.version)
            log.warning("%s v%s has no completed gate (an interrupted register run): finishing it", job.name, version)
        decision = gate_and_move(job.client, _gate_request(job, version), lease)
    return version, existing is None, decision


def _gate_record(job: RegisterJob, version: str, created: bool, decision: GateDecision | None) -> dict[str, Any]:
    """The ``gate`` entry of ``registered.json``: this run's decision, or the recorded one of a reused version."""
    name = job.name
    if decision is not None:
        record = decision.to_dict()
        if not created:
            record["note"] = f"finished the gate of {name} v{version}, left incomplete by an interrupted run"
        log.info("%s %s v%s: %s", "registered" if created else "gated", name, version, decision.reason)
        return record
    tags = job.client.get_model_version(name, version).tags or {}
    record = GateDecision.from_tags(tags).to_dict()
    note = (f"weights unchanged (sha256 {job.inputs.sha[:12]}): {name} v{version} reused, no new version, no alias "
            "moved")
    if tags.get("birefnet.eval_sha256") not in (None, job.inputs.eval_sha):
        note += ("; its metrics differ from this eval.json: its recorded gate decision stands (use "
                 "birefnet promote to act on new scores)")
    record["note"] = note
    log.info("%s", note)
    return record


def _register_in_run(job: RegisterJob) -> dict[str, Any]:
    """The body of :func:`register` inside the active run: log, register (or reuse), gate, record."""
    import mlflow

    client, name = job.client, job.name
    data_tags = _log_run_inputs(job)
    model_uri = None if find_version_by_sha(client, name, job.inputs.sha) is not None else _log_model(job)
    version, created, decision = _create_or_finish(job, model_uri, _version_tags(job, data_tags))
    gate_record = _gate_record(job, version, created, decision)
    mlflow.set_tags({"birefnet.registered_version": version, "birefnet.register.created": str(created).lower(),
                     "birefnet.gate.decision": str(gate_record.get("decision", ""))})
    champion = get_alias(client, name, CHAMPION)
    challenger = get_alias(client, name, CHALLENGER)
    return {
        "model_name": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "created": created,
        "content_sha256": job.inputs.sha,
        "eval_sha256": job.inputs.eval_sha,
        "aliases": version_aliases(client, name, version),
        "champion_version": str(champion.version) if champion else None,
        "challenger_version": str(challenger.version) if challenger else None,
        "gate": gate_record,
    }


def _write_record(out: Path, record: Mapping[str, Any]) -> None:
    """``registered.json``, written atomically, and logged to the active run."""
    import mlflow

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(out)
    mlflow.log_artifact(str(out), "registry")


def _start_job(params: Params, base: Path, inputs: RegisterInputs, uri: str) -> RegisterJob:
    """Set up the experiment and registry, start the register run, and describe the job."""
    import mlflow

    from birefnet.tracking import ensure_experiment

    uri, experiment_id = ensure_experiment(params.tracking, base)
    mlflow.set_registry_uri(uri)
    commit, digest = code_version(base), data_digest(params, base)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=f"register-{inputs.sha[:12]}",
                           tags=_run_tags(params.register.model_name, inputs, commit, digest))
    return RegisterJob(mlflow_client(uri), params, base, run.info.run_id, inputs,
                       LockSettings.from_params(params, uri, base), commit, digest)


def register(params: Params, base: str | Path | None = None) -> dict[str, Any]:
    """Log, register and gate the trained model; write and return the ``registered.json`` record.

    One MLflow run per call (tag ``birefnet.stage: register``) carries the flattened params, the per-set
    metrics, the data version (shard index digests and dvc.lock hashes as inputs), the evaluation report and
    the decision. Unchanged weights (same sha256) reuse their version: nothing is logged as a model and no
    alias moves, unless that version's gate never completed (a crashed run): then the gate is finished.

    Args:
        params: the pipeline params (``register``, ``tracking``, ``data.test_sets``, ``data.size``).
        base: the folder relative paths are resolved against (default: the working directory).

    Raises:
        RegistryError: a missing model or eval file, metrics missing a test set, metrics of other weights; the
            tracking server is unreachable or refuses the credentials; the gate lock stays held (GateLockError).
    """
    from mlflow.exceptions import MlflowException

    from birefnet.tracking import redact_uri, resolve_tracking_uri

    start = time.perf_counter()
    base = Path(base or Path.cwd())
    inputs = read_inputs(params, base)
    uri = resolve_tracking_uri(params.tracking, base)
    with reachable_tracking(uri):
        try:
            job = _start_job(params, base, inputs, uri)
            with _ending_run():
                record = _register_in_run(job)
                record.update({"tracking_uri": redact_uri(uri), "run_id": job.run_id,
                               "seconds": round(time.perf_counter() - start, 2)})
                _write_record(base / params.register.out, record)
        except MlflowException as exc:
            raise explain(exc, uri) from None
    return record
