"""The real train stage killed while publishing its outputs: never a new model beside an old ``train.json``."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from birefnet.publish import CRASH_ENV, finish_pending, journal_path
from tests.helpers.tinyrepo import TINY, merge

pytestmark = pytest.mark.slow


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_stage_killed_between_model_and_summary(tmp_path: Path, repo_root: Path, venv_bin: Path) -> None:
    from birefnet.stages import gradients, ingest, shard, synthesize

    ws = tmp_path / "ws"
    ws.mkdir()
    doc = merge(yaml.safe_load((repo_root / "params.yaml").read_text(encoding="utf-8")), TINY)
    doc["train"]["stages"] = [{"name": "main", "epochs": 1}]
    (ws / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    old_cwd = Path.cwd()
    os.chdir(ws)
    try:
        for module in (synthesize, ingest, gradients, shard):
            assert module.main(["--params", "params.yaml", "-q"]) == 0, module.__name__
    finally:
        os.chdir(old_cwd)
    out = ws / "models"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous weights")
    previous = {"run_name": "previous", "model_sha256": _sha(out / "model.safetensors")}
    (out / "train.json").write_text(json.dumps(previous))
    (out / "history.csv").write_text("epoch\n0\n")
    cmd = [str(venv_bin / "birefnet"), "train", "-q", "--params", "params.yaml", "--set", "train.num_workers=1",
           "--set", f"train.storage_path={tmp_path / 'ckpt'}", "--set", "train.run_name=crash"]
    proc = subprocess.Popen(cmd, cwd=ws, env={**os.environ, CRASH_ENV: "train:swap1"}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=540)
    finally:
        try:  # anything the killed driver left in its session (Ray is shut down before publishing)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 137, log[-3000:]
    # as the kill left it: the new model is in place, and the old summary is not beside it
    assert (out / "model.safetensors").read_bytes() != b"previous weights"
    assert not (out / "train.json").exists() and journal_path(out, "train").exists()
    finish_pending(out)  # what the next run, or the evaluate stage reading the model, does first
    summary = json.loads((out / "train.json").read_text(encoding="utf-8"))
    assert summary["run_name"] == "crash" and summary["model_sha256"] == _sha(out / "model.safetensors")
    assert sorted(p.name for p in out.iterdir()) == ["history.csv", "model.safetensors", "train.json"]
