"""Full training state in a checkpoint folder, resumable exactly.

Layout of a checkpoint folder (what Ray Train stores under ``RunConfig(storage_path, name)``):

* ``model.safetensors``: weights with the model params embedded (:func:`birefnet.models.io.save_model`);
* ``optimizer.pt``, ``scaler.pt``: ``state_dict()`` of the optimiser and the AMP scaler (tensors and
  plain containers only, so they load with ``torch.load(weights_only=True)``);
* ``state.json``: epoch, stage, global step, RNG states, the loader's epoch seed, metrics, and the resolved
  params of the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from birefnet.config import ModelParams
from birefnet.models.io import _unwrap, save_model

STATE_FILE = "state.json"


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
    save_model(model, model_params, folder / "model.safetensors", extra=extra)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), folder / "scaler.pt")
    (folder / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
    return folder


def load_training_state(folder: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                        scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
    """Restore weights, optimiser and scaler in place from a checkpoint folder; return ``state.json``."""
    folder = Path(folder)
    missing = [n for n in ("model.safetensors", STATE_FILE) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {folder} is incomplete: missing {missing}")
    _unwrap(model).load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    if optimizer is not None and (folder / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    if scaler is not None and (folder / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(folder / "scaler.pt", map_location="cpu", weights_only=True))
    return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
