"""Entry points apply offline.env themselves: `dvc repro` and `python -m pipelines.*` in a fresh shell, no make."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from birefnet.offline import find_repo, merge_offline_env, offline_env

REPO = Path(__file__).resolve().parents[1]


def _fresh_env(home: Path) -> dict[str, str]:
    """What a new login shell has: no offline switches, no PYTHONPATH, the venv's scripts on PATH."""
    return {"PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"]), "HOME": str(home)}


def _switches(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or "=" not in line:
            continue
        key, rest = line.split("=", 1)
        out[key] = rest
    return out


def test_environment_wins_and_pythonpath_gains_the_hook_folder() -> None:
    env = {"DVC_NO_ANALYTICS": "0", "PYTHONPATH": "/opt/mine"}
    changed = merge_offline_env(env, {"DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": "/repo/hooks"})
    assert env == {"DVC_NO_ANALYTICS": "0", "HF_HUB_OFFLINE": "1", "PYTHONPATH": "/opt/mine:/repo/hooks"}
    assert sorted(changed) == ["HF_HUB_OFFLINE", "PYTHONPATH"]
    assert merge_offline_env(env, {"PYTHONPATH": "/repo/hooks"}) == []  # already there: not added twice


def test_find_repo_walks_up_to_the_checkout(tmp_path: Path) -> None:
    (tmp_path / "offline.env").write_text("HF_HUB_OFFLINE=1\nPREFECT_HOME=.prefect\n")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert find_repo(deep) == tmp_path
    assert offline_env(tmp_path)["PREFECT_HOME"] == str(tmp_path / ".prefect")


def test_dvc_repro_in_a_fresh_shell_gets_the_switches(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "offline.env", repo / "offline.env")
    (repo / "dvc.yaml").write_text("stages:\n  env:\n    cmd: birefnet env > env.txt\n    outs: [env.txt]\n")
    env = _fresh_env(tmp_path)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    proc = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    seen = _switches((repo / "env.txt").read_text())
    expected = offline_env(repo)
    assert set(seen) == set(expected)
    for key in ("RAY_USAGE_STATS_ENABLED", "MLFLOW_DISABLE_TELEMETRY", "DVC_NO_ANALYTICS", "PREFECT_HOME"):
        assert seen[key] == expected[key], key
    assert seen["PREFECT_HOME"] == str(repo / ".prefect")
    assert str(repo / "infra" / "ray" / "pyhooks") in seen["PYTHONPATH"].split(os.pathsep)


def test_flow_entry_point_sets_prefect_home_before_prefect_reads_it(tmp_path: Path) -> None:
    code = ("import os, pipelines.retrain\nfrom prefect.settings import PREFECT_HOME\n"
            "print(PREFECT_HOME.value()); print(os.environ['RAY_USAGE_STATS_ENABLED'])")
    env = {**_fresh_env(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    home, ray_stats = proc.stdout.split()[-2:]
    assert Path(home) == REPO / ".prefect"
    assert ray_stats == "0"
