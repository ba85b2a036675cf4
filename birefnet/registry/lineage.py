"""What a registered version is made of: its weights' content hash, the data version and the code version.

The register run records them: the flattened params, the shard indexes and ``dvc.lock`` outputs as MLflow
dataset inputs (with their digests as run tags), the training-data digest (the same as the train run's) and
the git commit.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from birefnet.config import Params
from birefnet.hashing import sha256_file, training_data_digest

#: dvc.lock stages whose outputs are not logged as data inputs: the model and its metrics are logged as themselves.
MODEL_STAGES = ("train", "evaluate", "register")


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


def data_digest(params: Params, base: Path) -> str:
    """The train stage's data digest (train and val shard indexes), or ``unknown`` without shards."""
    return training_data_digest(base / params.shard.out) or "unknown"


def code_version(base: Path) -> str:
    """The git commit of ``base`` (``-dirty`` with local changes), or ``unknown`` outside git."""
    from birefnet.tracking import git_commit

    return git_commit(base) or "unknown"


def log_params(client: Any, run_id: str, params: Params) -> None:
    """The flattened params into run ``run_id``, with the credentials of ``register.lock_uri`` masked."""
    from birefnet.config import params_to_dict
    from birefnet.tracking import flatten, redact_uri
    from birefnet.tracking import log_params as log_flat_params

    flat = flatten("", params_to_dict(params))
    if flat.get("register.lock_uri"):
        flat["register.lock_uri"] = redact_uri(flat["register.lock_uri"])
    log_flat_params(client, run_id, flat)


def _dataset_source(path: Path) -> Any:
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # a local path matches two equivalent artifact sources; MLflow warns
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(str(path.resolve()))


def _shard_inputs(params: Params, base: Path) -> tuple[list[tuple[Any, str]], dict[str, str]]:
    """One dataset per shard split index (train, val, test) and its ``birefnet.data.<split>_index_sha256`` tag."""
    from mlflow.data.meta_dataset import MetaDataset

    datasets: list[tuple[Any, str]] = []
    tags: dict[str, str] = {}
    for split in ("train", "val", "test"):
        index = base / params.shard.out / split / "index.json"
        if index.is_file():
            digest = sha256_file(index)
            tags[f"birefnet.data.{split}_index_sha256"] = digest
            datasets.append((MetaDataset(_dataset_source(index), name=f"{params.shard.out}/{split}",
                                         digest=digest[:32]), split))
    return datasets, tags


def _dvc_lock_inputs(base: Path) -> tuple[list[tuple[Any, str]], dict[str, str]]:
    """One dataset per output of the data stages in ``dvc.lock``, and the ``birefnet.dvc_lock_sha256`` tag."""
    import yaml
    from mlflow.data.meta_dataset import MetaDataset

    lock = base / "dvc.lock"
    if not lock.is_file():
        return [], {}
    try:
        doc = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        doc = {}
    datasets: list[tuple[Any, str]] = []
    for stage, body in (doc.get("stages") or {}).items():
        if stage in MODEL_STAGES:
            continue
        for out in (body or {}).get("outs") or []:
            md5 = out.get("md5")
            if md5 and out.get("path"):
                datasets.append((MetaDataset(_dataset_source(base / out["path"]), name=f"dvc:{out['path']}",
                                             digest=str(md5)[:32]), f"dvc.{stage}"))
    return datasets, {"birefnet.dvc_lock_sha256": sha256_file(lock)}


def data_inputs(params: Params, base: Path) -> tuple[list[tuple[Any, str]], dict[str, str]]:
    """Datasets for ``log_input`` with their contexts (shard indexes and dvc.lock outs) and the matching run tags."""
    shard_datasets, shard_tags = _shard_inputs(params, base)
    lock_datasets, lock_tags = _dvc_lock_inputs(base)
    return shard_datasets + lock_datasets, {**shard_tags, **lock_tags}


def log_data_inputs(params: Params, base: Path) -> dict[str, str]:
    """The data version into the active run (dataset inputs, digest tags, ``dvc.lock``); return the tags."""
    import mlflow

    datasets, tags = data_inputs(params, base)
    for dataset, context in datasets:
        mlflow.log_input(dataset, context=context)
    mlflow.set_tags(tags)
    lock_file = base / "dvc.lock"
    if lock_file.is_file():
        mlflow.log_artifact(str(lock_file), "data")
    return tags
