"""MLflow client helpers of the registry: the client, a reachable server, and reading versions and aliases."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from birefnet.registry.errors import RegistryError, error_code
from birefnet.registry.tags import TAG_EVAL_SETS, TAG_SHA


def mlflow_client(uri: str) -> Any:
    """An ``MlflowClient`` with ``uri`` as both tracking and registry URI."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


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


def get_alias(client: Any, name: str, alias: str) -> Any | None:
    """The model version behind ``name@alias``, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
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


def version_metrics(version: Any) -> dict[str, dict[str, float]] | None:
    """The per-set metrics a version was registered with (tag ``birefnet.eval.sets``), or None if unreadable."""
    raw = (version.tags or {}).get(TAG_EVAL_SETS)
    if not raw:
        return None
    try:
        return {k: {m: float(x) for m, x in v.items()} for k, v in json.loads(raw).items()}
    except (ValueError, AttributeError, TypeError):
        return None


def version_aliases(client: Any, name: str, version: str) -> list[str]:
    """The aliases of ``name`` version ``version``, sorted."""
    return sorted(client.get_model_version(name, version).aliases or [])
