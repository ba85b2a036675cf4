"""`dvc push` / `dvc pull` through an ``s3://`` remote (dvc-s3) on the session's moto server."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # about 13 s: six DVC CLI calls


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_dvc_push_then_pull_through_s3_remote(tmp_path: Path, venv_bin: Path, s3_server, s3_bucket: str) -> None:  # noqa: ANN001
    repo = tmp_path / "repo"
    data = repo / "data" / "shards"
    data.mkdir(parents=True)
    for i in range(3):
        (data / f"set-{i:06d}.tar").write_bytes(os.urandom(2048 + i))
    (data / "index.json").write_text('{"version": 1}\n', encoding="utf-8")
    expected = digests(data)
    # the endpoint comes from the remote's config alone: the environment keeps only the credentials
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")}
    env["PATH"] = f"{venv_bin}{os.pathsep}{env['PATH']}"
    dvc = str(venv_bin / "dvc")

    run(["git", "init", "-q"], repo, env)
    run([dvc, "init", "-q"], repo, env)
    run([dvc, "remote", "add", "-d", "bucket", f"s3://{s3_bucket}/dvc"], repo, env)
    run([dvc, "remote", "modify", "bucket", "endpointurl", s3_server.endpoint_url], repo, env)
    run([dvc, "add", "data/shards"], repo, env)
    run([dvc, "push"], repo, env)

    keys = s3_server.list_keys(s3_bucket, "dvc/")
    # DVC 3 layout: files/md5/<2>/<30> for every file plus the directory's .dir manifest
    assert len([k for k in keys if k.startswith("dvc/files/md5/")]) == len(expected) + 1, keys
    assert any(k.endswith(".dir") for k in keys), keys

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data" / "shards")
    run([dvc, "pull"], repo, env)
    assert digests(data) == expected
    status = run([dvc, "status", "--cloud"], repo, env)
    assert "in sync" in status.stdout

