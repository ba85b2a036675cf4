"""Ray Train: the per-worker loop and the driver that runs it (``TorchTrainer``).

The worker loop builds the model and loaders from the params it receives, resumes from
``ray.train.get_checkpoint()`` when there is one, and runs the staged schedule; rank 0 validates, logs to
MLflow and writes checkpoints. Everything that decides what happens at an epoch (stage, loss weights, lr,
seeds, loader shuffle) is a function of the epoch number, so a restart from a checkpoint continues exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from birefnet.config import Params, params_to_dict
from birefnet.training.schedule import Schedule

log = logging.getLogger("birefnet.train")

SCORE_METRIC = "val_Sm"


@dataclass(frozen=True)
class TrainResult:
    """What the driver hands back: the best checkpoint folder and the run's history."""

    run_name: str
    storage_path: str
    best_checkpoint: Path
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, Any]]
    seconds: float


# ------------------------------------------------------------------------------------------ worker side


def make_optimizer(model: torch.nn.Module, params: Params) -> torch.optim.Optimizer:
    """Adam / AdamW over trainable parameters with lr, betas and weight decay from ``train``.

    The fused kernel (one pass over each parameter for the whole update) is used when every parameter is a
    floating-point tensor on the CPU or CUDA: on the CPU default it takes the optimizer step from 7 % of a
    training step to about 3 %. Its results equal the multi-tensor kernel's up to float rounding.
    """
    train = params.train
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = bool(trainable) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in trainable)
    kind = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    return kind(trainable, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay, fused=fused or None)


def ddp_options(freeze_encoder_epochs: int | str, start_epoch: int) -> dict[str, Any]:
    """DDP keyword arguments (``prepare_model``'s ``parallel_strategy_kwargs``) for the encoder freeze.

    DDP fixes at wrap time which parameters it all-reduces: those with ``requires_grad``. Frozen for the whole
    run (``all``), the encoder is frozen before wrapping and stays out. Frozen for the first K epochs only, it
    must be wrapped trainable, or after the unfreeze every rank would train its own encoder, unsynchronised;
    while frozen its parameters then get no gradient, which DDP accepts only with ``find_unused_parameters``
    (a walk over the autograd graph each step; kept after the unfreeze, as DDP cannot be re-wrapped safely in
    place). A run resumed at or after epoch K needs neither.

    Args:
        freeze_encoder_epochs: ``train.freeze_encoder_epochs`` (0, K or ``all``).
        start_epoch: first epoch this process trains (after a resume, the checkpoint's epoch + 1).
    """
    if freeze_encoder_epochs != "all" and start_epoch < int(freeze_encoder_epochs):
        return {"find_unused_parameters": True}
    return {}


#: GPU memory presets: (gradient checkpointing, largest per-GPU batch at 1024x1024 with bf16).
MEMORY_PRESETS: dict[str, tuple[bool, int]] = {"24gb": (True, 2), "40gb": (True, 4), "80gb": (False, 4)}


def apply_memory_preset(params: Params) -> Any:
    """The model params to build with ``train.memory_preset`` applied (gradient checkpointing on small GPUs).

    Raises:
        ValueError: the per-GPU batch exceeds what the preset fits at ``data.size`` (scaled from 1024x1024).
    """
    preset = params.train.memory_preset
    if preset == "none":
        return params.model
    checkpointing, batch_at_1024 = MEMORY_PRESETS[preset]
    width, height = params.data.size
    fits = max(1, int(batch_at_1024 * (1024 * 1024) / (width * height)))
    if params.loader.batch_size > fits:
        raise ValueError(f"loader.batch_size {params.loader.batch_size} exceeds what train.memory_preset {preset} "
                         f"fits at {width}x{height} ({fits}); lower the batch or pick a larger preset")
    return params.model.model_copy(update={"gradient_checkpointing": checkpointing or
                                           params.model.gradient_checkpointing})


@dataclass
class WorkerState:
    """What one worker builds before its first epoch (see :func:`train_loop_per_worker`)."""

    config: dict[str, Any]
    params: Params
    rank: int
    world: int
    device: torch.device
    scaler: torch.amp.GradScaler | None
    model_params: Any = None
    model: Any = None
    optimizer: Any = None
    schedule: Any = None
    train_loader: Any = None
    val_loaders: dict[str, Any] = field(default_factory=dict)
    criterion: Any = None
    client: Any = None


