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
from dataclasses import dataclass
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point.

    ``config`` holds ``params`` (dict), ``cwd``, ``mlflow_run_id``, ``tracking_uri`` and two optional test
    hooks: ``probe_dir`` (per-rank parameter digests) and ``fault`` (``{"epoch", "step", "rank", "marker"}``:
    that rank's process exits once, mid-epoch, as a crashed worker would).
    """
    import ray
    import ray.train
    import ray.train.torch

    from birefnet.data.loader import eval_loader_from_params, train_loader_from_params
    from birefnet.models import build_model
    from birefnet.stages.common import setup_logging
    from birefnet.training.checkpoint import load_training_state, save_training_state
    from birefnet.training.criterion import build_criterion
    from birefnet.training.engine import (
        encoder_of,
        evaluate,
        native_cpu_bf16,
        recalibrate_batchnorm,
        set_encoder_frozen,
        train_one_epoch,
    )
    from birefnet.training.init import initialize_weights, tracking_uri_for, with_init_model_params
    from birefnet.training.runtime import rng_state, seed_everything, set_rng_state, setup_runtime

    os.chdir(config["cwd"])
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

    if train.init_from:  # the weights file fixes model.* (the stage already checked params against it and logged)
        params = with_init_model_params(params, announce=False)
    model_params = apply_memory_preset(params)
    model = build_model(model_params)
    if train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, params)
    schedule = Schedule(train)
    start_epoch, global_step, history = 0, 0, []
    best: dict[str, Any] = {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_training_state(folder, model=model, optimizer=optimizer, scaler=scaler)
        start_epoch = int(state["epoch"]) + 1
        global_step = int(state["global_step"])
        history = list(state["history"])
        best = dict(state.get("best", {}))
        if rank == 0 and "rng" in state:
            set_rng_state(state["rng"])
        log.info("rank %d resumed from %s at epoch %d (stage %s)", rank, checkpoint.path, start_epoch,
                 state.get("stage"))
    elif train.init_from:
        report = initialize_weights(model, train.init_from, tracking_uri_for(params.tracking))
        if rank == 0:
            log.info("initialised weights from %s: %s", train.init_from, report.summary())
    if train.freeze_encoder_epochs == "all":  # frozen before wrapping: out of DDP's buckets (see ddp_options)
        set_encoder_frozen(model, True)
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs=ddp_options(train.freeze_encoder_epochs, start_epoch))
    if train.freeze_encoder_epochs and rank == 0:
        log.info("encoder frozen %s (%d parameter tensors: no gradient, no optimiser state, eval mode)",
                 "for the whole run" if train.freeze_encoder_epochs == "all"
                 else f"for the first {train.freeze_encoder_epochs} epoch(s)",
                 len(list(encoder_of(model).parameters())))
    if train.compile:
        if device.type == "cuda":
            model = torch.compile(model)
        elif rank == 0:
            log.warning("train.compile is only applied on GPU; training uncompiled on %s", device.type)

    train_loader = train_loader_from_params(params, rank=rank, world_size=world)
    val_loaders = {}
    if rank == 0:
        val_loaders = {name: eval_loader_from_params(params, name, rank=0, world_size=1, workers=0)
                       for name in params.data.val_sets}
    criterion = build_criterion(params)
    client = None
    if rank == 0 and config.get("mlflow_run_id"):
        import mlflow

        client = mlflow.MlflowClient(config["tracking_uri"])
    fault = config.get("fault")

    for epoch in range(start_epoch, schedule.total_epochs):
        at = schedule.at(epoch)
        seed_everything(train.seed + rank + 7919 * (epoch + 1))
        train_loader.set_epoch(epoch)

        def on_step(step: int, parts: dict[str, float], _epoch: int = epoch) -> None:
            if fault and rank == fault["rank"] and _epoch == fault["epoch"] and step == fault["step"]:
                marker = Path(fault["marker"])
                if not marker.exists():
                    marker.write_text(f"killed at epoch {_epoch} step {step}\n", encoding="utf-8")
                    os._exit(17)

        # precise BN on rank 0 only: its statistics are the ones validated and checkpointed, and DDP broadcasts
        # rank 0's buffers to the other ranks at the next forward
        recent = deque(maxlen=train.bn_recalibration) if rank == 0 and train.bn_recalibration else None
        if train.freeze_encoder_epochs:  # a function of the epoch: a resumed run freezes what it froze before
            set_encoder_frozen(model, at.encoder_frozen)
        metrics = train_one_epoch(model, train_loader, optimizer, criterion, device=device, weights=at.weights,
                                  supervise=at.stage.supervise, lr=at.lr, precision=train.precision,
                                  grad_clip=train.grad_clip, on_step=on_step, channels_last=train.channels_last,
                                  size=at.stage.size, recent=recent, size_at=schedule.size_at(epoch), scaler=scaler,
                                  freeze_encoder=at.encoder_frozen)
        if recent:
            recalibrate_batchnorm(model, list(recent), device=device, precision=train.precision,
                                  channels_last=train.channels_last,
                                  exclude=[encoder_of(model)] if at.encoder_frozen else ())
        global_step += len(train_loader)
        record: dict[str, Any] = {"epoch": epoch, "stage": at.stage.name, "stage_index": at.index, "lr": at.lr,
                                  "global_step": global_step, **{f"train_{k}": v for k, v in metrics.items()}}
        last = epoch == schedule.total_epochs - 1
        if rank == 0 and val_loaders and ((epoch + 1) % train.val_every == 0 or last):
            per_set = {name: evaluate(model, loader, device=device, precision=train.precision,
                                      channels_last=train.channels_last)
                       for name, loader in val_loaders.items()}
            for name, values in per_set.items():
                record.update({f"val_{name}_{k}": v for k, v in values.items() if k != "n"})
            for key in ("Sm", "MAE", "maxF", "wF", "meanE"):
                record[f"val_{key}"] = sum(v[key] for v in per_set.values()) / len(per_set)
        if rank == 0:
            log.info("epoch %d/%d [%s%s%s] loss %.4f (%s) %.1f samples/s%s%s", epoch + 1, schedule.total_epochs,
                     at.stage.name, _size_note(at.stage), ", encoder frozen" if at.encoder_frozen else "",
                     metrics["loss"],
                     ", ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items() if k.startswith("loss_")),
                     metrics["samples_per_s"] * world,
                     f" | {int(metrics['skipped_steps'])} steps skipped (inf/NaN gradients), grad scale "
                     f"{metrics['grad_scale']:g}" if "skipped_steps" in metrics else "",
                     f" | val S {record['val_Sm']:.4f} MAE {record['val_MAE']:.4f}" if "val_Sm" in record else "")
        if "val_Sm" in record and record["val_Sm"] >= best.get("val_Sm", float("-inf")):
            best = {"epoch": epoch, **{k: v for k, v in record.items() if k.startswith("val_")}}
        history.append(record)
        if config.get("probe_dir"):
            _write_probe(Path(config["probe_dir"]), rank, epoch, model, ray.get_runtime_context().get_node_id())
        if client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            numeric = {k: float(v) for k, v in record.items() if isinstance(v, int | float) and k != "epoch"}
            client.log_batch(config["mlflow_run_id"],
                             metrics=[Metric(k, v, now, epoch) for k, v in numeric.items()])
            client.set_tag(config["mlflow_run_id"], "active_stage", at.stage.name)
        report_metrics = {"epoch": epoch, "stage": at.stage.name, "loss": metrics["loss"],
                          SCORE_METRIC: record.get("val_Sm", best.get("val_Sm", 0.0))}
        due = (epoch + 1) % train.checkpoint_every == 0 or last
        if due:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    state = {"epoch": epoch, "stage": at.stage.name, "stage_index": at.index,
                             "global_step": global_step, "loader_epoch": epoch + 1, "history": history,
                             "best": best, "rng": rng_state(), "params": config["params"]}
                    save_training_state(tmp, model=model, model_params=model_params, optimizer=optimizer,
                                        scaler=scaler, state=state,
                                        extra={"birefnet.data.size": "{},{}".format(*params.data.size)})
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(report_metrics, checkpoint=ckpt)
        else:
            ray.train.report(report_metrics, checkpoint=None)


def _size_note(stage: Any) -> str:
    """`` at WxH`` / `` at dynamic WxH ranges`` for the epoch log line; empty at ``data.size``."""
    if stage.dynamic_size is not None:
        (min_w, max_w), (min_h, max_h) = stage.dynamic_size
        return f" at dynamic {min_w}-{max_w}x{min_h}-{max_h}"
    return " at {}x{}".format(*stage.size) if stage.size else ""


def _write_probe(folder: Path, rank: int, epoch: int, model: torch.nn.Module, node_id: str) -> None:
    """Test hook: record this rank's parameter digest, node and listening sockets after an epoch.

    Parameters only: BatchNorm running statistics are per-rank by design (rank 0's are checkpointed). The
    listening sockets (``ip:port``) are this worker's own while the process group is up: the rendezvous store on
    rank 0, gloo's pairs, Ray's core worker.
    """
    import psutil

    digest = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters()):
        digest.update(name.removeprefix("module.").encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    listening = sorted(f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process().net_connections(kind="inet")
                       if c.status == psutil.CONN_LISTEN)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}_epoch{epoch}.json").write_text(
        json.dumps({"rank": rank, "epoch": epoch, "node": node_id, "params_sha256": digest.hexdigest(),
                    "pid": os.getpid(), "listening": listening}), encoding="utf-8")


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


def init_ray(params: Params) -> bool:
    """Connect to ``train.ray_address`` / ``RAY_ADDRESS``, or start Ray in-process on 127.0.0.1.

    Returns:
        True when this call started Ray (the caller shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = params.train.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
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

    from birefnet.training.ray_backend import BoundTorchConfig

    train = params.train
    storage = train.storage_path if "://" in train.storage_path else str(Path(train.storage_path).resolve())
    name = run_name_for(params, data_digest)
    started_ray = init_ray(params)
    start = time.perf_counter()
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"params": params_to_dict(params), "cwd": str(Path.cwd()),
                               "mlflow_run_id": mlflow_run_id, "tracking_uri": tracking_uri, "fault": fault,
                               "probe_dir": probe_dir},
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
