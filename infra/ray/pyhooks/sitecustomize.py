"""Loaded by every Python process started with this folder on PYTHONPATH (offline.env sets it).

Ray's dashboard process probes cloud metadata addresses (169.254.169.254, metadata.google.internal) even
with usage stats off, and there is no switch for it. When Ray's usage module is imported, replace its probe
with one that answers "unknown" without touching the network.

Ray Train's placement-group cleaner asks the State API (served by the dashboard, which in-process Ray here
runs without) whether the controller is alive, once a second, and logs a warning each time it cannot: the
first one is kept, its repeats are dropped. Nothing else is changed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys

_TARGET = "ray._common.usage.usage_lib"
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_STATE_API_WARNING = "State API may be temporarily unavailable"


def _no_probe(*_args: object, **_kwargs: object) -> str:
    return "unknown"


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):  # noqa: ANN001, ANN202
            original_exec(module)
            if hasattr(module, "get_cloud_from_metadata_requests"):
                module.get_cloud_from_metadata_requests = _no_probe

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _PatchOnImport())


class _FirstOnly(logging.Filter):
    """Passes the first record containing ``text`` and drops its repeats; other records pass."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        return True


_cleaner_logger = logging.getLogger(_CLEANER_LOGGER)
if not any(isinstance(f, _FirstOnly) for f in _cleaner_logger.filters):
    _cleaner_logger.addFilter(_FirstOnly(_STATE_API_WARNING))