@dataclass
class RunProgress:
    """What a checkpoint carries across restarts: the first epoch to train, the step count, history and best."""

    start_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point.

    ``config`` holds ``params`` (dict, with the driver's local paths made absolute: :func:`worker_params`),
    ``mlflow_run_id``, ``tracking_uri`` (absolute) and two optional test hooks: ``probe_dir`` (per-rank parameter
    digests) and ``fault`` (``{"epoch", "step", "rank", "marker"}``: that rank's process exits once, mid-epoch, as a
    crashed worker would). The worker never changes directory and never needs the driver's folder: on a cluster,
    shards and storage are URLs (``s3://``) or paths of a volume every node mounts at the same place.
    """
    worker = setup_worker(config)
    build_model_and_optimizer(worker)
    progress = resume_or_initialize(worker)
    wrap_model(worker, progress.start_epoch)
    build_loaders_and_tracking(worker)
    for epoch in range(progress.start_epoch, worker.schedule.total_epochs):
        run_epoch(worker, progress, epoch)


def setup_worker(config: dict[str, Any]) -> WorkerState:
    """Logging, params, rank, seeds and threads, the device checks and the fp16 grad scaler of this worker.

    Raises:
        ValueError: ``train.precision: fp16`` on a worker without a CUDA device.
    """
    import ray.train
    import ray.train.torch

    from birefnet.stages.common import setup_logging
    from birefnet.training.engine import native_cpu_bf16
    from birefnet.training.runtime import setup_runtime

    setup_logging()
    params = Params.model_validate(config["params"])
    train = params.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    setup_runtime(train.seed + rank, train.threads_per_worker)
    device = ray.train.torch.get_device()
    if rank == 0 and device.type == "cpu" and train.precision == "bf16" and not native_cpu_bf16():
        log.warning("train.precision bf16 on a CPU without native bf16 kernels (AVX512-BF16/AMX) is emulated and "
                    "slower than fp32; set train.precision: fp32 (or auto) on this machine")
    if train.precision == "fp16" and device.type != "cuda":
        raise ValueError(f"train.precision fp16 needs a CUDA device, this worker trains on {device}; use fp32 or bf16")
    # fp16's narrow exponent range needs loss scaling (bf16 has fp32's and does not); the scaler is checkpointed
    scaler = torch.amp.GradScaler(device.type) if train.precision == "fp16" else None
    return WorkerState(config=config, params=params, rank=rank, world=world, device=device, scaler=scaler)


def build_model_and_optimizer(worker: WorkerState) -> None:
    """Build the model (``train.init_from`` fixes ``model.*``), its optimiser and the schedule into ``worker``."""
    from birefnet.models import build_model
    from birefnet.training.init import with_init_model_params

    params = worker.params
    if params.train.init_from:  # the weights file fixes model.* (the stage already checked params against it)
        params = worker.params = with_init_model_params(params, announce=False)
    worker.model_params = apply_memory_preset(params)
    model = build_model(worker.model_params)
    if params.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    worker.model = model
    worker.optimizer = make_optimizer(model, params)
    worker.schedule = Schedule(params.train)


def resume_or_initialize(worker: WorkerState) -> RunProgress:
    """Restore the run from Ray's checkpoint when there is one, else load ``train.init_from`` weights if set."""
    import ray.train

    from birefnet.training.checkpoint import load_training_state
    from birefnet.training.init import initialize_weights, tracking_uri_for
    from birefnet.training.runtime import set_rng_state

    train, rank = worker.params.train, worker.rank
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        if train.init_from:
            uri = worker.config.get("tracking_uri") or tracking_uri_for(worker.params.tracking)
            report = initialize_weights(worker.model, train.init_from, uri)
            if rank == 0:
                log.info("initialised weights from %s: %s", train.init_from, report.summary())
        return RunProgress()
    with checkpoint.as_directory() as folder:
        state = load_training_state(folder, model=worker.model, optimizer=worker.optimizer, scaler=worker.scaler)
    progress = RunProgress(start_epoch=int(state["epoch"]) + 1, global_step=int(state["global_step"]),
                           history=list(state["history"]), best=dict(state.get("best", {})))
    if rank == 0 and "rng" in state:
        set_rng_state(state["rng"])
    log.info("rank %d resumed from %s at epoch %d (stage %s)", rank, checkpoint.path, progress.start_epoch,
             state.get("stage"))
    return progress


def wrap_model(worker: WorkerState, start_epoch: int) -> None:
    """Freeze the encoder for the whole run if asked, wrap the model for DDP, and compile it on GPU."""
    import ray.train.torch

    from birefnet.training.engine import encoder_of, set_encoder_frozen

    freeze, rank = worker.params.train.freeze_encoder_epochs, worker.rank
    if freeze == "all":  # frozen before wrapping: out of DDP's buckets (see ddp_options)
        set_encoder_frozen(worker.model, True)
    model = ray.train.torch.prepare_model(worker.model, parallel_strategy_kwargs=ddp_options(freeze, start_epoch))
    if freeze and rank == 0:
        log.info("encoder frozen %s (%d parameter tensors: no gradient, no optimiser state, eval mode)",
                 "for the whole run" if freeze == "all" else f"for the first {freeze} epoch(s)",
                 len(list(encoder_of(model).parameters())))
    if worker.params.train.compile:
        if worker.device.type == "cuda":
            model = torch.compile(model)
        elif rank == 0:
            log.warning("train.compile is only applied on GPU; training uncompiled on %s", worker.device.type)
    worker.model = model


def build_loaders_and_tracking(worker: WorkerState) -> None:
    """The training loader (this rank's share), rank 0's validation loaders, the criterion and MLflow client."""
    from birefnet.data.loader import eval_loader_from_params, train_loader_from_params
    from birefnet.training.criterion import build_criterion

    params, rank = worker.params, worker.rank
    worker.train_loader = train_loader_from_params(params, rank=rank, world_size=worker.world)
    if rank == 0:
        worker.val_loaders = {name: eval_loader_from_params(params, name, rank=0, world_size=1, workers=0)
                              for name in params.data.val_sets}
    worker.criterion = build_criterion()
    if rank == 0 and worker.config.get("mlflow_run_id"):
        import mlflow

        worker.client = mlflow.MlflowClient(worker.config["tracking_uri"])


def run_epoch(worker: WorkerState, progress: RunProgress, epoch: int) -> None:
    """Train one epoch, validate when due (rank 0), log, and report to Ray with a checkpoint when due."""
    train = worker.params.train
    at = worker.schedule.at(epoch)
    metrics = train_epoch(worker, epoch, at)
    progress.global_step += len(worker.train_loader)
    record: dict[str, Any] = {"epoch": epoch, "stage": at.stage.name, "stage_index": at.index, "lr": at.lr,
                              "global_step": progress.global_step, **{f"train_{k}": v for k, v in metrics.items()}}
    last = epoch == worker.schedule.total_epochs - 1
    if worker.rank == 0 and worker.val_loaders and ((epoch + 1) % train.val_every == 0 or last):
        record.update(validate(worker))
    if worker.rank == 0:
        log_epoch(worker, epoch, at, metrics, record)
    if "val_Sm" in record and record["val_Sm"] >= progress.best.get("val_Sm", float("-inf")):
        progress.best = {"epoch": epoch, **{k: v for k, v in record.items() if k.startswith("val_")}}
    progress.history.append(record)
    if worker.config.get("probe_dir"):
        import ray

        _write_probe(Path(worker.config["probe_dir"]), worker.rank, epoch, worker.model,
                     ray.get_runtime_context().get_node_id())
    if worker.client is not None:
        log_to_mlflow(worker.client, worker.config["mlflow_run_id"], epoch, at.stage.name, record)
    report_epoch(worker, progress, epoch, at, metrics, record, due=(epoch + 1) % train.checkpoint_every == 0 or last)


def _fault_hook(fault: dict[str, Any] | None, rank: int, epoch: int) -> Any:
    """Test hook: ``on_step`` that exits this process once at the configured step (see ``fault``), or None."""
    if not fault or rank != fault["rank"] or epoch != fault["epoch"]:
        return None

    def on_step(step: int, parts: dict[str, float]) -> None:
        if step == fault["step"]:
            marker = Path(fault["marker"])
            if not marker.exists():
                marker.write_text(f"killed at epoch {epoch} step {step}\n", encoding="utf-8")
                os._exit(17)

    return on_step


def train_epoch(worker: WorkerState, epoch: int, at: Any) -> dict[str, float]:
    """One pass over this rank's training data at the schedule's ``at``, then precise BN on rank 0."""
    from birefnet.training.engine import encoder_of, recalibrate_batchnorm, set_encoder_frozen, train_one_epoch
    from birefnet.training.runtime import seed_everything

    train, rank, model = worker.params.train, worker.rank, worker.model
    seed_everything(train.seed + rank + 7919 * (epoch + 1))
    worker.train_loader.set_epoch(epoch)
    # precise BN on rank 0 only: its statistics are the ones validated and checkpointed, and DDP broadcasts
    # rank 0's buffers to the other ranks at the next forward
    recent = deque(maxlen=train.bn_recalibration) if rank == 0 and train.bn_recalibration else None
    if train.freeze_encoder_epochs:  # a function of the epoch: a resumed run freezes what it froze before
        set_encoder_frozen(model, at.encoder_frozen)
    metrics = train_one_epoch(model, worker.train_loader, worker.optimizer, worker.criterion, device=worker.device,
                              weights=at.weights, supervise=at.stage.supervise, lr=at.lr, precision=train.precision,
                              grad_clip=train.grad_clip, on_step=_fault_hook(worker.config.get("fault"), rank, epoch),
                              channels_last=train.channels_last, size=at.stage.size, recent=recent,
                              size_at=worker.schedule.size_at(epoch), scaler=worker.scaler,
                              freeze_encoder=at.encoder_frozen)
    if recent:
        recalibrate_batchnorm(model, list(recent), device=worker.device, precision=train.precision,
                              channels_last=train.channels_last,
                              exclude=[encoder_of(model)] if at.encoder_frozen else ())
    return metrics


def validate(worker: WorkerState) -> dict[str, float]:
    """``val_<set>_<metric>`` for every validation set and ``val_<metric>``, the mean over the sets."""
    from birefnet.training.engine import evaluate

    train = worker.params.train
    per_set = {name: evaluate(worker.model, loader, device=worker.device, precision=train.precision,
                              channels_last=train.channels_last)
               for name, loader in worker.val_loaders.items()}
    out: dict[str, float] = {}
    for name, values in per_set.items():
        out.update({f"val_{name}_{k}": v for k, v in values.items() if k != "n"})
    for key in ("Sm", "MAE", "maxF", "wF", "meanE"):
        out[f"val_{key}"] = sum(v[key] for v in per_set.values()) / len(per_set)
    return out


def log_epoch(worker: WorkerState, epoch: int, at: Any, metrics: dict[str, float], record: dict[str, Any]) -> None:
    """The epoch's log line: stage, size, losses, throughput of all ranks, skipped steps and validation.

    On rank 0 with an MLflow run it also logs the epoch's validation mask image (``train.log_val_images``
    samples, :func:`log_validation_images`), every epoch whether or not the metrics were due (one forward pass
    of those samples).
    """
    train = worker.params.train
    if worker.client is not None and train.log_val_images and worker.val_loaders:
        set_name, loader = next(iter(worker.val_loaders.items()))
        log_validation_images(worker.client, worker.config["mlflow_run_id"], worker.model, loader, epoch,
                              train.log_val_images, device=worker.device, precision=train.precision,
                              channels_last=train.channels_last, set_name=set_name)
    log.info("epoch %d/%d [%s%s%s] loss %.4f (%s) %.1f samples/s%s%s", epoch + 1, worker.schedule.total_epochs,
             at.stage.name, _size_note(at.stage), ", encoder frozen" if at.encoder_frozen else "",
             metrics["loss"],
             ", ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k.startswith("loss_")),
             metrics["samples_per_s"] * worker.world,
             f" | {int(metrics['skipped_steps'])} steps skipped (inf/NaN gradients), grad scale "
             f"{metrics['grad_scale']:g}" if "skipped_steps" in metrics else "",
             f" | val S {record['val_Sm']:.4f} MAE {record['val_MAE']:.4f}" if "val_Sm" in record else "")


def log_to_mlflow(client: Any, run_id: str, epoch: int, stage: str, record: dict[str, Any]) -> None:
    """Log the epoch's numeric record as MLflow metrics at step ``epoch`` and tag the active stage."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    numeric = {k: float(v) for k, v in record.items() if isinstance(v, int | float) and k != "epoch"}
    client.log_batch(run_id, metrics=[Metric(k, v, now, epoch) for k, v in numeric.items()])
    client.set_tag(run_id, "active_stage", stage)


def report_epoch(worker: WorkerState, progress: RunProgress, epoch: int, at: Any, metrics: dict[str, float],
                 record: dict[str, Any], *, due: bool) -> None:
    """``ray.train.report`` the epoch, with rank 0's checkpoint folder when one is ``due``."""
    import ray.train

    from birefnet.training.checkpoint import save_training_state
    from birefnet.training.runtime import rng_state

    report_metrics = {"epoch": epoch, "stage": at.stage.name, "loss": metrics["loss"],
                      SCORE_METRIC: record.get("val_Sm", progress.best.get("val_Sm", 0.0))}
    if not due:
        ray.train.report(report_metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if worker.rank == 0:
            state = {"epoch": epoch, "stage": at.stage.name, "stage_index": at.index,
                     "global_step": progress.global_step, "loader_epoch": epoch + 1, "history": progress.history,
                     "best": progress.best, "rng": rng_state(), "params": worker.config["params"]}
            save_training_state(tmp, model=worker.model, model_params=worker.model_params,
                                optimizer=worker.optimizer, scaler=worker.scaler, state=state,
                                extra={"birefnet.data.size": "{},{}".format(*worker.params.data.size)})
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(report_metrics, checkpoint=checkpoint)


def _size_note(stage: Any) -> str:
    """`` at WxH`` / `` at dynamic WxH ranges`` for the epoch log line; empty at ``data.size``."""
    if stage.dynamic_size is not None:
        (min_w, max_w), (min_h, max_h) = stage.dynamic_size
        return f" at dynamic {min_w}-{max_w}x{min_h}-{max_h}"
    return " at {}x{}".format(*stage.size) if stage.size else ""


def _write_probe(folder: Path, rank: int, epoch: int, model: torch.nn.Module, node_id: str) -> None:
    """Test hook: record this rank's parameter digest, node, listening sockets, working directory and the file
    its ``birefnet`` package was imported from, after an epoch.

    Parameters only: BatchNorm running statistics are per-rank by design (rank 0's are checkpointed). The
    listening sockets (``ip:port``) are this worker's own while the process group is up: the rendezvous store on
    rank 0, gloo's pairs, Ray's core worker.
    """
    import psutil

    import birefnet

    digest = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters()):
        digest.update(name.removeprefix("module.").encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    listening = sorted(f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process().net_connections(kind="inet")
                       if c.status == psutil.CONN_LISTEN)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}_epoch{epoch}.json").write_text(
        json.dumps({"rank": rank, "epoch": epoch, "node": node_id, "params_sha256": digest.hexdigest(),
                    "pid": os.getpid(), "listening": listening, "cwd": os.getcwd(), "code": birefnet.__file__}),
        encoding="utf-8")


# ------------------------------------------------------------------------------------------ driver side


def run_name_for(params: Params, data_digest: str) -> str:
    """A stable run name from everything that shapes training, so rerunning the same stage resumes it."""
    if params.train.run_name:
        return params.train.run_name
    keyed = params_to_dict(params)
    shaping = {k: keyed[k] for k in ("model", "train", "loader", "gradients")}
    shaping["data_size"] = keyed["data"]["size"]
    shaping["data"] = data_digest
    for volatile in ("ray_address", "storage_path", "out", "max_failures"):
        shaping["train"].pop(volatile, None)
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]
    return f"train-{digest}"


