"""MLflow model registry for BiRefNet: versions, aliases ``challenger``/``champion`` and the promotion gate.

A registered version is identified by the sha256 of its safetensors file (version tag
``birefnet.content_sha256``): registering unchanged weights again reuses the version. Every new version gets
the alias ``challenger``; the gate then compares it with the ``champion`` on the primary metric (its mean over
the same test sets, read from the versions' ``birefnet.eval.sets`` tags) and moves ``champion`` only when the
challenger improves by at least ``register.min_delta`` (strictly better; the first model becomes champion).
The champion is never replaced by a worse, equal or incomparable version except by ``birefnet promote
--force``, and every move leaves an audit tag on both versions.

Concurrency: MLflow has no compare-and-set on aliases, so the read-champion / compare / move-alias sequence runs
under a registry-wide gate lock (:mod:`birefnet.gate_lock`: a PostgreSQL advisory lock, a lock file, or a lease
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
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import hashlib
import json
import logging
import math
import os
import random
import socket
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from birefnet.config import GATE_METRICS, Params
from birefnet.gate_lock import GateLease, hold, open_gate_lock
from birefnet.stages.common import StageInputError, add_params_args, run_stage

log = logging.getLogger("birefnet.registry")

CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_SHA = "birefnet.content_sha256"
TAG_EVAL_SETS = "birefnet.eval.sets"
TAG_HISTORY = "birefnet.champion_history"
GATE_PREFIX = "birefnet.gate."
#: ``pending`` once the decision is written, ``done`` once aliases, history and audit are; absent before.
TAG_GATE_STATE = "birefnet.gate_state"
AUDIT_PREFIX = "birefnet.audit."
#: Decisions written to ``birefnet.gate.decision``; the first two moved ``champion``.
PROMOTING = ("first", "promoted")
#: How often the gate decides again when the champion moved between its decision and the alias move.
CAS_ATTEMPTS = 5


class RegistryError(StageInputError):
    """A registry operation was refused or failed; the message says why and what to do (exit code 3)."""


# ----------------------------------------------------------------------------------------- scores, gate


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_content_hash(path: str | Path) -> str:
    """sha256 identifying a safetensors model by content: the header JSON with sorted keys, then the tensor bytes.

    The raw file is not canonical: safetensors writes its metadata map in hash order, so saving the same weights
    twice can give different bytes. Files that are not safetensors fall back to the sha256 of their bytes.
    """
    import struct

    with open(path, "rb") as fh:
        prefix = fh.read(8)
        try:
            (size,) = struct.unpack("<Q", prefix)
            if size > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(fh.read(size))
        except (struct.error, ValueError):
            return sha256_file(path)
        h = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def set_metrics(eval_doc: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The numeric per-set metrics of an ``eval.json`` document: ``{set: {metric: value}}``."""
    sets = eval_doc.get("sets")
    if not isinstance(sets, Mapping) or not sets:
        raise RegistryError("eval metrics have no 'sets' (expected the evaluate stage's eval.json)")
    return {name: {k: float(v) for k, v in values.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and k != "n" and math.isfinite(v)}
            for name, values in sets.items()}


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


# --------------------------------------------------------------------------------------- client helpers


def _client(uri: str) -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _error_code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", ""))


def _version_metrics(version: Any) -> dict[str, dict[str, float]] | None:
    raw = (version.tags or {}).get(TAG_EVAL_SETS)
    if not raw:
        return None
    try:
        return {k: {m: float(x) for m, x in v.items()} for k, v in json.loads(raw).items()}
    except (ValueError, AttributeError, TypeError):
        return None


