"""The ``retrain`` deployment on a real ``prefect server`` and process worker (both started here, ended by PID).

A temporary git clone of the working tree with the tiny config is the deployment's source; runs are triggered
with ``prefect deployment run`` and followed through the server's REST API.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from tests.helpers.tinyrepo import make_clone, tiny_params

pytestmark = pytest.mark.slow

SERVER_TIMEOUT_S = 120
RUN_TIMEOUT_S = 900
POOL = "birefnet-process"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    """The few REST calls the tests need, against ``http://127.0.0.1:PORT/api``."""

    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")

    def flow_run(self, run_id: str) -> dict[str, Any]:
        return self.call("GET", f"/flow_runs/{run_id}")

    def task_runs(self, run_id: str) -> list[dict[str, Any]]:
        return self.call("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})

    def logs(self, run_id: str) -> str:
        logs = self.call("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
        return "\n".join(entry["message"] for entry in logs)

    def artifacts(self, run_id: str) -> list[dict[str, Any]]:
        return self.call("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})

    def wait(self, run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state_type"] in TERMINAL:
                return run
            time.sleep(2)
        raise AssertionError(f"flow run {run_id} not finished after {timeout_s} s: {self.flow_run(run_id)['state']}")


def _stop(proc: subprocess.Popen[bytes], signals: tuple[int, ...], grace_s: float = 30) -> None:
    """Send ``signals`` to our process (by PID), then kill it if it is still there after ``grace_s``."""
    for sig in signals:
        if proc.poll() is None:
            proc.send_signal(sig)
            time.sleep(1)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], Api]]:
    """``prefect server start`` on 127.0.0.1 and a free port, its own PREFECT_HOME; yields (client env, api)."""
    home = tmp_path_factory.mktemp("prefect_home")
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    base.update(PREFECT_HOME=str(home), PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    log = (home / "server.log").open("wb")
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], env=base, stdout=log, stderr=subprocess.STDOUT)
    api = Api(f"http://127.0.0.1:{port}/api")
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT_S
        while True:
            try:
                if api.call("GET", "/health", timeout=5) is True:
                    break
            except OSError:
                pass
            assert server.poll() is None, (home / "server.log").read_text()
            assert time.monotonic() < deadline, f"prefect server not healthy in {SERVER_TIMEOUT_S} s"
            time.sleep(1)
        yield dict(base, PREFECT_API_URL=api.url), api
    finally:
        _stop(server, (signal.SIGTERM,))
        log.close()