def _is_url(value: str) -> bool:
    return "://" in value


def _absolute(value: str | Path | None) -> str | None:
    """A local path made absolute against the driver's working directory; URLs and empty values unchanged."""
    if value is None or value == "" or _is_url(str(value)):
        return None if value is None else str(value)
    return str(Path(value).resolve())


def worker_params(params: Params, tracking_uri: str | None = None) -> dict[str, Any]:
    """The params the workers get: local paths the workers read made absolute on the driver (shards, init
    weights, encoder weights, storage) and the tracking URI resolved, so no worker depends on its working
    directory. Paths stay paths: on a cluster they must be URLs or a volume mounted at the same place on every
    node (see docs/operations.md)."""
    doc = params_to_dict(params)
    doc["shard"]["out"] = _absolute(doc["shard"]["out"])
    doc["train"]["storage_path"] = _absolute(doc["train"]["storage_path"])
    init_from = doc["train"].get("init_from")
    if init_from and not str(init_from).startswith("models:/"):
        doc["train"]["init_from"] = _absolute(init_from)
    doc["model"]["encoder_weights"] = _absolute(doc["model"].get("encoder_weights"))
    if tracking_uri:
        doc["tracking"]["uri"] = tracking_uri
    return doc


#: offline.env switches forwarded to the workers of a cluster the driver connects to (no paths: those are the
#: driver's; the nodes' own environment sets PYTHONPATH and PREFECT_HOME).
FORWARDED_SWITCHES = ("MLFLOW_DISABLE_TELEMETRY", "HF_HUB_OFFLINE", "DVC_NO_ANALYTICS", "TQDM_MININTERVAL",
                      "RAY_USAGE_STATS_ENABLED")


