"""``register`` refuses metrics that were not computed on the model it registers (``meta.model_sha256``). Quick
lane: the check runs before any tracking server is contacted."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from birefnet.stages.register import main
from tests.registry.conftest import make_params, unique_name, workspace, write_model, write_params_yaml


@pytest.fixture
def ws(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = workspace(tmp_path / "ws", tiny_model, "scored", sm=0.7)
    write_params_yaml(root / "params.yaml", make_params(unique_name()))
    monkeypatch.chdir(root)
    # a closed port: reaching the tracking step would fail differently (and slowly)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    return root


def test_metrics_of_other_weights_are_refused(ws: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scored = json.loads((ws / "metrics" / "eval.json").read_text())["meta"]["model_sha256"]
    model = write_model(tiny_model, ws / "models" / "model.safetensors", "retrained-after-evaluate")
    actual = hashlib.sha256(model.read_bytes()).hexdigest()
    assert actual != scored
    assert main(["--params", "params.yaml", "-q"]) == 3
    err = capsys.readouterr().err
    assert scored in err and actual in err
    assert "metrics/eval.json" in err and "models/model.safetensors" in err
    assert not (ws / "registry").exists()


def test_metrics_without_a_model_hash_are_refused(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = ws / "metrics" / "eval.json"
    doc = json.loads(path.read_text())
    del doc["meta"]["model_sha256"]
    path.write_text(json.dumps(doc))
    assert main(["--params", "params.yaml", "-q"]) == 3
    err = capsys.readouterr().err
    assert "meta.model_sha256" in err and "dvc repro evaluate" in err and "metrics/eval.json" in err