@pytest.fixture(scope="module")
def worker(prefect_env: tuple[dict[str, str], Api], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``prefect worker start --pool birefnet-process --type process``; yields its log file."""
    env, _ = prefect_env
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    log = log_path.open("wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", POOL,
                             "--type", "process"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield log_path
    finally:
        _stop(proc, (signal.SIGINT, signal.SIGINT))  # the first SIGINT waits for a running flow process
        log.close()


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Path:
    return make_clone(repo_root, tmp_path_factory.mktemp("retrain_clone"), tiny_params(repo_root))


def _deploy(env: dict[str, str], clone: Path) -> None:
    """What ``make deploy`` runs: the work pool from infra/prefect/work-pool.json when missing, then
    ``prefect --no-prompt deploy --all`` (prefect.yaml) with ``BIREFNET_REPO`` naming the folder."""
    prefect = str(Path(sys.executable).parent / "prefect")
    inspect = subprocess.run([prefect, "work-pool", "inspect", POOL], env=env, capture_output=True, timeout=120)
    if inspect.returncode != 0:
        create = subprocess.run([prefect, "work-pool", "create", POOL, "--type", "process", "--base-job-template",
                                 "infra/prefect/work-pool.json"], cwd=clone, env=env, capture_output=True, text=True,
                                timeout=120)
        assert create.returncode == 0, create.stdout + create.stderr
    proc = subprocess.run([prefect, "--no-prompt", "deploy", "--all"], cwd=clone,
                          env=dict(env, BIREFNET_REPO=str(clone)), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def deployment(prefect_env: tuple[dict[str, str], Api], clone: Path) -> dict[str, Any]:
    """The retrain deployment as ``make deploy`` creates it (Prefect's CLI reading prefect.yaml)."""
    env, api = prefect_env
    _deploy(env, clone)
    return api.call("GET", "/deployments/name/retrain/retrain")


def _trigger(env: dict[str, str], params: dict[str, Any] | None = None) -> str:
    args = [str(Path(sys.executable).parent / "prefect"), "deployment", "run", "retrain/retrain"]
    if params:
        args += ["--params", json.dumps(params)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", proc.stdout)
    assert match, proc.stdout
    return match.group(1)


def _seconds(iso_end: str, iso_start: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(iso_end) - datetime.fromisoformat(iso_start)).total_seconds()


def test_deployment_matches_prefect_yaml(deployment: dict[str, Any]) -> None:
    assert deployment["work_pool_name"] == POOL
    assert deployment["entrypoint"] == "pipelines/retrain.py:retrain"
    assert deployment["global_concurrency_limit"]["limit"] == 1
    crons = [s["schedule"]["cron"] for s in deployment["schedules"]]
    assert crons == ["0 3 * * 1"] and deployment["schedules"][0]["schedule"]["timezone"] == "UTC"


def test_retrain_completes_and_a_second_run_waits(prefect_env: tuple[dict[str, str], Api], worker: Path,
                                                  deployment: dict[str, Any], clone: Path) -> None:
    env, api = prefect_env
    t0 = time.monotonic()
    first = _trigger(env)
    second = _trigger(env)
    # while the first runs, the second must not start: it waits for the deployment's concurrency slot
    second_states: set[str] = set()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        a, b = api.flow_run(first), api.flow_run(second)
        if a["state_type"] == "RUNNING":
            assert b["state_type"] not in ("RUNNING", "COMPLETED"), "second retrain ran concurrently"
            second_states.add(b["state_name"])
        if a["state_type"] in TERMINAL:
            break
        time.sleep(1)
    a = api.wait(first)
    wall_s = time.monotonic() - t0
    assert a["state_type"] == "COMPLETED", api.logs(first)[-4000:]
    b = api.wait(second)
    assert b["state_type"] == "COMPLETED", api.logs(second)[-4000:]
    assert second_states & {"AwaitingConcurrencySlot", "Scheduled", "Pending"}, second_states
    assert _seconds(b["start_time"], a["end_time"]) >= 0, "the second run started before the first ended"

    # the trail of a manual dvc repro, in the deployment's folder
    assert (clone / "dvc.lock").is_file() and (clone / "models/model.safetensors").is_file()
    assert (clone / "metrics/eval.json").is_file()
    report = next(x for x in api.artifacts(first) if x["key"] == "retrain-report")
    assert "dvc repro" in report["data"] and "train" in report["data"]
    first_logs, second_logs = api.logs(first), api.logs(second)
    assert "Running stage 'train'" in first_logs
    assert "Running stage" not in second_logs  # the queued run found everything up to date

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("birefnet")
    runs = client.search_runs([experiment.experiment_id])
    assert any(r.data.tags.get("birefnet.stage") == "train" and r.info.status == "FINISHED" for r in runs)
    registered = clone / "registry/registered.json"
    if registered.is_file():  # once the register stage is in dvc.yaml: a new model version exists in MLflow
        info = json.loads(registered.read_text(encoding="utf-8"))
        versions = client.search_model_versions(f"name='{info['model_name']}'")
        assert str(info["version"]) in {str(v.version) for v in versions}
        assert f"registered version: **{info['version']}**" in report["data"]
        assert f"gate: **{info['gate']['decision']}**" in report["data"]
    print(f"\nretrain (tiny) via deployment: {a['total_run_time']:.1f} s in the flow run, "
          f"{wall_s:.1f} s from trigger to Completed; queued second run {b['total_run_time']:.1f} s; "
          f"second run states seen while the first ran: {sorted(second_states)}")


def test_bad_input_fails_the_run_with_the_stage_error_and_no_retry(
        prefect_env: tuple[dict[str, str], Api], worker: Path, deployment: dict[str, Any], repo_root: Path,
        tmp_path: Path) -> None:
    env, api = prefect_env
    params = tiny_params(repo_root, {"data": {"root": "data/bad", "on_bad_sample": "fail"}})
    bad = tmp_path / "bad"
    for name in ("DIS-TR", "DIS-VD", "DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4"):
        (bad / "data/bad" / name / "im").mkdir(parents=True)
        (bad / "data/bad" / name / "gt").mkdir(parents=True)
        stem = f"1#Thing#1#Bag#{name}"
        cv2.imwrite(str(bad / "data/bad" / name / "im" / f"{stem}.jpg"), np.full((96, 96, 3), 128, np.uint8))
        cv2.imwrite(str(bad / "data/bad" / name / "gt" / f"{stem}.png"), np.zeros((96, 96), np.uint8))
    (bad / "data/bad/DIS-TR/im/1#Thing#1#Bag#DIS-TR.jpg").write_bytes(b"not a jpeg")
    # data/ is ignored by git in this repository: commit the bad set explicitly
    make_clone(repo_root, bad, params)
    subprocess.run(["git", "add", "-f", "data/bad"], cwd=bad, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "commit", "-qm",
                    "bad", "--allow-empty"], cwd=bad, check=True)

    run_id = _trigger(env, {"workdir": str(bad)})
    run = api.wait(run_id)
    assert run["state_type"] == "FAILED", run["state"]
    message = run["state"]["message"]
    assert "bad input, not retried" in message and "DIS-TR.jpg" in message, message
    repro = [t for t in api.task_runs(run_id) if t["task_key"].startswith("reproduce") or
             t["name"].startswith("dvc-repro")]
    assert len(repro) == 1 and repro[0]["run_count"] == 1, repro
    assert run["run_count"] == 1
    assert "Retry" not in api.logs(run_id)


def _run(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout.strip()


GIT = ["git", "-c", "user.name=publisher", "-c", "user.email=p@p", "-c", "commit.gpgsign=false"]


def _publish_data(pub: Path, seed: int, message: str) -> None:
    """A new version of the dataset in data/mine: written, dvc add-ed, pushed to the DVC remote, committed, pushed."""
    bin_dir = Path(sys.executable).parent
    shutil.rmtree(pub / "data/mine", ignore_errors=True)
    _run([str(bin_dir / "birefnet"), "synthesize", "--set", "data.synthetic.out=data/mine", "--set",
          f"data.synthetic.seed={seed}"], pub)
    _run([str(bin_dir / "dvc"), "add", "-q", "data/mine"], pub)
    _run([str(bin_dir / "dvc"), "push", "-q"], pub)
    _run(["git", "add", "-A"], pub)
    _run([*GIT, "commit", "-qm", message], pub)
    _run(["git", "push", "-q", "origin", "HEAD:main"], pub)


def _lock_out(lock_text: str, path: str) -> str:
    import yaml

    for stage in yaml.safe_load(lock_text)["stages"].values():
        for item in [*stage.get("deps", []), *stage.get("outs", [])]:
            if item["path"] == path:
                return item["md5"]
    raise AssertionError(f"{path} not in dvc.lock")


def _branches(origin: Path) -> list[str]:
    out = _run(["git", "--git-dir", str(origin), "for-each-ref", "--format=%(refname:short)", "refs/heads/retrain"],
               origin)
    return sorted(out.split())


def test_new_data_in_the_remote_retrains_on_a_branch_and_overrides_leave_params_alone(
        prefect_env: tuple[dict[str, str], Api], worker: Path, deployment: dict[str, Any], repo_root: Path,
        tmp_path: Path) -> None:
    """The issue's trail: a data version pushed to the DVC remote and origin reaches the next scheduled run, which
    registers a new model version and leaves dvc.lock on a retrain/... branch in origin; an override run leaves
    params.yaml in the deployment folder as it was."""
    env, api = prefect_env
    origin, remote, pub, deploy = (tmp_path / "origin.git", tmp_path / "dvc-remote", tmp_path / "pub",
                                   tmp_path / "deploy")
    _run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path)
    remote.mkdir()
    make_clone(repo_root, pub, tiny_params(repo_root, {"data": {"root": "data/mine"}}))
    bin_dir = Path(sys.executable).parent
    _run([str(bin_dir / "dvc"), "remote", "add", "-d", "-f", "store", str(remote)], pub)
    _run(["git", "remote", "add", "origin", str(origin)], pub)
    _publish_data(pub, seed=1, message="data v1")
    _run(["git", "clone", "-q", "-b", "main", str(origin), str(deploy)], tmp_path)

    import mlflow

    def versions() -> list[str]:
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{deploy / 'mlflow.db'}",
                                     registry_uri=f"sqlite:///{deploy / 'mlflow.db'}")
        return sorted(str(v.version) for v in client.search_model_versions("name='birefnet'"))

    def retrain(params: dict[str, Any] | None = None) -> dict[str, Any]:
        run_id = _trigger(env, {"workdir": str(deploy), **(params or {})})
        run = api.wait(run_id)
        assert run["state_type"] == "COMPLETED", api.logs(run_id)[-4000:]
        return next(x for x in api.artifacts(run_id) if x["key"] == "retrain-report")

    retrain()
    [first] = _branches(origin)
    lock1 = _run(["git", "--git-dir", str(origin), "show", f"{first}:dvc.lock"], tmp_path)
    assert versions() == ["1"]

    _publish_data(pub, seed=2, message="data v2")
    report2 = retrain()
    second = next(b for b in _branches(origin) if b != first)
    lock2 = _run(["git", "--git-dir", str(origin), "show", f"{second}:dvc.lock"], tmp_path)
    assert _lock_out(lock2, "data/mine") != _lock_out(lock1, "data/mine")  # the new data version was used
    assert _lock_out(lock2, "models/model.safetensors") != _lock_out(lock1, "models/model.safetensors")
    assert versions() == ["1", "2"]  # ... and registered as a new model version
    assert second in report2["data"]
    # the branch starts from the publisher's new commit: its parent is origin/main
    main_head = _run(["git", "--git-dir", str(origin), "rev-parse", "main"], tmp_path)
    assert _run(["git", "--git-dir", str(origin), "rev-parse", f"{second}^"], tmp_path) == main_head

    params_before = (deploy / "params.yaml").read_text()
    retrain({"overrides": ["train.lr=0.0005"]})
    third = next(b for b in _branches(origin) if b not in (first, second))
    assert (deploy / "params.yaml").read_text() == params_before
    assert _run(["git", "status", "--porcelain", "--untracked-files=no"], deploy) == ""
    import yaml

    branch_params = yaml.safe_load(_run(["git", "--git-dir", str(origin), "show", f"{third}:params.yaml"], tmp_path))
    assert branch_params["train"]["lr"] == 0.0005
    assert len(versions()) == 3  # the experiment's model went to the deployment's own store
    print(f"\nretrain trail: {first} -> {second} (data/mine {_lock_out(lock1, 'data/mine')[:8]} -> "
          f"{_lock_out(lock2, 'data/mine')[:8]}, dvc.lock sha256 {hashlib.sha256(lock2.encode()).hexdigest()[:12]}, "
          f"model version 2); override run -> {third}, model version 3")


def test_redeploy_updates_the_deployment_in_place(prefect_env: tuple[dict[str, str], Api],
                                                  deployment: dict[str, Any], clone: Path) -> None:
    # Last in this file: it redeploys retrain/retrain (make deploy run again after a change of prefect.yaml).
    env, api = prefect_env
    _deploy(env, clone)
    redeployed = api.call("GET", "/deployments/name/retrain/retrain")
    assert redeployed["id"] == deployment["id"]  # the same deployment, updated in place
    assert redeployed["work_pool_name"] == POOL and redeployed["entrypoint"] == "pipelines/retrain.py:retrain"
    assert redeployed["global_concurrency_limit"]["limit"] == 1
    assert [s["schedule"]["cron"] for s in redeployed["schedules"]] == ["0 3 * * 1"]
    steps = redeployed["pull_steps"]
    assert steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(clone)}}], steps
