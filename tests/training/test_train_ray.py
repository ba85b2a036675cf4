"""Training on real Ray: DDP on CPU, a two-node loopback cluster, fault injection, resume, schedule, determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from birefnet.config import load_params
from tests.helpers.listeners import ListenerSampler, is_loopback
from tests.helpers.ray_cluster import can_hide_folders, two_node_cluster
from tests.helpers.tinyrepo import merge

pytestmark = pytest.mark.slow

TINY = {
    "data": {"size": [64, 64], "workers": 1,
             "synthetic": {"counts": {"DIS-TR": 8, "DIS-VD": 3, "DIS-TE1": 2, "DIS-TE2": 2, "DIS-TE3": 2,
                                      "DIS-TE4": 2}, "min_side": 96, "max_side": 144}},
    "model": {"encoder": "test_convnext", "deform_impl": "sampling"},
    "loader": {"batch_size": 2, "workers": 0, "augment": ["flip", "rotate"]},
    "train": {"threads_per_worker": 1, "lr": 1e-3, "warmup_epochs": 0, "lr_schedule": "constant",
              "stages": [{"name": "main", "epochs": 1},
                         {"name": "ft", "epochs": 1, "loss": {"bce": 0, "iou": 0.5, "ssim": 10},
                          "decay": {"iou": 0.5}}]},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Path:
    """A folder with a tiny params.yaml and real shards made by the real stages."""
    from birefnet.stages import gradients, ingest, shard, synthesize

    ws = tmp_path_factory.mktemp("train_ws")
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


def _params(ws: Path, *overrides: str):
    return load_params(ws / "params.yaml", list(overrides))


def _in(ws: Path):
    class _Cwd:
        def __enter__(self) -> None:
            self.old = Path.cwd()
            os.chdir(ws)

        def __exit__(self, *exc: object) -> None:
            os.chdir(self.old)

    return _Cwd()


def _probes(folder: Path) -> dict[tuple[int, int], dict]:
    return {(d["rank"], d["epoch"]): d for d in (json.loads(p.read_text()) for p in folder.glob("rank*_epoch*.json"))}


def _assert_loopback_only(sampler: ListenerSampler, probes: dict[tuple[int, int], dict], ray_processes: set[str],
                          ) -> None:
    """Every socket that listened during training was on 127.0.0.1, and the sampling saw what it must.

    The probes (written by each rank inside the train loop, process group up) list the workers' own listeners:
    rank 0 serves the rendezvous store, so it listens on more sockets than Ray's core worker alone.
    """
    assert sampler.samples >= 3, sampler.samples
    assert not sampler.not_loopback(), "listeners off loopback during training:\n" + "\n".join(sampler.not_loopback())
    owners = " ".join(sampler.owners())
    for name in ray_processes:
        assert name in owners, (name, sorted(sampler.owners()))
    worker_pids = {p["pid"] for p in probes.values()}
    assert worker_pids <= {item.pid for item in sampler.seen}, "the sampler missed a train worker"
    for probe in probes.values():
        assert probe["listening"], probe
        assert all(is_loopback(address.rsplit(":", 1)[0]) for address in probe["listening"]), probe
    rank0 = {a for p in probes.values() if p["rank"] == 0 for a in p["listening"]}
    rank1 = {a for p in probes.values() if p["rank"] == 1 for a in p["listening"]}
    assert len(rank0) > len(rank1) >= 1, (rank0, rank1)  # the store's socket is rank 0's extra listener


def test_two_workers_ddp_in_process_and_schedule_switch(workspace: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from birefnet.stages.train import run

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # the default samples every 10 s
    with _in(workspace), ListenerSampler() as sampler:
        params = _params(workspace, "train.num_workers=2", f"train.run_name=ddp-{tmp_path.name}",
                         f"train.out={tmp_path / 'models'}")
        summary = run(params, probe_dir=str(tmp_path / "probe"))
    probes = _probes(tmp_path / "probe")
    _assert_loopback_only(sampler, probes, {"gcs_server", "raylet", "RayTrainWorker"})
    assert set(probes) == {(0, 0), (1, 0), (0, 1), (1, 1)}
    for epoch in (0, 1):
        assert probes[(0, epoch)]["params_sha256"] == probes[(1, epoch)]["params_sha256"]
        assert probes[(0, epoch)]["pid"] != probes[(1, epoch)]["pid"]
    assert probes[(0, 0)]["params_sha256"] != probes[(0, 1)]["params_sha256"]
    history = summary["history"]
    assert [h["stage"] for h in history] == ["main", "ft"]
    assert "train_loss_bce" in history[0] and "train_loss_bce" not in history[1]
    assert all(0.0 <= h["val_Sm"] <= 1.0 for h in history)
    assert (tmp_path / "models" / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "models" / "train.json").read_text())
    assert saved["epochs"] == 2 and saved["best_epoch"] in (0, 1)
    import birefnet

    model = birefnet.load_model(tmp_path / "models" / "model.safetensors")
    import torch

    assert model(torch.zeros(1, 3, 64, 64)).logits.shape == (1, 1, 64, 64)
    _assert_training_run_tracking(params, workspace, saved["mlflow_run_id"], epochs=2)


def _assert_training_run_tracking(params, workspace: Path, run_id: str, epochs: int) -> None:  # noqa: ANN001
    """The training run got a validation image per epoch from rank 0 (train.log_val_images of the first val set)
    and the driver's system metrics."""
    import mlflow

    from birefnet.tracking import resolve_tracking_uri
    from birefnet.training.trainer import VAL_IMAGE_KEY, VAL_IMAGES_TAG

    client = mlflow.MlflowClient(resolve_tracking_uri(params.tracking, workspace))
    run = client.get_run(run_id)
    pngs = sorted(f.path for f in client.list_artifacts(run_id, "images") if f.path.endswith(".png"))
    assert [p.split("+")[:3] for p in pngs] == [[f"images/{VAL_IMAGE_KEY}", "step", str(e)] for e in range(epochs)]
    first_val_set = params.data.val_sets[0]
    shown = min(params.train.log_val_images, TINY["data"]["synthetic"]["counts"][first_val_set])
    assert run.data.tags[VAL_IMAGES_TAG].startswith(f"{first_val_set}: ")
    assert len(run.data.tags[VAL_IMAGES_TAG].split(": ", 1)[1].split(", ")) == shown
    assert "system/cpu_utilization_percentage" in run.data.metrics and run.info.status == "FINISHED"


