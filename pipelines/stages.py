"""One Prefect flow per DVC stage, each calling ``birefnet.stages.<stage>.run(params)``.

Every flow takes the same parameters:

- ``params_path``: the params file, relative to ``workdir`` (default ``params.yaml``).
- ``overrides``: ``key.path=value`` strings, validated like the file (the stages' ``--set``, DVC's ``-S``).
- ``workdir``: the repository root the stage paths are relative to (default: the current directory, which
  for a deployment is the folder its pull step sets).

Params are loaded and validated in a task without retries: a bad value fails the flow at once with the
message of :class:`~birefnet.config.ParamsError`. The stage itself runs in a task that retries transient
faults only (see :mod:`pipelines.common`).

Run one from the shell: ``python -m pipelines.stages ingest --set data.workers=1``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from birefnet.config import Params, load_params
from pipelines.common import RETRY_POLICY, working_directory

STAGES = ("synthesize", "ingest", "gradients", "shard", "train", "evaluate", "register")


def _summary(stage: str, result: Any) -> dict[str, Any]:
    """A small JSON-able view of a stage's return value, for the flow run's result and logs."""
    if stage == "ingest":
        return {"accepted": len(result.records), "quarantined": len(result.bad), "classes": len(result.classes)}
    if stage == "gradients":
        return {"labels": int(result)}
    if stage == "shard":
        return {split: {name: info["samples"] for name, info in index.sets.items()} for split, index in result.items()}
    if stage == "train":
        return {k: result[k] for k in ("run_name", "mlflow_run_id", "best_epoch", "best", "epochs", "seconds")
                if k in result}
    if stage == "evaluate":
        return dict(result.get("mean", {}))
    if isinstance(result, dict):
        return {str(k): v for k, v in result.items() if isinstance(v, str | int | float | bool | list | dict)}
    return {"result": repr(result)}


@task(name="load-params", task_run_name="load-params", cache_policy=NO_CACHE)
def load_stage_params(params_path: str, overrides: list[str]) -> Params:
    """Read and validate the params file with overrides (never retried: bad params stay bad)."""
    return load_params(params_path, overrides)


@task(name="run-stage", task_run_name="{stage}", cache_policy=NO_CACHE, **RETRY_POLICY)
def run_stage(stage: str, params: Params) -> dict[str, Any]:
    """Call ``birefnet.stages.<stage>.run(params)``; retried only on transient faults."""
    module = importlib.import_module(f"birefnet.stages.{stage}")
    result = module.run(params)
    summary = _summary(stage, result)
    get_run_logger().info("%s done: %s", stage, summary)
    return summary


def _stage_flow(stage: str) -> Callable[..., dict[str, Any]]:
    def stage_flow(params_path: str = "params.yaml", overrides: list[str] | None = None,
                   workdir: str | None = None) -> dict[str, Any]:
        with working_directory(workdir):
            params = load_stage_params(params_path, list(overrides or []))
            return run_stage(stage, params)

    stage_flow.__name__ = f"{stage}_flow"
    stage_flow.__qualname__ = stage_flow.__name__
    stage_flow.__doc__ = (f"Run the ``{stage}`` stage (``birefnet.stages.{stage}.run``) on ``params_path`` with "
                          "``overrides`` in ``workdir``; returns a summary of what it wrote.")
    return flow(name=stage, flow_run_name=f"{stage}-{{params_path}}", validate_parameters=True)(stage_flow)


synthesize_flow = _stage_flow("synthesize")
ingest_flow = _stage_flow("ingest")
gradients_flow = _stage_flow("gradients")
shard_flow = _stage_flow("shard")
train_flow = _stage_flow("train")
evaluate_flow = _stage_flow("evaluate")
register_flow = _stage_flow("register")

FLOWS = {"synthesize": synthesize_flow, "ingest": ingest_flow, "gradients": gradients_flow, "shard": shard_flow,
         "train": train_flow, "evaluate": evaluate_flow, "register": register_flow}


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.stages STAGE [--params P] [--set k=v ...] [--workdir D]``: run one stage flow."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.stages",
        description="Run one stage's Prefect flow (birefnet.stages.<stage>.run) in this process: load and validate "
                    "the params file with the overrides, then run the stage, retrying transient faults only. "
                    "Writes the same files as the stage in dvc repro. Exit code 0 when the flow run completes, "
                    "1 when it fails.")
    parser.add_argument("stage", choices=STAGES, help="the stage flow to run")
    parser.add_argument("--params", default="params.yaml",
                        help="params file, relative to --workdir (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one parameter, validated like the file (repeatable), "
                             "e.g. --set data.workers=1")
    parser.add_argument("--workdir", default=None,
                        help="repository root the stage's paths are relative to (default: the current directory)")
    args = parser.parse_args(argv)
    state = FLOWS[args.stage](params_path=args.params, overrides=args.overrides, workdir=args.workdir,
                              return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
