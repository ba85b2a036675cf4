"""``register`` stage: the trained model as an MLflow model version behind the promotion gate.

Reads ``register.model`` (the train stage's safetensors), ``register.metrics`` (the evaluate stage's
``eval.json``), the shard indexes and ``dvc.lock`` (the data version) and params ``register``, ``tracking``,
``data.test_sets``, ``data.size``; the gate compares on ``register.selection_sets`` (validation sets the evaluate
stage scored beside the reported test sets); logs one MLflow run, registers a version of ``register.model_name`` (reused
when the weights are unchanged), sets ``challenger`` and moves ``champion`` when the gate passes, and writes
``register.out`` (``registry/registered.json``: version, aliases, both scores, decision and reason).
Refuses (exit 3) an ``eval.json`` whose ``meta.model_sha256`` is not the sha256 of ``register.model``. The gate
runs under ``register.lock_uri`` (see :mod:`birefnet.registry.lock`); a rerun finishes a gate a crash
interrupted. See :mod:`birefnet.registry`; every :class:`~birefnet.registry.RegistryError` exits with code 3.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from birefnet.config import Params
from birefnet.registry import RegistryError, register
from birefnet.stages.common import add_params_args, run_stage

log = logging.getLogger("birefnet.register")


def run(params: Params, base: str | Path | None = None) -> dict[str, Any]:
    """Register the model and apply the gate; return the record written to ``register.out``."""
    return register(params, base=base)


def _run(params: Params, args: argparse.Namespace) -> None:
    record = run(params)
    gate = record["gate"]
    log.info("%s v%s (%s) aliases %s; champion v%s; %s (%.1f s)", record["model_name"], record["version"],
             "new" if record["created"] else "unchanged", ",".join(record["aliases"]) or "-",
             record["champion_version"], gate.get("note") or gate.get("reason"), record["seconds"])


def get_args_parser() -> argparse.ArgumentParser:
    """Parser of ``birefnet register``."""
    parser = argparse.ArgumentParser(
        prog="birefnet register",
        description="Log the trained model to MLflow as a pickle-free pyfunc (image in, mask out), register a "
                    "version of register.model_name (the same weights reuse their version), alias it challenger "
                    "and move champion only if register.primary_metric over register.selection_sets (validation; else "
                    "data.test_sets) improves by at least "
                    "register.min_delta. Tracking: MLFLOW_TRACKING_URI or tracking.uri (credentials from "
                    "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD). Writes register.out.")
    return add_params_args(parser)


def main(argv: list[str] | None = None) -> int:
    """Run the stage; exit 0, 2 (bad params) or 3 (bad input, unreachable or refusing tracking server)."""
    args = get_args_parser().parse_args(argv)
    return run_stage("register", _run, args, input_errors=(RegistryError,))


if __name__ == "__main__":
    raise SystemExit(main())
