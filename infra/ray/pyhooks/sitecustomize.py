"""Loaded by every Python process started with this folder on PYTHONPATH (offline.env sets it).

Ray's dashboard process probes cloud metadata addresses (169.254.169.254, metadata.google.internal) even
with usage stats off, and there is no switch for it. When Ray's usage module is imported, replace its probe
with one that answers "unknown" without touching the network. Nothing else is changed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_TARGET = "ray._common.usage.usage_lib"


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
