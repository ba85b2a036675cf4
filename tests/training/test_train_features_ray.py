"""The train stage on real Ray with the issue-20 training features: encoder freeze (DDP, resume), dynamic sizes
and, on a GPU, fp16 with its GradScaler checkpointed.

Each test is one ``fit()`` with a worker killed mid-epoch, so the resume path runs inside the same fit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from birefnet.config import load_params
from tests.helpers.tinyrepo import TINY, merge

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Path:
    """A folder with a tiny params.yaml and real shards made by the real stages."""
    from birefnet.stages import gradients, ingest, shard, synthesize

    ws = tmp_path_factory.mktemp("features_ws")
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


def _run(ws: Path, tmp_path: Path, overrides: list[str], fault: dict) -> tuple[dict, dict[int, Path]]:
    """Run the train stage in ``ws``; return its summary and the kept checkpoint folders by epoch."""
    from birefnet.stages.train import run

    storage = tmp_path / "ckpt"
    old = Path.cwd()
    os.chdir(ws)
    try:
        params = load_params(ws / "params.yaml", [*overrides, f"train.run_name=run-{tmp_path.name}",
                                                  f"train.out={tmp_path / 'models'}", f"train.storage_path={storage}",
                                                  "train.max_failures=1", "train.keep_checkpoints=3"])
        summary = run(params, fault=fault, probe_dir=str(tmp_path / "probe"))
    finally:
        os.chdir(old)
    folders = {json.loads(p.read_text())["epoch"]: p.parent for p in storage.rglob("state.json")}
    return summary, folders


def _probes(folder: Path) -> dict[tuple[int, int], dict]:
    return {(d["rank"], d["epoch"]): d for d in (json.loads(p.read_text()) for p in folder.glob("rank*_epoch*.json"))}


def _split(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    state = load_file(str(folder / "model.safetensors"))
    encoder = {k: v for k, v in state.items() if k.startswith("encoder.")}
    return encoder, {k: v for k, v in state.items() if not k.startswith("encoder.")}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_encoder_frozen_for_two_epochs_with_dynamic_sizes_on_two_ddp_workers_and_a_restart(
        workspace: Path, tmp_path: Path) -> None:
    marker = tmp_path / "killed.txt"
    summary, checkpoints = _run(workspace, tmp_path, [
        "train.num_workers=2", "loader.epoch_batches=3", "train.freeze_encoder_epochs=2", "train.bn_recalibration=2",
        "model.encoder=test_resnet",  # BatchNorm in the encoder: its statistics must stay while frozen
        "train.stages=[{name: dyn, epochs: 3, dynamic_size: [[32, 96], [32, 64]]}]",
    ], fault={"epoch": 1, "step": 1, "rank": 1, "marker": str(marker)})
    assert marker.is_file(), "the fault hook never fired"
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2]
    probes = _probes(tmp_path / "probe")
    for epoch in range(3):  # after the unfreeze too: DDP kept the encoder's gradients in its all-reduce
        assert probes[(0, epoch)]["params_sha256"] == probes[(1, epoch)]["params_sha256"], epoch
    assert sorted(checkpoints) == [0, 1, 2]
    (enc0, rest0), (enc1, rest1), (enc2, _) = (_split(checkpoints[e]) for e in range(3))
    assert any(k.endswith("running_mean") for k in enc0)
    # epoch 1 ran after the restart from epoch 0's checkpoint, still frozen: weights and BN statistics unchanged
    assert _same(enc0, enc1), "the frozen encoder changed"
    assert not _same(rest0, rest1), "the decoder did not train"
    changed = [k for k in enc2 if not torch.equal(enc1[k], enc2[k])]
    assert any(k.endswith(".weight") for k in changed) and any(k.endswith("running_mean") for k in changed)
    assert all("train_skipped_steps" not in h for h in summary["history"])  # no scaler without fp16


@pytest.mark.gpu
def test_fp16_train_stage_checkpoints_the_grad_scaler_and_resumes_it(workspace: Path, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.fail("the gpu lane needs a CUDA device (torch.cuda.is_available() is False)")
    marker = tmp_path / "killed.txt"
    summary, checkpoints = _run(workspace, tmp_path, [
        "train.use_gpu=true", "train.precision=fp16", "train.num_workers=1", "model.deform_impl=torchvision",
        "train.stages=[{name: main, epochs: 2}]", "loader.epoch_batches=8",
    ], fault={"epoch": 1, "step": 1, "rank": 0, "marker": str(marker)})
    assert marker.is_file(), "the fault hook never fired"
    first, second = summary["history"]
    for record in (first, second):
        assert 0 <= record["train_skipped_steps"] < 8 and record["train_grad_scale"] > 0
    # the default scaler starts at 2**16 and halves per skipped step (growth needs 2000 good steps); epoch 1 ran
    # after the restart, so it continued from the checkpointed scale, not from 2**16 again
    assert first["train_grad_scale"] == 65536.0 * 0.5 ** first["train_skipped_steps"]
    assert second["train_grad_scale"] == first["train_grad_scale"] * 0.5 ** second["train_skipped_steps"]
    for folder in checkpoints.values():
        scaler = torch.load(folder / "scaler.pt", weights_only=True)
        assert scaler["scale"] > 0 and "_growth_tracker" in scaler