def cluster_runtime_env() -> dict[str, Any]:
    """The ``runtime_env`` a driver connecting to a running cluster gives its job: this ``birefnet`` package as a
    ``py_module`` (the workers run the driver's code, whatever the nodes have installed) and the telemetry
    switches. A driver started by ``ray job submit --runtime-env``/``--working-dir`` already runs in a job
    runtime_env: none is added then (Ray would refuse a second one)."""
    import birefnet

    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return {}
    env_vars = {key: os.environ[key] for key in FORWARDED_SWITCHES if os.environ.get(key)}
    return {"py_modules": [str(Path(birefnet.__file__).resolve().parent)], "env_vars": env_vars}


def init_ray(params: Params) -> bool:
    """Connect to ``train.ray_address`` / ``RAY_ADDRESS`` (shipping this package to the workers, see
    :func:`cluster_runtime_env`), or start Ray in-process on 127.0.0.1.

    Returns:
        True when this call started Ray (the caller shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = params.train.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        runtime_env = cluster_runtime_env()
        log.info("connecting to the Ray cluster at %s%s", address,
                 " (this birefnet package shipped to the workers)" if runtime_env else "")
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env or None)
        return True
    needed = params.train.num_workers * params.train.cpus_per_worker
    ray.init(address="local", num_cpus=max(int(needed + 0.999), os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=True)
    return True


def fit(params: Params, *, data_digest: str, mlflow_run_id: str | None = None, tracking_uri: str | None = None,
        fault: dict[str, Any] | None = None, probe_dir: str | None = None) -> TrainResult:
    """Run (or resume) training with Ray Train and return the best checkpoint.

    Args:
        params: the whole validated params.
        data_digest: digest of the training data (shard indexes), part of the run name.
        mlflow_run_id: run rank 0 logs metrics to (created by the caller), or None.
        tracking_uri: MLflow tracking URI for that run.
        fault: test hook, see :func:`train_loop_per_worker`.
        probe_dir: test hook: each rank writes its parameter digest and node after every epoch.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from birefnet.tracking import resolve_tracking_uri
    from birefnet.training.ray_backend import BoundTorchConfig

    train = params.train
    storage = train.storage_path if _is_url(train.storage_path) else str(Path(train.storage_path).resolve())
    tracking_uri = tracking_uri or resolve_tracking_uri(params.tracking)
    name = run_name_for(params, data_digest)
    started_ray = init_ray(params)
    start = time.perf_counter()
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"params": worker_params(params, tracking_uri), "mlflow_run_id": mlflow_run_id,
                               "tracking_uri": tracking_uri, "fault": fault, "probe_dir": probe_dir},
            torch_config=BoundTorchConfig(),
            scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                         resources_per_worker={"CPU": train.cpus_per_worker},
                                         placement_strategy=train.placement_strategy),
            run_config=RunConfig(name=name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=train.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints,
                                                                    checkpoint_score_attribute=SCORE_METRIC,
                                                                    checkpoint_score_order="max")),
        )
        result = trainer.fit()
    finally:
        if started_ray:
            ray.shutdown()
    seconds = time.perf_counter() - start
    if result.error is not None:
        raise result.error
    candidates = result.best_checkpoints or []
    if not candidates:
        raise RuntimeError(f"training run {name} reported no checkpoint (storage {storage})")
    checkpoint, metrics = max(candidates, key=lambda cm: (cm[1].get(SCORE_METRIC, 0.0), cm[1].get("epoch", 0)))
    latest = result.checkpoint or checkpoint
    with latest.as_directory() as folder:
        state = json.loads((Path(folder) / "state.json").read_text(encoding="utf-8"))
    local = Path(tempfile.mkdtemp(prefix="birefnet-best-"))
    with checkpoint.as_directory() as folder:
        shutil.copytree(folder, local, dirs_exist_ok=True)
    return TrainResult(run_name=name, storage_path=storage, best_checkpoint=local,
                       best_epoch=int(metrics.get("epoch", -1)), best_metrics=dict(metrics),
                       history=list(state["history"]), seconds=seconds)


