"""``birefnet promote``: move the champion alias by hand (library: :func:`birefnet.registry.promote`).

Exit status: 0 moved (or already champion; the JSON result is printed), 2 bad params, 3 refused (a failed check,
no earlier champion, the champion moved meanwhile, the gate lock held, an unreachable or refusing server).

Usage::

    birefnet promote --version 7 --reason "re-evaluated on the new test set"
    birefnet promote --rollback --reason "regression in production"
"""

from __future__ import annotations

import argparse
import json

from birefnet.config import Params
from birefnet.registry import LockSettings, RegistryError, mlflow_client, promote, reachable_tracking
from birefnet.registry.errors import explain
from birefnet.stages.common import add_params_args, run_stage


def run(params: Params, args: argparse.Namespace) -> None:
    """Apply ``args`` to ``register.model_name`` on the configured tracking server; print the result as JSON."""
    from mlflow.exceptions import MlflowException

    from birefnet.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(params.tracking)
    rp = params.register
    with reachable_tracking(uri):
        try:
            result = promote(mlflow_client(uri), rp.model_name, version=args.version, rollback=args.rollback,
                             force=args.force, reason=args.reason, metric=rp.primary_metric, min_delta=rp.min_delta,
                             sets=params.gate_sets(), lock=LockSettings.from_params(params, uri))
        except MlflowException as exc:
            raise explain(exc, uri) from None
    print(json.dumps(result, indent=2, sort_keys=True))


def get_args_parser() -> argparse.ArgumentParser:
    """Parser of ``birefnet promote``."""
    parser = argparse.ArgumentParser(
        prog="birefnet promote",
        description="Move the champion alias of register.model_name by hand. --version N applies the register "
                    "stage's gate (N must beat the champion on register.primary_metric over register.selection_sets "
                    "(else data.test_sets) by register.min_delta); --rollback returns to the previous champion. "
                    "Both need a READY, comparable version unless --force; each leaves an audit tag "
                    "(birefnet.audit.<time>) on both versions.")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--version", type=str, help="model version number to make champion")
    target.add_argument("--rollback", action="store_true", help="make the previous champion champion again")
    parser.add_argument("--force", action="store_true", help="skip the checks (recorded in the audit tag)")
    parser.add_argument("--reason", default="", help="why (recorded in the audit tag)")
    return add_params_args(parser)


def main(argv: list[str] | None = None) -> int:
    """``birefnet promote``: exit 0 on success, 2 on bad params, 3 when refused (the message says why)."""
    args = get_args_parser().parse_args(argv)
    return run_stage("promote", run, args, input_errors=(RegistryError,))


if __name__ == "__main__":
    raise SystemExit(main())