def test_worker_killed_mid_epoch_restores_from_checkpoint(workspace: Path, tmp_path: Path) -> None:
    from birefnet.stages.train import run

    marker = tmp_path / "killed.txt"
    with _in(workspace):
        params = _params(workspace, "train.num_workers=2", "train.max_failures=1",
                         f"train.run_name=fault-{tmp_path.name}", f"train.out={tmp_path / 'models'}",
                         "train.stages=[{name: main, epochs: 2}, {name: ft, epochs: 1, loss: {bce: 0}}]")
        summary = run(params, fault={"epoch": 1, "step": 1, "rank": 1, "marker": str(marker)})
    assert marker.is_file(), "the fault hook never fired"
    history = summary["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    steps_per_epoch = history[0]["global_step"]
    assert history[-1]["global_step"] == 3 * steps_per_epoch
    assert [h["stage"] for h in history] == ["main", "main", "ft"]


def test_driver_killed_then_rerun_resumes_inside_last_stage(workspace: Path, tmp_path: Path, venv_bin: Path) -> None:
    storage = tmp_path / "ckpt"
    overrides = ["--set", f"train.storage_path={storage}", "--set", "train.run_name=resume",
                 "--set", f"train.out={tmp_path / 'models'}",
                 "--set", "train.stages=[{name: main, epochs: 1}, {name: ft, epochs: 3, loss: {bce: 0}, "
                          "decay: {iou: 0.5}}]"]
    cmd = [str(venv_bin / "birefnet"), "train", "--params", "params.yaml", *overrides]
    log1 = open(tmp_path / "run1.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=workspace, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    reached = False
    while time.time() < deadline and proc.poll() is None:
        states = [json.loads(p.read_text()) for p in storage.glob("resume/checkpoint_*/state.json")]
        if any(s["epoch"] >= 1 for s in states):  # a checkpoint inside the last stage exists
            reached = True
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    log1.close()
    assert reached, (tmp_path / "run1.log").read_text(errors="replace")[-3000:]
    time.sleep(2)
    second = subprocess.run(cmd, cwd=workspace, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    summary = json.loads((tmp_path / "models" / "train.json").read_text())
    history = summary["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert [h["stage"] for h in history] == ["main", "ft", "ft", "ft"]
    params = _params(workspace, "train.stages=[{name: main, epochs: 1}, {name: ft, epochs: 3, loss: {bce: 0}, "
                                "decay: {iou: 0.5}}]")
    from birefnet.training.schedule import Schedule

    schedule = Schedule(params.train)
    assert schedule.weights_at(3).iou == pytest.approx(0.5 * 0.5**3)
    for h in history[1:]:
        assert "train_loss_bce" not in h


def test_identical_loss_curves_with_one_worker(workspace: Path, tmp_path: Path) -> None:
    from birefnet.stages.train import run

    curves = []
    for i in range(2):
        with _in(workspace):  # with a first stage trained at a smaller size, and precise BN before validation
            params = _params(workspace, f"train.run_name=det{i}-{tmp_path.name}", f"train.out={tmp_path / str(i)}",
                             "train.bn_recalibration=3",
                             "train.stages=[{name: small, epochs: 1, size: [32, 32]}, {name: main, epochs: 1}]")
            summary = run(params)
        curves.append([(h["stage"], h["train_loss"], h["val_Sm"]) for h in summary["history"]])
    assert curves[0] == curves[1] and [c[0] for c in curves[0]] == ["small", "main"]


def test_two_node_cluster_one_worker_per_node(workspace: Path, tmp_path: Path) -> None:
    from birefnet.stages.train import run

    with two_node_cluster(tmp_path / "ray") as address, _in(workspace), ListenerSampler() as sampler:
        params = _params(workspace, f"train.ray_address={address}", "train.num_workers=2",
                         "train.placement_strategy=STRICT_SPREAD", f"train.run_name=nodes-{tmp_path.name}",
                         f"train.out={tmp_path / 'models'}", "train.stages=[{name: main, epochs: 1}]")
        run(params, probe_dir=str(tmp_path / "probe"))
    probes = _probes(tmp_path / "probe")
    _assert_loopback_only(sampler, probes, {"gcs_server", "raylet", "RayTrainWorker"})
    assert len({item.pid for item in sampler.seen if item.process.endswith("raylet")}) == 2, "both nodes' raylets"
    assert probes[(0, 0)]["node"] != probes[(1, 0)]["node"]
    assert probes[(0, 0)]["params_sha256"] == probes[(1, 0)]["params_sha256"]


def _node_views(address: str, folder: Path) -> list[list[str] | None]:
    """What every node of the cluster at ``address`` lists in ``folder`` (None: no such folder there)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def look(path: str) -> list[str] | None:
        return sorted(os.listdir(path)) if os.path.isdir(path) else None

    ray.init(address=address, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=0)(look)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        return ray.get([remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False))
                        .remote(str(folder)) for n in nodes])
    finally:
        ray.shutdown()


@pytest.mark.skipif(not can_hide_folders(), reason="needs mount namespaces (unshare) to hide the driver's folder")
def test_two_node_cluster_trains_without_the_driver_folder(workspace: Path, tmp_path: Path, repo_root: Path,
                                                           s3_server, s3_bucket: str) -> None:  # noqa: ANN001
    """Both nodes run in a mount namespace where the driver's folder is empty (as on other machines): the shards
    and checkpoints are in the bucket, the code reaches the workers as a runtime_env py_module, nothing chdirs."""
    import shutil

    from birefnet.stages import shard
    from birefnet.stages.train import run

    driver = tmp_path / "driver"
    shutil.copytree(workspace, driver, ignore=shutil.ignore_patterns("models", "shards", "mlruns*", "mlflow.db"))
    shards, storage = f"s3://{s3_bucket}/shards", f"s3://{s3_bucket}/ray"
    with _in(driver):
        assert shard.main(["--params", "params.yaml", "-q", "--set", f"shard.out={shards}"]) == 0
    shared = tmp_path / "shared"  # the tracking store every node reaches (a tracking server on a real cluster)
    shared.mkdir()
    with two_node_cluster(tmp_path / "ray", hide=[driver]) as address, _in(driver):
        views = _node_views(address, driver)
        params = _params(driver, f"shard.out={shards}", f"train.storage_path={storage}",
                         f"train.ray_address={address}", "train.num_workers=2",
                         "train.placement_strategy=STRICT_SPREAD", f"train.run_name=hidden-{tmp_path.name}",
                         "train.stages=[{name: main, epochs: 1}]", f"tracking.uri=sqlite:///{shared / 'mlflow.db'}")
        summary = run(params, probe_dir=str(shared / "probe"))
    assert (driver / "params.yaml").is_file() and views == [[], []], views  # the nodes cannot see the driver's files
    probes = _probes(shared / "probe")
    assert probes[(0, 0)]["node"] != probes[(1, 0)]["node"]
    assert probes[(0, 0)]["params_sha256"] == probes[(1, 0)]["params_sha256"]
    for probe in probes.values():
        assert not probe["cwd"].startswith(str(driver)), probe["cwd"]
        # the driver's package, shipped as a runtime_env py_module, not the copy the nodes have installed
        assert "py_modules" in probe["code"] and not probe["code"].startswith(str(repo_root)), probe["code"]
    assert [h["epoch"] for h in summary["history"]] == [0]
    assert (driver / "models" / "model.safetensors").is_file()
    keys = s3_server.list_keys(s3_bucket, "ray/")
    assert any(k.endswith("/state.json") for k in keys), keys[:20]


def test_bad_params_rejected_before_ray_starts(workspace: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "birefnet.cli", "train", "--params", "params.yaml", "--set",
                           "train.stages=[]"], cwd=workspace, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "train.stages" in proc.stderr