def get_alias(client: Any, name: str, alias: str) -> Any | None:
    """The model version behind ``name@alias``, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def find_version_by_sha(client: Any, name: str, sha: str) -> Any | None:
    """The oldest version of ``name`` whose ``birefnet.content_sha256`` tag is ``sha``, or None."""
    matches = []
    token = None
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=1000, page_token=token)
        matches += [v for v in page if (v.tags or {}).get(TAG_SHA) == sha]
        token = getattr(page, "token", None)
        if not token:
            break
    return min(matches, key=lambda v: int(v.version)) if matches else None


def _champion_history(client: Any, name: str) -> list[str]:
    model = client.get_registered_model(name)
    try:
        return [str(v) for v in json.loads((model.tags or {}).get(TAG_HISTORY, "[]"))]
    except ValueError:
        return []


def _set_champion_history(client: Any, name: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, TAG_HISTORY, json.dumps(history[-200:]))


def _audit(client: Any, name: str, versions: Sequence[str | None], record: Mapping[str, Any]) -> str:
    """Write one audit record as a ``birefnet.audit.<UTC time>`` tag on each of ``versions``; return the key."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    key = f"{AUDIT_PREFIX}{stamp}"
    value = json.dumps({"at": stamp, "by": _actor(), **record}, sort_keys=True)
    for version in dict.fromkeys(v for v in versions if v is not None):
        client.set_model_version_tag(name, version, key, value)
    return key


def _actor() -> str:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if not user:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknown"
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class LockSettings:
    """Where the gate lock lives and how long to wait for it (``register.lock_*``, ``register.lease_s``).

    Attributes:
        tracking_uri: the tracking URI in use (the lock is derived from it when ``lock_uri`` is empty).
        lock_uri: ``postgresql://...``, a lock file, ``mlflow`` or empty (see
            :func:`birefnet.gate_lock.open_gate_lock`).
        timeout_s: the longest wait for another holder.
        lease_s: how long a holder may go without a heartbeat before its lease is stale.
        base: the folder a relative lock file is resolved against.
    """

    tracking_uri: str
    lock_uri: str = ""
    timeout_s: float = 120.0
    lease_s: float = 30.0
    base: Path | None = None

    @classmethod
    def from_params(cls, params: Params, tracking_uri: str, base: Path | None = None) -> LockSettings:
        """The settings of ``params.register`` for ``tracking_uri``."""
        rp = params.register
        return cls(tracking_uri, rp.lock_uri, rp.lock_timeout_s, rp.lease_s, base)


@contextlib.contextmanager
def gate_lock(client: Any, name: str, settings: LockSettings) -> Iterator[GateLease]:
    """Hold the gate lock of ``name`` (renewed by a heartbeat thread) for the block; yield the lease.

    Raises:
        GateLockError: another holder kept it for ``settings.timeout_s`` (exit code 3).
    """
    owner = f"{_actor()}:{random.getrandbits(32):08x}"
    lock = open_gate_lock(settings.lock_uri, settings.tracking_uri, client, name, owner, settings.lease_s,
                          settings.base)
    with hold(lock, settings.timeout_s, settings.lease_s) as lease:
        log.debug("%s held by %s", lock.describe(), owner)
        yield lease


def _test_hook(point: str) -> None:
    """Crash (``BIREFNET_TEST_CRASH_AT=point``) or pause (``BIREFNET_TEST_PAUSE_AT=point:seconds``) for tests."""
    if os.environ.get("BIREFNET_TEST_CRASH_AT") == point:
        os._exit(137)
    where, _, seconds = os.environ.get("BIREFNET_TEST_PAUSE_AT", "").partition(":")
    if where == point:
        time.sleep(float(seconds or 1))


def _move_champion(client: Any, name: str, expected: str | None, target: str, lease: GateLease) -> bool:
    """Compare-and-set: move ``champion`` to ``target`` only if it is still ``expected``; False if it moved."""
    lease.ensure_held()
    champion = get_alias(client, name, CHAMPION)
    if (str(champion.version) if champion else None) != expected:
        return False
    client.set_registered_model_alias(name, CHAMPION, target)
    return True


# ------------------------------------------------------------------------------------------ the model


