"""`dvc repro` end to end in a temporary clone on a tiny config; a second repro is a no-op."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.tinyrepo import make_clone, tiny_params

pytestmark = pytest.mark.slow

DATA_STAGES = ("synthesize", "ingest", "gradients", "shard")


def dvc(args: list[str], cwd: Path, venv_bin: Path, timeout: int = 1200) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([str(venv_bin / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_repro_then_noop_then_param_change_then_push_pull(tmp_path: Path, repo_root: Path, venv_bin: Path) -> None:
    params = tiny_params(repo_root)
    clone = make_clone(repo_root, tmp_path / "clone", params)
    counts = params["data"]["synthetic"]["counts"]
    t0 = time.perf_counter()
    first = dvc(["repro"], clone, venv_bin)
    repro_s = time.perf_counter() - t0
    stages = yaml.safe_load((clone / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for stage in stages:
        assert f"Running stage '{stage}'" in first.stdout
    assert len(list((clone / "data/synthetic/DIS-TR/im").glob("*.jpg"))) == counts["DIS-TR"]
    assert (clone / "data/prepared/manifest.jsonl").read_text(encoding="utf-8").count("\n") == sum(counts.values())
    assert len(list((clone / "data/gradients").rglob("*.png"))) == sum(counts.values())
    assert (clone / "dvc.lock").is_file()

    t0 = time.perf_counter()
    second = dvc(["repro"], clone, venv_bin)
    noop_s = time.perf_counter() - t0
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date" in second.stdout

    # a leaf param of one stage reruns that stage (and what its changed outputs feed), never the data stages
    params = yaml.safe_load((clone / "params.yaml").read_text(encoding="utf-8"))
    params["train"]["lr"] = params["train"]["lr"] / 2
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    third = dvc(["repro"], clone, venv_bin)
    assert "Running stage 'train'" in third.stdout
    for stage in DATA_STAGES:
        assert f"Running stage '{stage}'" not in third.stdout

    # push to a local remote, lose everything, pull it back
    remote = tmp_path / "remote"
    dvc(["remote", "add", "-f", "-d", "test", str(remote)], clone, venv_bin)
    dvc(["push"], clone, venv_bin)
    before = sorted(p.relative_to(clone) for p in (clone / "data").rglob("*") if p.is_file())
    for out in ("data/synthetic", "data/prepared", "data/gradients", "data/shards", ".dvc/cache"):
        shutil.rmtree(clone / out)
    dvc(["pull"], clone, venv_bin)
    after = sorted(p.relative_to(clone) for p in (clone / "data").rglob("*") if p.is_file())
    assert before == after
    status = dvc(["status"], clone, venv_bin)
    assert "up to date" in status.stdout
    print(f"dvc repro (tiny): {repro_s:.1f} s, no-op repro: {noop_s:.1f} s")
