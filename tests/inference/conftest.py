"""Fixtures for the inference tests: the tiny model of ``tiny_model.py`` saved to disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from birefnet.models import BiRefNet
from birefnet.models.io import save_model
from tests.inference.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny model (safetensors with its ModelParams embedded)."""
    model, params = build_tiny_model()
    return save_model(model, params, tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_file: Path) -> BiRefNet:
    """The tiny model loaded back from its file (CPU, eval)."""
    from birefnet.models.io import load_model

    return load_model(tiny_model_file)
