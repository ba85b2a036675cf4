"""``train`` stage: BiRefNet on Ray Train with the staged schedule; the best model by validation S-measure.

Reads ``<shard.out>/train`` and ``<shard.out>/val`` shards and params ``model``, ``train``, ``loader``,
``data.size``, ``gradients.mode``, ``tracking``; writes ``<train.out>/model.safetensors`` (best by validation
S-measure), ``<train.out>/train.json`` (summary, per-epoch history and the model's ``model_sha256``) and
``<train.out>/history.csv`` (a DVC plot), all three published together (:func:`publish_outputs`). Ray
checkpoints live under ``train.storage_path`` (outside the DVC cache); rerunning the stage with the same params
and data resumes the same run instead of starting over.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from birefnet.config import Params, params_to_dict
from birefnet.hashing import training_data_digest
from birefnet.stages.common import StageInputError, add_params_args, run_stage

log = logging.getLogger("birefnet.train")


def data_digest(params: Params) -> str:
    """Digest of the shard indexes the run reads (train and val: :func:`birefnet.hashing.training_data_digest`)."""
    from birefnet.data.shards import join_location
    from birefnet.hashing import read_optional_bytes

    index = join_location(params.shard.out, "train", "index.json")
    if read_optional_bytes(index) is None:
        raise StageInputError(f"{index} not found: run the shard stage first (birefnet shard)")
    return str(training_data_digest(params.shard.out))


OUTPUT_NAMES = ("model.safetensors", "history.csv", "train.json")
"""The stage's outputs in ``train.out``, in publication order: ``train.json`` (which names the model's sha256) last."""


def write_history_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """The per-epoch history as the CSV DVC plots (one row per epoch)."""
    keys = ["epoch", "stage", "lr", "train_loss", "val_Sm", "val_MAE", "val_maxF", "val_wF", "val_meanE"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for rec in history:
            writer.writerow({k: rec.get(k, "") for k in keys})


def publish_outputs(out: Path, model_file: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Publish ``model.safetensors``, ``history.csv`` and ``train.json`` in ``out`` together, or not at all.

    The three are staged under temporary names in ``out`` and renamed in by :class:`birefnet.publish.OutputSet`:
    a run killed at any point leaves the previous three, or the new three (finished by the next run or reader),
    and never a new model beside an old ``train.json``. ``train.json`` records the sha256 of the model bytes
    published, so any reader can check the pair.

    Args:
        out: ``train.out``.
        model_file: the best checkpoint's weights (copied, not moved).
        summary: the ``train.json`` document; ``model_sha256`` is added.

    Returns:
        The summary written.
    """
    from birefnet.hashing import sha256_file
    from birefnet.publish import OutputSet

    model, history, summary_path = (out / name for name in OUTPUT_NAMES)
    with OutputSet("train", [model, history, summary_path]) as outputs:
        staged_model = outputs.staged(model)
        shutil.copyfile(model_file, staged_model)
        summary = {**summary, "model": str(model), "model_sha256": sha256_file(staged_model)}
        write_history_csv(outputs.staged(history), summary.get("history", []))
        outputs.staged(summary_path).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def start_system_metrics(run_id: str, tracking_uri: str) -> Any | None:
    """MLflow's system metrics monitor on the training run, started: CPU, memory, disk, network (and GPU when
    there is one) of the driver's node as ``system/*`` metrics, every 10 s (``MLFLOW_SYSTEM_METRICS_*``
    variables change the interval); the whole machine when Ray runs in-process.

    Returns:
        The monitor, or None when ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` is set to false.
    """
    import os

    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    if os.environ.get(MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.name, "").strip().lower() in ("false", "0", "no"):
        return None
    monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def end_run(client: Any, run_id: str, monitor: Any | None, status: str) -> None:
    """Stop the system metrics monitor (flushing its last samples), then end the run with ``status``."""
    if monitor is not None:
        monitor.finish()
    client.set_terminated(run_id, status=status)


def run(params: Params, fault: dict[str, Any] | None = None, probe_dir: str | None = None) -> dict[str, Any]:
    """Train (or resume) and write the stage outputs; return the summary written to ``train.json``."""
    import mlflow

    from birefnet.tracking import ensure_experiment, flatten, git_commit, log_params
    from birefnet.training.init import InitWeightsError, with_init_model_params
    from birefnet.training.trainer import fit, run_name_for

    try:  # model.* from train.init_from's file, and conflicting params refused, before Ray starts
        params = with_init_model_params(params)
    except InitWeightsError as exc:
        raise StageInputError(str(exc)) from None
    digest = data_digest(params)
    uri, experiment_id = ensure_experiment(params.tracking)
    name = run_name_for(params, digest)
    client = mlflow.MlflowClient(uri)
    run = client.create_run(experiment_id, run_name=name,
                            tags={"birefnet.stage": "train", "birefnet.run_name": name,
                                  "mlflow.source.git.commit": git_commit() or "unknown",
                                  "birefnet.data_digest": digest})
    run_id = run.info.run_id
    monitor = start_system_metrics(run_id, uri)
    try:
        log_params(client, run_id, flatten("", params_to_dict(params)))
        result = fit(params, data_digest=digest, mlflow_run_id=run_id, tracking_uri=uri, fault=fault,
                     probe_dir=probe_dir)
    except BaseException:
        end_run(client, run_id, monitor, "FAILED")
        raise
    out = Path(params.train.out)
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
    try:
        summary = publish_outputs(out, result.best_checkpoint / "model.safetensors", summary)
    except BaseException:
        end_run(client, run_id, monitor, "FAILED")
        raise
    finally:
        shutil.rmtree(result.best_checkpoint, ignore_errors=True)
    client.log_artifact(run_id, str(out / "train.json"))
    client.log_artifact(run_id, str(out / "history.csv"))
    end_run(client, run_id, monitor, "FINISHED")
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
