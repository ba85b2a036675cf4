"""RNG state capture: what ``rng_state`` saves (through a checkpoint's ``state.json``) restores every stream."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from birefnet.config import ModelParams
from birefnet.training.checkpoint import load_training_state, save_training_state
from birefnet.training.runtime import rng_state, seed_everything, set_rng_state


def draw() -> tuple[list[float], list[float], list[float], list[float]]:
    """Draws from Python's ``random`` (including a cached Gaussian), NumPy's global stream and torch's."""
    return ([random.random() for _ in range(3)] + [random.gauss(0, 1)], np.random.rand(3).tolist(),
            [float(np.random.randn())], torch.rand(3).tolist())


def test_rng_state_round_trip_through_json() -> None:
    seed_everything(123)
    draw()  # move every stream off its seeded start
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    np.random.randn()  # and one in NumPy's
    saved = json.loads(json.dumps(rng_state()))
    first = draw()
    set_rng_state(saved)
    assert draw() == first
    seed_everything(999)  # elsewhere entirely, then back again
    set_rng_state(saved)
    assert draw() == first


def test_rng_state_round_trip_through_a_checkpoint_folder(tmp_path: Path) -> None:
    model = torch.nn.Conv2d(3, 1, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    seed_everything(7)
    save_training_state(tmp_path, model=model, model_params=ModelParams(encoder="test_convnext"), optimizer=optimizer,
                        scaler=None, state={"epoch": 0, "rng": rng_state()})
    first = draw()
    seed_everything(8)
    assert draw() != first
    state = load_training_state(tmp_path, model=torch.nn.Conv2d(3, 1, 1), optimizer=None, scaler=None)
    set_rng_state(state["rng"])
    assert draw() == first
