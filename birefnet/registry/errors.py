"""The registry's error type and the messages for MLflow failures a person can act on."""

from __future__ import annotations


class RegistryError(RuntimeError):
    """A registry operation was refused or failed; the message says why and what to do.

    The command lines (``birefnet register``, ``birefnet promote``) exit with code 3 on it.
    """


#: MLflow's error codes for a registered model (or version) that does not exist.
NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def error_code(exc: BaseException) -> str:
    """MLflow's error code of ``exc`` (``RESOURCE_DOES_NOT_EXIST`` ...), or an empty string."""
    return str(getattr(exc, "error_code", ""))


def explain(exc: BaseException, uri: str) -> RegistryError:
    """A clear message for MLflow errors a person can act on (auth, unreachable); credentials in ``uri`` masked."""
    from birefnet.tracking import redact_uri

    code = error_code(exc)
    text = str(exc)
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or "401" in text or "403" in text:
        return RegistryError(f"MLflow at {redact_uri(uri)} refused the request ({code or 'HTTP 401/403'}): set "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for a "
                             f"user with access. Server said: {text[:300]}")
    return RegistryError(f"MLflow at {redact_uri(uri)} failed: {text[:500]}")