def pip_requirements() -> list[str]:
    """Pinned requirements of the pyfunc model (given explicitly: inferring them costs 7-17 s per log)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("mlflow", "torch", "torchvision", "timm", "safetensors", "numpy", "opencv-python-headless",
                 "pydantic", "pyyaml"):
        try:
            out.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            out.append(dist)
    return out


#: The parts of the ``birefnet`` package a served model imports (shipped as its code: fewer files to upload).
MODEL_CODE = ("__init__.py", "config.py", "serving.py", "predict.py", "pyfunc_model.py", "models",
              "data/gradients.py")


def _package_copy(dst: Path) -> Path:
    """A copy of the parts of ``birefnet`` that serving needs (no caches), to ship as the model's code."""
    import shutil

    import birefnet

    src = Path(birefnet.__file__).parent
    target = dst / "birefnet"
    for rel in MODEL_CODE:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        if (src / rel).is_dir():
            shutil.copytree(src / rel, target / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src / rel, target / rel)
    return target


def example_image(size: int = 64) -> Any:
    """A deterministic ``(1, size, size, 3)`` uint8 batch: the logged input example."""
    import numpy as np

    ramp = np.linspace(0, 255, size, dtype=np.float32)
    image = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                      np.full((size, size), 128, np.float32)], axis=2)
    return image.astype(np.uint8)[None]


def log_pyfunc_model(model_path: Path, size: Sequence[int], max_image_pixels: int | None = None) -> Any:
    """Log the safetensors model as a pickle-free pyfunc (models from code) in the active run.

    ``max_image_pixels`` (``serving.max_image_pixels``) goes into the model config: the served model refuses
    bigger request images (the serving module's default without it).

    Returns:
        MLflow's ``ModelInfo`` (``model_uri`` is ``models:/m-<id>``).
    """
    import tempfile

    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from birefnet.serving import WEIGHTS_ARTIFACT

    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                               outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]))
    with tempfile.TemporaryDirectory(prefix="birefnet-model-") as tmp:
        code = _package_copy(Path(tmp))
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code / "pyfunc_model.py"),
            artifacts={WEIGHTS_ARTIFACT: str(model_path)},
            code_paths=[str(code)],
            model_config={"size": [int(v) for v in size], "batch_size": 4,
                          **({"max_image_pixels": int(max_image_pixels)} if max_image_pixels else {})},
            signature=signature,
            input_example=example_image(),
            pip_requirements=pip_requirements(),
        )


# ------------------------------------------------------------------------------------- data version


def _data_inputs(params: Params, base: Path) -> tuple[list[tuple[Any, str]], dict[str, str]]:
    """Datasets for ``log_inputs`` (shard indexes and dvc.lock outs) and the matching run tags."""
    import yaml
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    datasets: list[tuple[Any, str]] = []
    tags: dict[str, str] = {}

    def source(path: Path) -> Any:
        with warnings.catch_warnings():  # a local path matches two equivalent artifact sources; MLflow warns
            warnings.simplefilter("ignore", UserWarning)
            return resolve_dataset_source(str(path.resolve()))

    shard_root = base / params.shard.out
    for split in ("train", "val", "test"):
        index = shard_root / split / "index.json"
        if index.is_file():
            digest = sha256_file(index)
            tags[f"birefnet.data.{split}_index_sha256"] = digest
            datasets.append((MetaDataset(source(index),
                                         name=f"{params.shard.out}/{split}", digest=digest[:32]), split))
    lock = base / "dvc.lock"
    if lock.is_file():
        tags["birefnet.dvc_lock_sha256"] = sha256_file(lock)
        try:
            doc = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            doc = {}
        for stage, body in (doc.get("stages") or {}).items():
            if stage in ("train", "evaluate", "register"):
                continue  # the model and its metrics are logged as themselves
            for out in (body or {}).get("outs") or []:
                md5 = out.get("md5")
                if md5 and out.get("path"):
                    datasets.append((MetaDataset(source(base / out["path"]),
                                                 name=f"dvc:{out['path']}", digest=str(md5)[:32]), f"dvc.{stage}"))
    return datasets, tags


def _data_digest(params: Params, base: Path) -> str:
    """The train stage's data digest (train and val shard indexes), or ``unknown`` without shards."""
    h = hashlib.sha256()
    found = False
    for split in ("train", "val"):
        index = base / params.shard.out / split / "index.json"
        if index.is_file():
            h.update(index.read_bytes())
            found = True
    return h.hexdigest() if found else "unknown"


# ---------------------------------------------------------------------------------------- register