# ------------------------------------------------------------------------------------------ validation images

#: MLflow image key of the per-epoch validation grid (``images/val_masks+step+<epoch>+...png`` in the run).
VAL_IMAGE_KEY = "val_masks"
#: Run tag naming the set and the samples (rows, top to bottom) of the validation image.
VAL_IMAGES_TAG = "birefnet.val_images"
#: Longest side of one panel of the grid: keeps the image a few hundred KB at any ``data.size``.
VAL_PANEL_SIDE = 256
#: Pixels between panels and rows of the grid.
VAL_GRID_GAP = 4


def validation_samples(loader: Any, count: int) -> dict[str, Any]:
    """The first ``count`` samples of an evaluation loader, in its order (the set's index order: the same
    samples every epoch).

    Returns:
        ``image`` (N, 3, H, W) float32 ImageNet-normalised, ``mask`` (N, 1, H, W) float32 in [0, 1] and ``key``
        (N file stems), N <= ``count`` (fewer when the set is smaller).
    """
    from birefnet.data.loader import normalize_batch

    images: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    keys: list[str] = []
    for batch in loader:
        batch = normalize_batch(batch)
        take = min(count - len(keys), int(batch["image"].shape[0]))
        images.append(batch["image"][:take])
        masks.append(batch["mask"][:take])
        keys += [str(k) for k in batch["key"][:take]]
        if len(keys) >= count:
            break
    if not keys:
        return {"image": torch.zeros(0, 3, 1, 1), "mask": torch.zeros(0, 1, 1, 1), "key": []}
    return {"image": torch.cat(images), "mask": torch.cat(masks), "key": keys}


