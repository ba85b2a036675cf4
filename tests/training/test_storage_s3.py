"""Ray Train checkpoints in an S3 bucket (the session's moto server): ``train.storage_path: s3://bucket/prefix``.

Ray Train persists through pyarrow's S3 filesystem, which takes the endpoint from ``AWS_ENDPOINT_URL_S3`` (set by
the ``s3_server`` fixture and inherited by the driver and its Ray workers); the URL form
``s3://bucket/prefix?endpoint_override=http://HOST:PORT&scheme=http`` works as well. The driver is killed once
the first epoch's checkpoint is in the bucket, and a rerun resumes from the bucket. Slow lane.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.tinyrepo import merge

pytestmark = pytest.mark.slow

TINY = {
    "data": {"size": [64, 64], "workers": 1,
             "synthetic": {"counts": {"DIS-TR": 6, "DIS-VD": 2, "DIS-TE1": 2, "DIS-TE2": 2, "DIS-TE3": 2,
                                      "DIS-TE4": 2}, "min_side": 96, "max_side": 144}},
    "model": {"encoder": "test_convnext", "deform_impl": "sampling"},
    "loader": {"batch_size": 2, "workers": 0, "augment": ["flip"]},
    "train": {"threads_per_worker": 1, "warmup_epochs": 0, "lr_schedule": "constant",
              "stages": [{"name": "main", "epochs": 1}, {"name": "ft", "epochs": 1, "loss": {"bce": 0}}]},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Path:
    """A folder with a tiny params.yaml and real (local) shards made by the real stages."""
    from birefnet.stages import gradients, ingest, shard, synthesize

    ws = tmp_path_factory.mktemp("s3_train_ws")
    doc = merge(yaml.safe_load((repo_root / "params.yaml").read_text(encoding="utf-8")), TINY)
    (ws / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    old = Path.cwd()
    os.chdir(ws)
    try:
        for module in (synthesize, ingest, gradients, shard):
            assert module.main(["--params", "params.yaml", "-q"]) == 0, module.__name__
    finally:
        os.chdir(old)
    return ws


def _checkpoint_states(s3_server, bucket: str) -> list[dict]:  # noqa: ANN001
    fs = s3_server.filesystem()
    keys = [k for k in s3_server.list_keys(bucket, "ray/s3-resume/") if k.endswith("/state.json")]
    return [json.loads(fs.cat_file(f"{bucket}/{k}")) for k in keys]


def test_checkpoints_in_bucket_and_resume_from_it(workspace: Path, tmp_path: Path, venv_bin: Path, s3_server,  # noqa: ANN001
                                                  s3_bucket: str) -> None:
    overrides = ["--set", f"train.storage_path=s3://{s3_bucket}/ray", "--set", "train.run_name=s3-resume",
                 "--set", f"train.out={tmp_path / 'models'}"]
    cmd = [str(venv_bin / "birefnet"), "train", "--params", "params.yaml", *overrides]
    with open(tmp_path / "run1.log", "wb") as log1:
        proc = subprocess.Popen(cmd, cwd=workspace, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
        deadline, reached = time.time() + 300, False
        while time.time() < deadline and proc.poll() is None:
            # the checkpoint counts once Ray's checkpoint manager snapshot (what a rerun resumes from) names it
            snapshot = f"{s3_bucket}/ray/s3-resume/checkpoint_manager_snapshot.json"
            fs = s3_server.filesystem()
            if fs.exists(snapshot) and "checkpoint_" in fs.cat_file(snapshot).decode() and \
                    _checkpoint_states(s3_server, s3_bucket):
                reached = True
                break
            time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert reached, (tmp_path / "run1.log").read_text(errors="replace")[-3000:]
    assert not (workspace / "checkpoints").exists() and not (tmp_path / "models" / "train.json").exists()
    time.sleep(2)

    second = subprocess.run(cmd, cwd=workspace, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    summary = json.loads((tmp_path / "models" / "train.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [0, 1]
    assert summary["storage_path"] == f"s3://{s3_bucket}/ray"
    keys = s3_server.list_keys(s3_bucket, "ray/s3-resume/")
    checkpoints = {k.split("/")[2] for k in keys if k.split("/")[2].startswith("checkpoint_")}
    assert checkpoints and max(s["epoch"] for s in _checkpoint_states(s3_server, s3_bucket)) == 1, keys
    assert any(k.endswith(".safetensors") or k.endswith(".pt") for k in keys), keys