def _version_aliases(client: Any, name: str, version: str) -> list[str]:
    return sorted(client.get_model_version(name, version).aliases or [])


def gate_done(tags: Mapping[str, str]) -> bool:
    """Whether a version's gate completed (state ``done``, or a decision from before the state tag existed)."""
    state = tags.get(TAG_GATE_STATE)
    return state == "done" or (state is None and bool(tags.get(GATE_PREFIX + "decision")))


def _record_move(client: Any, name: str, version: str, decision: GateDecision, run_id: str | None) -> None:
    """Champion history and audit tag of a gate promotion (idempotent: a rerun after a crash adds what is missing)."""
    history = _champion_history(client, name)
    if not history or history[-1] != version:
        _set_champion_history(client, name, [*history, version])
    tags = client.get_model_version(name, version).tags or {}
    for key, value in tags.items():
        if key.startswith(AUDIT_PREFIX):
            with contextlib.suppress(ValueError, AttributeError):
                record = json.loads(value)
                if record.get("action") == "gate" and record.get("to_version") == version:
                    return
    _audit(client, name, [version, decision.champion_version],
           {"action": "gate", "from_version": decision.champion_version, "to_version": version,
            "decision": decision.decision, "forced": False, "reason": decision.reason, "run_id": run_id})


def _gate_and_move(client: Any, name: str, version: str, metrics: Mapping[str, Mapping[str, float]],
                   metric: str, min_delta: float, sets: Sequence[str], run_id: str | None,
                   lease: GateLease) -> GateDecision:
    """Under the gate lock: decide, move the aliases (compare-and-set on the champion), record history and audit.

    The decision is tagged (state ``pending``) before any alias moves and the state set to ``done`` last, so a
    rerun finishes a gate an interrupted run left: a pending decision still stands while the champion it was
    taken against is champion (or the interrupted run already moved the champion to ``version``).

    Raises:
        RegistryError: the champion kept moving under the decision ``CAS_ATTEMPTS`` times.
        GateLockError: the lease was lost before an alias moved.
    """
    tags = client.get_model_version(name, version).tags or {}
    pending = GateDecision.from_tags(tags) if tags.get(TAG_GATE_STATE) == "pending" else None
    for _ in range(CAS_ATTEMPTS):
        champion = get_alias(client, name, CHAMPION)
        current = str(champion.version) if champion else None
        if pending is not None and current in (pending.champion_version, version):
            decision = pending
        else:
            decision = gate(metrics, _version_metrics(champion) if champion else None, current, metric, min_delta,
                            sets)
            for key, value in {**decision.to_tags(), TAG_GATE_STATE: "pending"}.items():
                client.set_model_version_tag(name, version, key, value)
            pending = decision
        _test_hook("gate_decided")
        lease.ensure_held()
        if decision.promote and current != version and not _move_champion(client, name, current, version, lease):
            log.warning("%s: champion moved away from v%s while v%s was gated: deciding again", name, current, version)
            pending = None
            continue
        client.set_registered_model_alias(name, CHALLENGER, version)
        break
    else:
        raise RegistryError(f"{name}: the champion moved {CAS_ATTEMPTS} times while v{version} was gated (someone "
                            "moves it without the gate lock?); rerun the register stage to finish the gate")
    if decision.promote:
        _test_hook("champion_moved")
        _record_move(client, name, version, decision, run_id)
    client.set_model_version_tag(name, version, TAG_GATE_STATE, "done")
    return decision


def _eval_binding(eval_doc: Mapping[str, Any], model_path: Path, eval_path: Path) -> None:
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