def _panel(image: Any, side: int) -> Any:
    """``(H, W, 3)`` uint8 resized (area) so its longer side is at most ``side``."""
    import cv2

    height, width = image.shape[:2]
    scale = min(1.0, side / max(height, width))
    if scale == 1.0:
        return image
    return cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                      interpolation=cv2.INTER_AREA)


def validation_grid(images: Any, masks: Any, predictions: Any, *, side: int = VAL_PANEL_SIDE,
                    gap: int = VAL_GRID_GAP) -> Any:
    """One row per sample: image | ground truth | prediction, on a white background.

    Args:
        images: ``(N, H, W, 3)`` uint8 RGB.
        masks: ``(N, H, W)`` uint8 ground truth (0..255).
        predictions: ``(N, H, W)`` uint8 predicted masks (0..255).
        side: longest side of a panel (larger samples are shrunk).
        gap: pixels between panels and rows.

    Returns:
        ``(N * (h + gap) - gap, 3 * (w + gap) - gap, 3)`` uint8, with ``(h, w)`` the shrunk sample size.
    """
    import numpy as np

    if len(images) == 0:
        raise ValueError("validation_grid needs at least one sample, got none")
    if not len(images) == len(masks) == len(predictions):
        raise ValueError(f"validation_grid: {len(images)} images, {len(masks)} masks and {len(predictions)} "
                         "predictions; expected the same number of each")
    rows = []
    for image, mask, prediction in zip(images, masks, predictions, strict=True):
        panels = [_panel(np.ascontiguousarray(image), side),
                  *(_panel(np.repeat(np.asarray(m)[:, :, None], 3, axis=2), side) for m in (mask, prediction))]
        height, width = panels[0].shape[:2]
        row = np.full((height, 3 * width + 2 * gap, 3), 255, np.uint8)
        for i, panel in enumerate(panels):
            row[:, i * (width + gap):i * (width + gap) + width] = panel
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    height = sum(r.shape[0] for r in rows) + gap * (len(rows) - 1)
    grid = np.full((height, width, 3), 255, np.uint8)
    top = 0
    for row in rows:
        grid[top:top + row.shape[0], :row.shape[1]] = row
        top += row.shape[0] + gap
    return grid


