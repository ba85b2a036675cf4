"""`dvc repro` end to end in a temporary clone on a tiny config; a second repro is a no-op."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

TINY = {
    "data.synthetic.counts": {"DIS-TR": 8, "DIS-VD": 4, "DIS-TE1": 2, "DIS-TE2": 2, "DIS-TE3": 2, "DIS-TE4": 2},
    "data.synthetic.min_side": 96,
    "data.synthetic.max_side": 160,
    "data.size": [64, 64],
    "data.workers": 1,
    "model.encoder": "test_convnext",
    "loader.batch_size": 2,
    "loader.workers": 0,
    "train.threads_per_worker": 1,
    "train.stages": [{"name": "main", "epochs": 1}],
}
DATA_STAGES = ("synthesize", "ingest", "gradients", "shard")


def _set(doc: dict, dotted: str, value: object) -> None:
    node = doc
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def make_clone(repo: Path, dest: Path, overrides: dict[str, object]) -> Path:
    """Copy the working tree as git sees it (tracked + untracked, not ignored) and commit it in a new repo."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=repo,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = repo / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text(encoding="utf-8"))
    for key, value in overrides.items():
        _set(params, key, value)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "clone"], cwd=dest, check=True)
    return dest


def dvc(args: list[str], cwd: Path, venv_bin: Path, timeout: int = 1200) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([str(venv_bin / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_repro_then_noop_then_param_change_then_push_pull(tmp_path: Path, repo_root: Path, venv_bin: Path) -> None:
    clone = make_clone(repo_root, tmp_path / "clone", TINY)
    t0 = time.perf_counter()
    first = dvc(["repro"], clone, venv_bin)
    repro_s = time.perf_counter() - t0
    stages = yaml.safe_load((clone / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for stage in stages:
        assert f"Running stage '{stage}'" in first.stdout
    assert len(list((clone / "data/synthetic/DIS-TR/im").glob("*.jpg"))) == 8
    assert (clone / "data/prepared/manifest.jsonl").read_text(encoding="utf-8").count("\n") == 20
    assert len(list((clone / "data/gradients").rglob("*.png"))) == 20
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
