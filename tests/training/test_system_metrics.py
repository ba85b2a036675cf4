"""The train stage's MLflow run records system metrics (MLflow's monitor, started and stopped with the run)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from birefnet.stages.train import end_run, start_system_metrics


def test_system_metrics_reach_the_run_and_stop_with_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.3")  # the default samples every 10 s
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("system-metrics", (tmp_path / "a").as_uri())).info.run_id
    monitor = start_system_metrics(run_id, uri)
    assert monitor is not None
    time.sleep(1.5)
    end_run(client, run_id, monitor, "FINISHED")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert 0.0 <= run.data.metrics["system/cpu_utilization_percentage"] <= 100.0
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0
    history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2 and [m.step for m in history] == list(range(len(history)))
    time.sleep(0.8)  # the monitor stopped with the run: no sample arrives afterwards
    assert len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")) == len(history)


def test_system_metrics_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    assert start_system_metrics("0" * 32, "sqlite:///unused.db") is None