@torch.no_grad()
def predict_validation_samples(model: torch.nn.Module, samples: dict[str, Any], *, device: torch.device,
                               precision: str = "auto", channels_last: bool = False) -> tuple[Any, Any, Any]:
    """Images, ground truths and predictions of ``samples`` (:func:`validation_samples`) as uint8 arrays.

    The model runs in eval mode as in :func:`birefnet.training.engine.evaluate` (rank 0 only, outside DDP) and
    is put back in the mode it was in.

    Returns:
        ``(N, H, W, 3)`` RGB images, ``(N, H, W)`` ground truths, ``(N, H, W)`` predicted masks.
    """
    import numpy as np

    from birefnet.imaging import IMAGENET_MEAN, IMAGENET_STD, predictions_to_uint8
    from birefnet.models.io import unwrap_model
    from birefnet.precision import autocast_for

    module = unwrap_model(model, keep_compiled=True)
    was_training = module.training
    module.eval()
    try:
        image = samples["image"].to(device)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, precision):
            logits = module(image).logits
    finally:
        module.train(was_training)
    predictions = predictions_to_uint8(logits)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = ((samples["image"].float().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    masks = (samples["mask"][:, 0].float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(rgb.permute(0, 2, 3, 1).numpy()), masks.numpy(), predictions


def log_validation_images(client: Any, run_id: str, model: torch.nn.Module, loader: Any, epoch: int, count: int, *,
                          device: torch.device, precision: str = "auto", channels_last: bool = False,
                          set_name: str = "") -> bool:
    """Log the epoch's validation grid (:func:`validation_grid` of the first ``count`` samples of ``loader``) to
    the MLflow run as image ``val_masks`` at step ``epoch``, and name the samples in tag ``birefnet.val_images``.

    It goes through ``client`` (the worker's own ``MlflowClient``): nothing is shared on disk with the driver,
    so it works with workers on other nodes. An MLflow or I/O failure is logged as a warning, not raised: a
    missing picture must not fail (and restart) a training run.

    Returns:
        True when the image was logged.
    """
    from mlflow.exceptions import MlflowException

    samples = validation_samples(loader, count)
    if not samples["key"]:
        log.warning("no validation image logged at epoch %d: validation set %s yielded no sample", epoch, set_name)
        return False
    grid = validation_grid(*predict_validation_samples(model, samples, device=device, precision=precision,
                                                       channels_last=channels_last))
    try:
        client.log_image(run_id, grid, key=VAL_IMAGE_KEY, step=epoch)
        client.set_tag(run_id, VAL_IMAGES_TAG, f"{set_name}: {', '.join(samples['key'])}"[:5000])
    except (MlflowException, OSError) as exc:
        log.warning("could not log the validation image of epoch %d to MLflow run %s: %s", epoch, run_id, exc)
        return False
    return True
