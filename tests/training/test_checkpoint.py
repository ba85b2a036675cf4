"""Checkpoint folders resume exactly or fail loudly; the train stage's outputs are published all together."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from birefnet.config import load_params
from birefnet.publish import CRASH_ENV, finish_pending
from birefnet.training.checkpoint import load_training_state, save_training_state
from tests.helpers.ray_cluster import can_hide_folders, hidden_from


@pytest.fixture(scope="module")
def tiny(repo_root: Path):  # noqa: ANN201
    """Params whose ``model`` group is embedded in the checkpoint (the checkpoint code never builds from it)."""
    return load_params(repo_root / "params.yaml", ["model.encoder=test_convnext", "model.deform_impl=sampling"])


def build_model(_params: object) -> torch.nn.Module:
    """A small stand-in for BiRefNet: checkpointing only sees a state dict and an optimiser."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 1, 1))


def _trained(params, seed: int = 0):  # noqa: ANN001, ANN202
    model = build_model(params.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(seed)
    model(torch.randn(2, 3, 16, 16)).mean().backward()
    optimizer.step()
    return model, optimizer


def test_resume_restores_optimizer_state(tmp_path: Path, tiny) -> None:  # noqa: ANN001
    model, optimizer = _trained(tiny)
    save_training_state(tmp_path, model=model, model_params=tiny.model, optimizer=optimizer, scaler=None,
                        state={"epoch": 3})
    fresh = build_model(tiny.model)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    assert load_training_state(tmp_path, model=fresh, optimizer=fresh_opt, scaler=None) == {"epoch": 3}
    assert fresh_opt.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"] == 1


def test_resume_without_optimizer_file_fails_naming_it(tmp_path: Path, tiny) -> None:  # noqa: ANN001
    model, optimizer = _trained(tiny)
    save_training_state(tmp_path, model=model, model_params=tiny.model, optimizer=optimizer, scaler=None,
                        state={"epoch": 3})
    (tmp_path / "optimizer.pt").unlink()
    fresh = build_model(tiny.model)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "optimizer.pt")):
        load_training_state(tmp_path, model=fresh, optimizer=fresh_opt, scaler=None)
    assert fresh_opt.state_dict()["state"] == {}
    # weights and state only (no optimiser to restore): allowed
    assert load_training_state(tmp_path, model=fresh, optimizer=None, scaler=None)["epoch"] == 3


def test_missing_scaler_file_is_logged(tmp_path: Path, tiny, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    model, optimizer = _trained(tiny)
    save_training_state(tmp_path, model=model, model_params=tiny.model, optimizer=optimizer, scaler=None,
                        state={"epoch": 0})
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with caplog.at_level(logging.WARNING, logger="birefnet"):
        load_training_state(tmp_path, model=build_model(tiny.model), optimizer=None, scaler=scaler)
    assert "no scaler.pt" in caplog.text and "restarts" in caplog.text


FULL_DISK = textwrap.dedent("""
    import sys
    from pathlib import Path

    import torch
    from birefnet.config import load_params
    from birefnet.training.checkpoint import save_training_state

    params = load_params(sys.argv[1], ["model.encoder=test_convnext", "model.deform_impl=sampling"])
    model = torch.nn.Linear(512, 512)  # 1 MiB of weights, the disk holds 256 KiB
    try:
        save_training_state(sys.argv[2], model=model, model_params=params.model,
                            optimizer=torch.optim.AdamW(model.parameters()), scaler=None, state={"epoch": 0})
    except OSError as exc:
        print(f"OSError errno={exc.errno}: {exc}")
    print("leftovers:", sorted(p.name for p in Path(sys.argv[2]).iterdir()))
""")


@pytest.mark.skipif(not can_hide_folders(), reason="needs mount namespaces (unshare) for a small tmpfs")
def test_full_disk_names_the_checkpoint_file_and_the_space_left(tmp_path: Path, repo_root: Path) -> None:
    """A checkpoint that does not fit its disk (a real 256 KiB tmpfs) fails naming the file and the free space,
    not with torch's bare stream error."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    command = [sys.executable, "-c", FULL_DISK, str(repo_root / "params.yaml"), str(folder / "checkpoint")]
    done = subprocess.run(hidden_from([folder], command, size="256k"), capture_output=True, text=True,
                          timeout=120, cwd=repo_root)
    assert done.returncode == 0, done.stderr
    assert f"writing checkpoint file {folder / 'checkpoint' / 'model.safetensors'} failed (" in done.stdout, done.stdout
    assert "GiB free on its disk" in done.stdout and "errno=28" in done.stdout, done.stdout  # ENOSPC kept
    assert "leftovers: []" in done.stdout, done.stdout  # the half-written file is removed


# ---------------------------------------------------------------------------- train stage outputs, all or nothing

PUBLISH = textwrap.dedent("""
    import sys
    from pathlib import Path
    from birefnet.stages.train import publish_outputs

    out, model, tag = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    publish_outputs(out, model, {"run_name": tag, "best_epoch": 0, "history": [{"epoch": 0, "val_Sm": 0.5}]})
""")
POINTS = ["staged", "committed", "aside1", "aside2", "aside3", "swap1", "swap2", "swap3"]


def _publish(out: Path, model: Path, tag: str, crash: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash:
        env[CRASH_ENV] = f"train:{crash}"
    return subprocess.run([sys.executable, "-c", PUBLISH, str(out), str(model), tag], env=env, timeout=120).returncode


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _consistent(out: Path) -> bool:
    """train.json names the model beside it by its sha256."""
    summary = json.loads((out / "train.json").read_text(encoding="utf-8"))
    return summary["model_sha256"] == _sha(out / "model.safetensors") and (out / "history.csv").is_file()


@pytest.mark.parametrize("point", POINTS)
def test_train_outputs_killed_while_publishing_never_pair_new_model_with_old_summary(tmp_path: Path,
                                                                                     point: str) -> None:
    sources = {}
    for tag in ("old", "new"):  # the publisher copies bytes: two distinct "weights" files suffice
        sources[tag] = tmp_path / f"{tag}.safetensors"
        sources[tag].write_bytes(os.urandom(4096))
    out = tmp_path / "models"
    assert _publish(out, sources["old"], "old") == 0 and _consistent(out)
    assert _publish(out, sources["new"], "new", crash=point) == 137
    model, summary = out / "model.safetensors", out / "train.json"
    if model.is_file() and summary.is_file():  # as the crash left them: a pair is always one run's
        assert _consistent(out), point
    if model.is_file() and _sha(model) == _sha(sources["new"]):
        assert not summary.is_file() or json.loads(summary.read_text())["run_name"] == "new", point
    finish_pending(out)  # what the next train run or a reader (evaluate) does first
    assert _consistent(out)
    expected = "old" if point == "staged" else "new"
    assert _sha(model) == _sha(sources[expected]) and json.loads(summary.read_text())["run_name"] == expected
    assert _publish(out, sources["old"], "again") == 0 and _consistent(out)
    assert sorted(p.name for p in out.iterdir()) == ["history.csv", "model.safetensors", "train.json"]
