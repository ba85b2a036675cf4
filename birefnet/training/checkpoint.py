"""Full training state in a checkpoint folder, resumable exactly.

Layout of a checkpoint folder (what Ray Train stores under ``RunConfig(storage_path, name)``):

* ``model.safetensors``: weights with the model params embedded (:func:`birefnet.models.io.save_model`);
* ``optimizer.pt``, ``scaler.pt``: ``state_dict()`` of the optimiser and the AMP scaler (tensors and
  plain containers only, so they load with ``torch.load(weights_only=True)``);
* ``state.json``: epoch, stage, global step, RNG states, the loader's epoch seed, metrics, and the resolved
  params of the run.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from birefnet.config import ModelParams
from birefnet.models.io import save_model, unwrap_model

STATE_FILE = "state.json"

log = logging.getLogger("birefnet.checkpoint")


def save_training_state(folder: str | Path, *, model: torch.nn.Module, model_params: ModelParams,
                        optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                        state: dict[str, Any], extra: dict[str, str] | None = None) -> Path:
    """Write a checkpoint folder.

    Args:
        folder: destination (created).
        model: the (possibly DDP-wrapped) model.
        model_params: params the model was built from.
        optimizer: its state is saved.
        scaler: AMP grad scaler, or None.
        state: JSON-serialisable run state (epoch, stage, global_step, rng, metrics, params...).
        extra: string metadata stored in the safetensors header (e.g. ``birefnet.data.size``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writes: dict[str, Callable[[Path], Any]] = {
        "model.safetensors": lambda path: save_model(model, model_params, path, extra=extra),
        "optimizer.pt": lambda path: torch.save(optimizer.state_dict(), path),
        **({"scaler.pt": lambda path: torch.save(scaler.state_dict(), path)} if scaler is not None else {}),
        STATE_FILE: lambda path: path.write_text(json.dumps(state), encoding="utf-8"),
    }
    for name, write in writes.items():
        _write_naming_the_file(folder / name, write)
    return folder


def _write_naming_the_file(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(path)``; a failure is re-raised as an ``OSError`` naming ``path`` and the space left on its disk.

    A full disk reaches torch as a stream error (``basic_ios::clear: iostream error``, ``unexpected pos``), which
    says neither which file nor why; a checkpoint of the full model is gigabytes.
    """
    try:
        write(path)
    except (OSError, RuntimeError, SafetensorError) as exc:
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**30:.2f} GiB free"
        except OSError:
            free = "free space unknown"
        code = getattr(exc, "errno", None) or (errno.ENOSPC if "No space left" in str(exc) else errno.EIO)
        raise OSError(code, f"writing checkpoint file {path} failed ({free} on its disk): {exc}") from exc


def load_training_state(folder: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                        scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
    """Restore weights, optimiser and scaler in place from a checkpoint folder; return ``state.json``.

    Resuming is exact or it fails: a checkpoint without ``optimizer.pt`` (when an optimiser is given) is refused
    rather than resumed with fresh AdamW moments, which would silently change the training trajectory. Pass
    ``optimizer=None`` to load weights and state only (e.g. to inspect a checkpoint). A missing ``scaler.pt`` is
    logged: :func:`save_training_state` writes none when training ran without a scaler, and a fresh scaler only
    re-learns its loss scale over a few steps.

    Raises:
        FileNotFoundError: ``model.safetensors``, ``state.json`` or (with an optimiser) ``optimizer.pt`` is
            missing; the message names the file.
    """
    folder = Path(folder)
    needed = ["model.safetensors", STATE_FILE] + (["optimizer.pt"] if optimizer is not None else [])
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        files = ", ".join(str(folder / n) for n in missing)
        raise FileNotFoundError(f"checkpoint {folder} is incomplete: missing {files}; cannot resume exactly (the "
                                "optimiser state is part of the run)")
    unwrap_model(model).load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    if scaler is not None:
        if (folder / "scaler.pt").is_file():
            scaler.load_state_dict(torch.load(folder / "scaler.pt", map_location="cpu", weights_only=True))
        else:
            log.warning("checkpoint %s has no scaler.pt: the AMP grad scaler restarts from its initial scale",
                        folder)
    return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
