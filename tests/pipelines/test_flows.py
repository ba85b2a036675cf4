"""Stage flows in Prefect's ephemeral mode on a tiny config: same files as the stage CLIs, retry policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from birefnet.config import ParamsError
from birefnet.stages.common import StageInputError
from pipelines.common import RETRY_POLICY, CommandError, LockTimeout, is_transient, workspace_lock
from pipelines.stages import gradients_flow, ingest_flow, shard_flow, synthesize_flow
from tests.helpers.tinyrepo import tiny_params


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    """A temporary Prefect server and database for this module's flows."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Path:
    ws = tmp_path_factory.mktemp("flows_ws")
    (ws / "params.yaml").write_text(yaml.safe_dump(tiny_params(repo_root), sort_keys=False), encoding="utf-8")
    return ws


def _task_runs(flow_run_id: object) -> dict[str, int]:
    """task run name -> run_count for one flow run."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.run_count for r in runs}


def test_data_stage_flows_write_the_stage_outputs(harness: None, workspace: Path) -> None:
    """synthesize -> ingest -> gradients -> shard as four flows; the shards equal the ``birefnet shard`` CLI's."""
    ws = str(workspace)
    t0 = time.perf_counter()
    counts = synthesize_flow(workdir=ws)
    assert counts["DIS-TR"] == 8 and len(list((workspace / "data/synthetic/DIS-TR/im").glob("*.jpg"))) == 8
    ingested = ingest_flow(workdir=ws)
    assert ingested == {"accepted": 19, "quarantined": 0, "classes": ingested["classes"]}
    assert (workspace / "data/prepared/manifest.jsonl").read_text(encoding="utf-8").count("\n") == 19
    assert gradients_flow(workdir=ws) == {"labels": 19}
    assert len(list((workspace / "data/gradients").rglob("*.png"))) == 19
    sharded = shard_flow(workdir=ws)
    assert sharded["train"] == {"DIS-TR": 8} and sum(sharded["test"].values()) == 8
    print(f"4 data flows (tiny, ephemeral): {time.perf_counter() - t0:.1f} s")

    # the CLI (what dvc runs) writes byte-identical shards from the same params
    cli = subprocess.run([sys.executable, "-m", "birefnet.stages.shard", "-q", "--set", "shard.out=data/shards_cli"],
                         cwd=workspace, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    for split in ("train", "val", "test"):
        flow_index = json.loads((workspace / "data/shards" / split / "index.json").read_text(encoding="utf-8"))
        cli_index = json.loads((workspace / "data/shards_cli" / split / "index.json").read_text(encoding="utf-8"))
        assert flow_index == cli_index


def test_bad_params_fail_the_flow_without_retry(harness: None, workspace: Path) -> None:
    t0 = time.perf_counter()
    state = ingest_flow(workdir=str(workspace), overrides=["data.size=[65,64]"], return_state=True)
    assert state.is_failed()
    with pytest.raises(ParamsError, match="multiples of 32"):
        state.result()
    assert _task_runs(state.state_details.flow_run_id) == {"load-params": 1}
    assert time.perf_counter() - t0 < 10, "no retry delay expected"


def test_bad_input_fails_the_stage_without_retry(harness: None, workspace: Path) -> None:
    state = ingest_flow(workdir=str(workspace), overrides=["data.root=data/nowhere"], return_state=True)
    assert state.is_failed()
    with pytest.raises(StageInputError, match="nowhere"):
        state.result()
    runs = _task_runs(state.state_details.flow_run_id)
    assert runs.get("ingest") == 1, runs


def test_transient_faults_are_retried_and_permanent_ones_are_not(harness: None) -> None:
    calls: list[str] = []

    @task(**{**RETRY_POLICY, "retry_delay_seconds": 0, "retry_jitter_factor": None})
    def flaky(kind: str) -> str:
        calls.append(kind)
        if kind == "transient" and calls.count(kind) == 1:
            raise ConnectionError("tracking server not answering")
        if kind == "permanent":
            raise StageInputError("mask missing for DIS-TR/x")
        return "ok"

    @flow
    def both() -> tuple[str, bool]:
        ok = flaky("transient")
        failed = flaky("permanent", return_state=True)
        return ok, failed.is_failed()

    assert both() == ("ok", True)
    assert calls.count("transient") == 2 and calls.count("permanent") == 1


def test_is_transient_classification() -> None:
    class MlflowException(Exception):  # stands in for mlflow.exceptions.MlflowException (matched by name)
        pass

    def wrapped(outer: BaseException, inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException as exc:
                raise outer from exc
        except BaseException as exc:
            return exc

    assert is_transient(ConnectionRefusedError())
    assert is_transient(TimeoutError())
    assert is_transient(OSError(5, "Input/output error"))
    assert is_transient(MlflowException("API request to http://127.0.0.1:5000/api/2.0/... failed"))
    assert is_transient(wrapped(RuntimeError("fit failed"), ConnectionError("cluster gone")))
    assert is_transient(CommandError("Unable to acquire lock", transient=True))
    assert not is_transient(CommandError("ingest exited with 3", transient=False))
    assert not is_transient(ParamsError("data.size"))
    assert not is_transient(wrapped(StageInputError("bad jpg"), OSError("truncated")))
    assert not is_transient(FileNotFoundError("data/raw"))
    assert not is_transient(MlflowException("RESOURCE_ALREADY_EXISTS"))
    assert not is_transient(RuntimeError("nan loss"))


def test_workspace_lock_waits_for_the_holder(tmp_path: Path) -> None:
    lock = tmp_path / ".dvc/tmp/retrain.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pathlib import Path\nfrom pipelines.common import workspace_lock\n"
        f"with workspace_lock({str(lock)!r}, 5, owner={{'flow_run_id': 'holder'}}):\n"
        "    print('locked', flush=True)\n    time.sleep(3)\n")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockTimeout), workspace_lock(lock, timeout_s=0.5, poll_s=0.1):
            pass
        seen: list[str] = []
        t0 = time.perf_counter()
        with workspace_lock(lock, timeout_s=30, poll_s=0.2, owner={"flow_run_id": "x"}, on_wait=seen.append):
            waited = time.perf_counter() - t0
            assert json.loads((lock.parent / "retrain.lock.owner").read_text())["pid"] == os.getpid()
        assert json.loads(seen[0])["flow_run_id"] == "holder" and len(seen) == 1 and waited > 1.0
        assert not (lock.parent / "retrain.lock.owner").exists()  # released: nobody named as holder
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_dvc_failures_are_classified_by_the_failing_stage() -> None:
    from pipelines.retrain import classify_failure

    args = ["/venv/bin/dvc", "repro"]
    ingest_log = ("Running stage 'synthesize':\n> birefnet synthesize\nRunning stage 'ingest':\n> birefnet ingest\n"
                  "error: ingest: 1 bad sample(s) under data/raw:\n  DIS-TR/im/x.jpg: not a JPEG\n"
                  "ERROR: failed to reproduce 'ingest': failed to run: birefnet ingest, exited with 3")
    bad_input = classify_failure(args, 1, ingest_log)
    assert not bad_input.transient
    assert str(bad_input).startswith("dvc repro failed (bad input, not retried)")
    assert "x.jpg: not a JPEG" in str(bad_input)
    assert not classify_failure(args, 1, "ERROR: failed to run: birefnet train, exited with 2").transient
    assert classify_failure(args, 1, "ERROR: Unable to acquire lock. Most likely another DVC process").transient
    # a harmless Ray teardown warning of an earlier stage does not make a later crash transient
    later = ("Running stage 'train':\nGetTimeoutError: Get timed out\nRunning stage 'evaluate':\n"
             "RuntimeError: nan\nERROR: failed to reproduce 'evaluate': exited with 1")
    assert not classify_failure(args, 1, later).transient
    tracking_down = ("Running stage 'register':\nmlflow.exceptions.MlflowException: API request to "
                     "http://127.0.0.1:5000/api/2.0/mlflow/runs/create failed")
    assert classify_failure(args, 1, tracking_down).transient


def test_reachable_remote_reads_the_default_remote_of_dvc_remote_list(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The default remote (`core.remote`) is the one checked, by its folder for a local remote (a long path
    included: `dvc remote list` wraps it in a narrow terminal)."""
    from pipelines.retrain import reachable_remote

    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True)
    store = tmp_path / "remote store"
    subprocess.run([dvc, "remote", "add", "other", str(tmp_path / "elsewhere")], cwd=tmp_path, check=True)
    subprocess.run([dvc, "remote", "add", "-d", "store", str(store)], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    assert reachable_remote() is None  # the default remote's folder does not exist yet
    store.mkdir()
    assert reachable_remote() == "store"