def _read_inputs(params: Params, base: Path) -> tuple[Path, Path, dict[str, dict[str, float]], list[str]]:
    """The model and eval paths, the per-set metrics and the test sets, checked.

    Raises:
        StageInputError: a missing or invalid file, metrics missing a test set, or metrics of other weights.
    """
    from birefnet.publish import finish_pending

    rp = params.register
    model_path, eval_path = base / rp.model, base / rp.metrics
    for folder in dict.fromkeys((model_path.parent, eval_path.parent)):
        finish_pending(folder)  # a train or evaluate run killed after its commit point left its outputs half-swapped
    if not model_path.is_file():
        raise StageInputError(f"model {rp.model} not found: run the train stage first (birefnet train)")
    if not eval_path.is_file():
        raise StageInputError(f"metrics {rp.metrics} not found: run the evaluate stage first (birefnet evaluate)")
    try:
        eval_doc = json.loads(eval_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise StageInputError(f"{rp.metrics}: not valid JSON ({exc})") from exc
    if not isinstance(eval_doc, Mapping):
        raise StageInputError(f"{rp.metrics}: expected a JSON object (the evaluate stage's eval.json)")
    metrics = set_metrics(eval_doc)
    sets = list(params.data.test_sets)
    missing = [s for s in sets if rp.primary_metric not in metrics.get(s, {})]
    if missing:
        raise StageInputError(f"{rp.metrics} has no {rp.primary_metric} for test set(s) {missing} of data.test_sets "
                              f"{sets}: re-run the evaluate stage")
    _eval_binding(eval_doc, model_path, eval_path)
    return model_path, eval_path, metrics, sets


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
        StageInputError: a missing model or eval file, metrics missing a test set, or metrics of other weights.
        RegistryError: the tracking server is unreachable, refuses the credentials, or the lock stays held.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from birefnet.tracking import (
        ensure_experiment,
        git_commit,
        redact_uri,
        resolve_tracking_uri,
    )

    start = time.perf_counter()
    base = Path(base or Path.cwd())
    rp = params.register
    model_path, eval_path, metrics, sets = _read_inputs(params, base)
    sha = model_content_hash(model_path)
    eval_sha = sha256_file(eval_path)
    uri = resolve_tracking_uri(params.tracking, base)
    train_summary = {}
    train_json = model_path.parent / "train.json"
    if train_json.is_file():
        with contextlib.suppress(ValueError):
            train_summary = json.loads(train_json.read_text(encoding="utf-8"))

    with reachable_tracking(uri):
        try:
            uri, experiment_id = ensure_experiment(params.tracking, base)
        except MlflowException as exc:
            raise _explain(exc, uri) from None
        mlflow.set_registry_uri(uri)
        client = _client(uri)
        name = rp.model_name
        commit = git_commit(base) or "unknown"
        digest = _data_digest(params, base)
        run_name = f"register-{sha[:12]}"
        run_tags = {"birefnet.stage": "register", "birefnet.run_name": str(train_summary.get("run_name", run_name)),
                    "mlflow.source.git.commit": commit, "birefnet.data_digest": digest, TAG_SHA: sha,
                    "birefnet.model_name": name}
        if train_summary.get("mlflow_run_id"):
            run_tags["birefnet.train_run_id"] = str(train_summary["mlflow_run_id"])
        try:
            run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=run_tags)
        except MlflowException as exc:
            raise _explain(exc, uri) from None
        run_id = run.info.run_id
        status = "FAILED"
        try:
            job = _Job(client, params, base, name, run_id, sha, eval_sha, metrics, sets, model_path, eval_path,
                       LockSettings.from_params(params, uri, base))
            record = _register_in_run(job, commit, digest, train_summary)
            record.update({"tracking_uri": redact_uri(uri), "run_id": run_id,
                           "seconds": round(time.perf_counter() - start, 2)})
            out = base / rp.out
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            tmp.replace(out)
            mlflow.log_artifact(str(out), "registry")
            status = "FINISHED"
        except MlflowException as exc:
            raise _explain(exc, uri) from None
        finally:
            mlflow.end_run(status=status)
    return record


@dataclass(frozen=True)
class _Job:
    """What one register call works on (passed between its steps)."""

    client: Any
    params: Params
    base: Path
    name: str
    run_id: str
    sha: str
    eval_sha: str
    metrics: Mapping[str, Mapping[str, float]]
    sets: list[str]
    model_path: Path
    eval_path: Path
    lock: LockSettings


