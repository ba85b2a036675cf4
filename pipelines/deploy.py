"""Deploy the ``retrain`` flow as defined in ``prefect.yaml``, from a repository folder.

``python -m pipelines.deploy [--source DIR]`` reads the ``retrain`` entry of ``<DIR>/prefect.yaml`` (work pool,
cron schedules, concurrency limit, parameters, tags) and calls ``flow.from_source(DIR, entrypoint).deploy(...)``
against the server at ``PREFECT_API_URL``, so the file stays the one definition of the deployment. The process
work pool is created first when missing, with the base job template of ``infra/prefect/work-pool.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml
from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Schedule

POOL_TEMPLATE = Path("infra/prefect/work-pool.json")


def deployment_spec(prefect_yaml: Path, name: str = "retrain") -> dict[str, Any]:
    """The deployment named ``name`` in a ``prefect.yaml``.

    Raises:
        KeyError: no deployment of that name.
    """
    doc = yaml.safe_load(prefect_yaml.read_text(encoding="utf-8"))
    for spec in doc.get("deployments", []):
        if spec.get("name") == name:
            return spec
    raise KeyError(f"{prefect_yaml}: no deployment named {name!r}")


def ensure_work_pool(name: str, template: Path) -> bool:
    """Create the process work pool ``name`` with the base job template in ``template`` unless it exists.

    Returns:
        True when the pool was created.
    """
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process", base_job_template=json.loads(template.read_text(encoding="utf-8")),
                description="BiRefNet retraining: flow runs as subprocesses of a worker on the training machine"))
            return True


def deploy(source: Path, name: str = "retrain", paused: bool = False) -> UUID:
    """Create or update deployment ``name`` from ``source/prefect.yaml``; return its id."""
    source = source.resolve()
    spec = deployment_spec(source / "prefect.yaml", name)
    schedules = [Schedule(cron=s["cron"], timezone=s.get("timezone", "UTC"), active=s.get("active", True))
                 for s in spec.get("schedules", [])]
    pool = spec["work_pool"]
    ensure_work_pool(pool["name"], source / POOL_TEMPLATE)
    remote: Flow[Any, Any] = Flow.from_source(source=str(source), entrypoint=spec["entrypoint"])
    return remote.deploy(
        name=name,
        work_pool_name=pool["name"],
        work_queue_name=pool.get("work_queue_name"),
        job_variables=pool.get("job_variables") or {},
        schedules=schedules,
        concurrency_limit=spec.get("concurrency_limit"),
        parameters=spec.get("parameters") or {},
        description=spec.get("description"),
        tags=spec.get("tags"),
        paused=paused,
        print_next_steps=False,
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--source DIR`` (default: the current directory), ``--paused``."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Path.cwd(), help="repository folder (default: cwd)")
    parser.add_argument("--name", default="retrain", help="deployment name in prefect.yaml")
    parser.add_argument("--paused", action="store_true", help="create the deployment with its schedule paused")
    args = parser.parse_args(argv)
    deployment_id = deploy(args.source, args.name, paused=args.paused)
    print(f"deployed {args.name} ({deployment_id}) from {args.source.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
