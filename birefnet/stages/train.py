"""``train`` stage: BiRefNet on Ray Train with the staged schedule; the best model by validation S-measure.

Reads ``<shard.out>/train`` and ``<shard.out>/val`` shards and params ``model``, ``train``, ``loader``,
``data.size``, ``gradients.mode``, ``tracking``; writes ``<train.out>/model.safetensors`` (best by validation
S-measure), ``<train.out>/train.json`` (summary and per-epoch history) and ``<train.out>/history.csv``
(a DVC plot). Ray checkpoints live under ``train.storage_path`` (outside the DVC cache); rerunning the stage
with the same params and data resumes the same run instead of starting over.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from birefnet.config import Params, params_to_dict
from birefnet.stages.common import StageInputError, add_params_args, run_stage

log = logging.getLogger("birefnet.train")


def data_digest(params: Params) -> str:
    """Digest of the shard indexes the run reads (train and val)."""
    h = hashlib.sha256()
    for split in ("train", "val"):
        index = Path(params.shard.out) / split / "index.json"
        if split == "train" and not index.is_file():
            raise StageInputError(f"{index} not found: run the shard stage first (birefnet shard)")
        if index.is_file():
            h.update(index.read_bytes())
    return h.hexdigest()


def write_history_csv(path: Path, history: list[dict[str, Any]]) -> None:
    keys = ["epoch", "stage", "lr", "train_loss", "val_Sm", "val_MAE", "val_maxF", "val_wF", "val_meanE"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for rec in history:
            writer.writerow({k: rec.get(k, "") for k in keys})


def run(params: Params, fault: dict[str, Any] | None = None, probe_dir: str | None = None) -> dict[str, Any]:
    """Train (or resume) and write the stage outputs; return the summary written to ``train.json``."""
    import mlflow

    from birefnet.tracking import ensure_experiment, flatten, git_commit
    from birefnet.training.trainer import fit, run_name_for

    digest = data_digest(params)
    uri, experiment_id = ensure_experiment(params.tracking)
    name = run_name_for(params, digest)
    client = mlflow.MlflowClient(uri)
    run = client.create_run(experiment_id, run_name=name,
                            tags={"birefnet.stage": "train", "birefnet.run_name": name,
                                  "mlflow.source.git.commit": git_commit() or "unknown",
                                  "birefnet.data_digest": digest})
    run_id = run.info.run_id
    try:
        flat = flatten("", params_to_dict(params))
        items = list(flat.items())
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i:i + 100]])
        result = fit(params, data_digest=digest, mlflow_run_id=run_id, tracking_uri=uri, fault=fault,
                     probe_dir=probe_dir)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    out = Path(params.train.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.best_checkpoint / "model.safetensors", out / "model.safetensors")
    shutil.rmtree(result.best_checkpoint, ignore_errors=True)
    summary = {
        "run_name": result.run_name,
        "mlflow_run_id": run_id,
        "storage_path": result.storage_path,
        "best_epoch": result.best_epoch,
        "best": {k: v for k, v in result.best_metrics.items() if isinstance(v, int | float)},
        "epochs": len(result.history),
        "stages": [s.model_dump() for s in params.train.stages],
        "seconds": round(result.seconds, 1),
        "history": result.history,
    }
    (out / "train.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    write_history_csv(out / "history.csv", result.history)
    client.log_artifact(run_id, str(out / "train.json"))
    client.log_artifact(run_id, str(out / "history.csv"))
    client.set_terminated(run_id, status="FINISHED")
    return summary


def _run(params: Params, args: argparse.Namespace) -> None:
    summary = run(params)
    best = summary["best"]
    log.info("best epoch %d of %d: val S-measure %.4f; model written to %s (%.0f s)", summary["best_epoch"] + 1,
             summary["epochs"], best.get("val_Sm", float("nan")), Path(params.train.out) / "model.safetensors",
             summary["seconds"])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="birefnet train",
        description="Train BiRefNet with Ray Train on the WebDataset shards, following the staged schedule in "
                    "train.stages (hybrid loss with multi-stage supervision, then region-loss fine-tuning). "
                    "In-process Ray on 127.0.0.1 by default, or the cluster at train.ray_address / RAY_ADDRESS. "
                    "Writes the best model (by validation S-measure) to train.out. Rerunning with the same "
                    "params and data resumes the interrupted run from its last checkpoint.")
    return add_params_args(parser)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_stage("train", _run, args)


if __name__ == "__main__":
    raise SystemExit(main())