def _log_run_inputs(job: _Job) -> dict[str, str]:
    """Params, metrics, data version and the evaluation files into the active run; return the data tags."""
    import mlflow
    from mlflow.entities import Metric, Param

    from birefnet.config import params_to_dict
    from birefnet.tracking import flatten, redact_uri

    params, base, rp = job.params, job.base, job.params.register
    flat = flatten("", params_to_dict(params))
    if flat.get("register.lock_uri"):
        flat["register.lock_uri"] = redact_uri(flat["register.lock_uri"])
    items = list(flat.items())
    for i in range(0, len(items), 100):
        job.client.log_batch(job.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
    now = int(time.time() * 1000)
    metric_list = [Metric(f"{s}.{m}", v, now, 0) for s, values in job.metrics.items() for m, v in values.items()]
    metric_list.append(Metric(f"gate.{rp.primary_metric}", primary_score(job.metrics, rp.primary_metric, job.sets),
                              now, 0))
    for i in range(0, len(metric_list), 500):
        job.client.log_batch(job.run_id, metrics=metric_list[i:i + 500])
    datasets, data_tags = _data_inputs(params, base)
    for dataset, context in datasets:
        mlflow.log_input(dataset, context=context)
    mlflow.set_tags(data_tags)
    mlflow.log_artifact(str(job.eval_path), "evaluation")
    plots = base / params.evaluate.plots / "png"
    if plots.is_dir():
        mlflow.log_artifacts(str(plots), "evaluation/plots")
    lock_file = base / "dvc.lock"
    if lock_file.is_file():
        mlflow.log_artifact(str(lock_file), "data")
    return data_tags


def _log_model(job: _Job) -> str:
    """Log the model of ``job`` with its serving limits; return its ``models:/m-<id>`` URI."""
    return log_pyfunc_model(job.model_path, job.params.data.size, job.params.serving.max_image_pixels).model_uri


def _create_or_finish(job: _Job, model_uri: str | None, version_tags: Mapping[str, str],
                      ) -> tuple[str, bool, GateDecision | None]:
    """Under the gate lock: register a new version and gate it, or finish the gate of an existing version.

    Returns:
        (version, created, decision); the decision is None when the existing version's gate had completed.
    """
    import mlflow

    client, name, rp = job.client, job.name, job.params.register
    with gate_lock(client, name, job.lock) as lease:
        existing = find_version_by_sha(client, name, job.sha)
        if existing is None and model_uri is None:  # the version found before the lock was deleted meanwhile
            model_uri = _log_model(job)
        if existing is not None and gate_done(existing.tags or {}):
            return str(existing.version), False, None
        created = existing is None
        if created:
            version = mlflow.register_model(model_uri, name, tags=dict(version_tags),
                                            await_registration_for=rp.await_registration_s)
            version_id = str(version.version)
            _test_hook("after_version_created")
        else:
            version_id = str(existing.version)
            log.warning("%s v%s has no completed gate (an interrupted register run): finishing it", name, version_id)
        decision = _gate_and_move(client, name, version_id, job.metrics, rp.primary_metric, rp.min_delta, job.sets,
                                  job.run_id, lease)
    return version_id, created, decision


def _register_in_run(job: _Job, commit: str, digest: str, train_summary: Mapping[str, Any]) -> dict[str, Any]:
    """The body of :func:`register` inside the active run: log, register (or reuse), gate, record."""
    import mlflow

    client, name, sha, eval_sha = job.client, job.name, job.sha, job.eval_sha
    data_tags = _log_run_inputs(job)
    existing = find_version_by_sha(client, name, sha)
    model_uri = None
    if existing is None:
        model_uri = _log_model(job)
    eval_tag = json.dumps({s: {m: round(v, 6) for m, v in job.metrics[s].items()} for s in sorted(job.metrics)},
                          separators=(",", ":"), sort_keys=True)
    version_tags = {TAG_SHA: sha, TAG_EVAL_SETS: eval_tag, "birefnet.eval_sha256": eval_sha,
                    "birefnet.register_run_id": job.run_id, "birefnet.git_commit": commit,
                    "birefnet.data_digest": digest, **data_tags}
    if train_summary.get("mlflow_run_id"):
        version_tags["birefnet.train_run_id"] = str(train_summary["mlflow_run_id"])
    version_id, created, decision = _create_or_finish(job, model_uri, version_tags)
    if decision is not None:
        gate_record = decision.to_dict()
        if not created:
            gate_record["note"] = f"finished the gate of {name} v{version_id}, left incomplete by an interrupted run"
        log.info("%s %s v%s: %s", "registered" if created else "gated", name, version_id, decision.reason)
    else:
        tags = client.get_model_version(name, version_id).tags or {}
        gate_record = GateDecision.from_tags(tags).to_dict()
        note = f"weights unchanged (sha256 {sha[:12]}): {name} v{version_id} reused, no new version, no alias moved"
        if tags.get("birefnet.eval_sha256") not in (None, eval_sha):
            note += ("; its metrics differ from this eval.json: its recorded gate decision stands (use "
                     "birefnet promote to act on new scores)")
        gate_record["note"] = note
        log.info("%s", note)
    mlflow.set_tags({"birefnet.registered_version": version_id, "birefnet.register.created": str(created).lower(),
                     "birefnet.gate.decision": str(gate_record.get("decision", ""))})
    champion = get_alias(client, name, CHAMPION)
    challenger = get_alias(client, name, CHALLENGER)
    return {
        "model_name": name,
        "version": version_id,
        "model_uri": f"models:/{name}/{version_id}",
        "created": created,
        "content_sha256": sha,
        "eval_sha256": eval_sha,
        "aliases": _version_aliases(client, name, version_id),
        "champion_version": str(champion.version) if champion else None,
        "challenger_version": str(challenger.version) if challenger else None,
        "gate": gate_record,
    }


@contextlib.contextmanager
def reachable_tracking(uri: str) -> Iterator[None]:
    """Bounded MLflow HTTP retries for the block, after checking that the tracking server answers.

    Raises:
        RegistryError: the server does not answer (the message names the URI).
    """
    from birefnet.tracking import TrackingUnavailableError, bounded_http_retries, check_tracking_server

    with bounded_http_retries():
        try:
            check_tracking_server(uri)
        except TrackingUnavailableError as exc:
            raise RegistryError(str(exc)) from None
        yield


def _explain(exc: BaseException, uri: str) -> RegistryError:
    """A clear message for MLflow errors a person can act on (auth, unreachable)."""
    from birefnet.tracking import redact_uri

    code = _error_code(exc)
    text = str(exc)
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or "401" in text or "403" in text:
        return RegistryError(f"MLflow at {redact_uri(uri)} refused the request ({code or 'HTTP 401/403'}): set "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for a "
                             f"user with access. Server said: {text[:300]}")
    return RegistryError(f"MLflow at {redact_uri(uri)} failed: {text[:500]}")


# ------------------------------------------------------------------------------------------ promote


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
        ``{"action", "from_version", "to_version", "forced", "scores", "audit_tag"}``.

    Raises:
        RegistryError: a check failed, the version does not exist, there is nothing to roll back to, or the
            champion moved meanwhile.
        GateLockError: the gate lock stayed held by another command.
    """
    from mlflow.exceptions import MlflowException

    if (version is None) == (not rollback):
        raise ValueError("give exactly one of version or rollback")
    with gate_lock(client, name, lock) as lease:
        champion = get_alias(client, name, CHAMPION)
        current = str(champion.version) if champion else None
        history = _champion_history(client, name) if champion or rollback else []
        if rollback:
            if current is None:
                raise RegistryError(f"{name} has no champion: nothing to roll back")
            trail = list(history)
            while trail and trail[-1] == current:
                trail.pop()
            if not trail:
                raise RegistryError(f"{name}: no earlier champion than v{current} in the champion history")
            target = trail[-1]
        else:
            target = str(version)
            trail = [*history, target]
        try:
            target_version = client.get_model_version(name, target)
        except MlflowException as exc:
            raise RegistryError(f"{name} v{target} does not exist ({_error_code(exc)})") from None
        if target == current:
            return {"action": "noop", "from_version": current, "to_version": target, "forced": force,
                    "scores": {}, "audit_tag": None, "reason": f"v{target} is already champion"}
        target_metrics = _version_metrics(target_version)
        champion_metrics = _version_metrics(champion) if champion else None
        scores: dict[str, float | None] = {}
        with contextlib.suppress(KeyError):
            scores[target] = primary_score(target_metrics or {}, metric, sets)
        if current is not None:
            with contextlib.suppress(KeyError):
                scores[current] = primary_score(champion_metrics or {}, metric, sets)
        checks: list[str] = []
        if not force:
            status = str(getattr(target_version, "status", "READY"))
            if status != "READY":
                raise RegistryError(f"{name} v{target} is {status}, not READY; use --force to promote anyway")
            if target not in scores:
                raise RegistryError(f"{name} v{target} has no {metric} on all of {list(sets)} (tag {TAG_EVAL_SETS}); "
                                    "use --force to promote anyway")
            if current is not None and current not in scores:
                raise RegistryError(f"champion v{current} has no {metric} on all of {list(sets)}: not comparable; "
                                    "use --force to promote anyway")
            checks += ["ready", "comparable"]
            if not rollback and current is not None:
                decision = gate(target_metrics or {}, champion_metrics, current, metric, min_delta, sets)
                if not decision.promote:
                    raise RegistryError(f"gate refused v{target}: {decision.reason}. Use --force to promote anyway "
                                        "(the audit tag records it)")
                checks.append("gate")
        action = "rollback" if rollback else "promote"
        if not _move_champion(client, name, current, target, lease):
            raise RegistryError(f"{name}: the champion moved away from v{current} while this command checked "
                                f"v{target}; nothing changed: run it again")
        _set_champion_history(client, name, trail)
        audit_tag = _audit(client, name, [target, current],
                           {"action": action, "from_version": current, "to_version": target, "forced": force,
                            "checks": checks, "metric": metric, "scores": scores, "reason": reason})
    drop = ""
    if current in scores and target in scores:
        drop = f" ({metric} {scores[current]:.4f} -> {scores[target]:.4f})"
    log.warning("%s: champion moved v%s -> v%s by %s%s%s", name, current, target, action, " (forced)" if force else "",
                drop)
    return {"action": action, "from_version": current, "to_version": target, "forced": force, "scores": scores,
            "audit_tag": audit_tag, "reason": reason}


def _promote(params: Params, args: argparse.Namespace) -> None:
    from mlflow.exceptions import MlflowException

    from birefnet.tracking import (
        resolve_tracking_uri,
    )

    uri = resolve_tracking_uri(params.tracking)
    rp = params.register
    with reachable_tracking(uri):
        try:
            result = promote(_client(uri), rp.model_name, version=args.version, rollback=args.rollback,
                             force=args.force, reason=args.reason, metric=rp.primary_metric, min_delta=rp.min_delta,
                             sets=params.data.test_sets, lock=LockSettings.from_params(params, uri))
        except MlflowException as exc:
            raise _explain(exc, uri) from None
    print(json.dumps(result, indent=2, sort_keys=True))


def get_args_parser() -> argparse.ArgumentParser:
    """Parser of ``birefnet promote``."""
    parser = argparse.ArgumentParser(
        prog="birefnet promote",
        description="Move the champion alias of register.model_name by hand. --version N applies the register "
                    "stage's gate (N must beat the champion on register.primary_metric over data.test_sets by "
                    "register.min_delta); --rollback returns to the previous champion. Both need a READY, comparable "
                    "version unless --force; each leaves an audit tag (birefnet.audit.<time>) on both versions.")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--version", type=str, help="model version number to make champion")
    target.add_argument("--rollback", action="store_true", help="make the previous champion champion again")
    parser.add_argument("--force", action="store_true", help="skip the checks (recorded in the audit tag)")
    parser.add_argument("--reason", default="", help="why (recorded in the audit tag)")
    return add_params_args(parser)


def main(argv: list[str] | None = None) -> int:
    """``birefnet promote``: exit 0 on success, 3 when refused (the message says why)."""
    args = get_args_parser().parse_args(argv)
    return run_stage("promote", _promote, args)


if __name__ == "__main__":
    raise SystemExit(main())
