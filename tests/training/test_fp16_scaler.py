"""``train.precision: fp16``: the GradScaler path of the epoch loop, its skipped steps and its exact resume.

fp16 training is CUDA-only here (the params refuse it without ``train.use_gpu``: CPU fp16 kernels are emulated,
a tiny-model step took seconds). The scaler logic itself is device-independent, so the CPU tests drive a real
``torch.amp.GradScaler("cpu")`` with fp32 compute and an injected inf gradient; the ``gpu`` test runs real fp16
autocast on CUDA.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from birefnet.config import ParamsError, load_params
from birefnet.models import build_model
from birefnet.training.checkpoint import load_training_state, save_training_state
from birefnet.training.criterion import build_criterion
from birefnet.training.engine import autocast_for, train_one_epoch
from birefnet.training.trainer import make_optimizer


@pytest.fixture(scope="module")
def params(repo_root: Path):  # noqa: ANN201
    return load_params(repo_root / "params.yaml", ["model.encoder=test_convnext", "model.deform_impl=sampling",
                                                   "model.drop_path_rate=0"])


def _batches(n: int, seed: int, size: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(2, 3, size, size, generator=g),
             "mask": (torch.rand(2, 1, size, size, generator=g) > 0.8).float(),
             "gradient": torch.rand(2, 1, size, size, generator=g), "class_id": torch.full((2,), -1)}
            for _ in range(n)]


class InfAt:
    """Backward hook on one parameter: its gradient becomes +inf at the listed backward calls (0-based)."""

    def __init__(self, param: torch.Tensor, calls: set[int]) -> None:
        self.calls, self.count = calls, 0
        param.register_hook(self)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        index, self.count = self.count, self.count + 1
        return torch.full_like(grad, math.inf) if index in self.calls else grad


def _epoch(model, optimizer, params, batches, scaler, seed: int, **kwargs) -> dict[str, float]:  # noqa: ANN001
    torch.manual_seed(seed)
    stage = params.train.stages[0]
    return train_one_epoch(model, batches, optimizer, build_criterion(), device=torch.device("cpu"),
                           weights=stage.loss, supervise="all", lr=1e-3, precision="fp32", scaler=scaler, **kwargs)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_inf_gradient_skips_the_step_halves_the_scale_and_is_counted(params) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = build_model(params.model)
    optimizer = make_optimizer(model, params)  # fused AdamW: the scaler hands it found_inf
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    probe = next(p for p in model.decoder.parameters() if p.requires_grad)
    InfAt(probe, {1})  # the second backward of the run
    batches = _batches(3, seed=1)

    first = _epoch(model, optimizer, params, batches[:1], scaler, seed=10)
    assert first["skipped_steps"] == 0 and first["grad_scale"] == 1024.0
    before = _snapshot(model)
    steps = {id(p): int(s["step"]) for p, s in optimizer.state.items()}
    assert set(steps.values()) == {1}

    second = _epoch(model, optimizer, params, batches[1:2], scaler, seed=11, grad_clip=1.0)
    assert second["skipped_steps"] == 1 and second["grad_scale"] == 512.0 and math.isfinite(second["loss"])
    after = _snapshot(model)
    weights = [k for k in before if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(before[k], after[k]) for k in weights), "a skipped step changed a weight"
    assert {id(p): int(s["step"]) for p, s in optimizer.state.items()} == steps, "a skipped step counted in Adam"

    third = _epoch(model, optimizer, params, batches[2:], scaler, seed=12)
    assert third["skipped_steps"] == 0 and third["grad_scale"] == 512.0
    assert not torch.equal(after[weights[0]], model.state_dict()[weights[0]])
    assert {int(s["step"]) for s in optimizer.state.values()} == {2}


def test_epoch_without_scaler_reports_no_scaler_metrics(params) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = build_model(params.model)
    out = _epoch(model, make_optimizer(model, params), params, _batches(1, seed=1), None, seed=10)
    assert "skipped_steps" not in out and "grad_scale" not in out


def _scaler() -> torch.amp.GradScaler:
    # growth every successful step: the scale and the growth tracker both move, so a lost state shows
    return torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)


def test_scaler_state_round_trips_through_the_checkpoint_and_training_continues_identically(
        params, tmp_path: Path) -> None:  # noqa: ANN001
    batches = _batches(4, seed=2)
    torch.manual_seed(0)
    model = build_model(params.model)
    optimizer = make_optimizer(model, params)
    scaler = _scaler()
    InfAt(next(p for p in model.decoder.parameters() if p.requires_grad), {1})
    first = _epoch(model, optimizer, params, batches[:2], scaler, seed=20)
    assert first["skipped_steps"] == 1 and first["grad_scale"] == 1024.0  # 1024 -> 2048 -> skip: 1024
    save_training_state(tmp_path, model=model, model_params=params.model, optimizer=optimizer, scaler=scaler,
                        state={"epoch": 0})
    assert (tmp_path / "scaler.pt").is_file()
    expected_scaler = scaler.state_dict()
    reference = _epoch(model, optimizer, params, batches[2:], scaler, seed=21)

    torch.manual_seed(5)  # other initial weights, a scaler at another scale: the checkpoint must restore all
    resumed = build_model(params.model)
    resumed_optimizer = make_optimizer(resumed, params)
    resumed_scaler = torch.amp.GradScaler("cpu", init_scale=65536.0, growth_interval=1)
    load_training_state(tmp_path, model=resumed, optimizer=resumed_optimizer, scaler=resumed_scaler)
    assert resumed_scaler.state_dict() == expected_scaler
    again = _epoch(resumed, resumed_optimizer, params, batches[2:], resumed_scaler, seed=21)

    assert again["loss"] == reference["loss"] and again["grad_scale"] == reference["grad_scale"] == 4096.0
    assert resumed_scaler.state_dict() == scaler.state_dict()
    ours, theirs = model.state_dict(), resumed.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_fp16_autocast_context() -> None:
    x = torch.randn(4, 4)
    with autocast_for(torch.device("cpu"), "fp16"):
        assert (x @ x).dtype == torch.float16
    with autocast_for(torch.device("cpu"), "fp32"):
        assert (x @ x).dtype == torch.float32


def test_fp16_needs_a_gpu_in_the_params(repo_root: Path) -> None:
    with pytest.raises(ParamsError, match="fp16.*use_gpu: true"):
        load_params(repo_root / "params.yaml", ["train.precision=fp16"])
    assert load_params(repo_root / "params.yaml", ["train.precision=fp16", "train.use_gpu=true"]).train.precision \
        == "fp16"


def test_train_stage_exits_2_on_fp16_without_gpu(repo_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from birefnet.stages.train import main

    assert main(["--params", str(repo_root / "params.yaml"), "--set", "train.precision=fp16"]) == 2
    assert "use_gpu" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- gpu lane


@pytest.mark.gpu
def test_fp16_autocast_with_grad_scaler_trains_on_cuda_and_resumes(params, tmp_path: Path) -> None:  # noqa: ANN001
    if not torch.cuda.is_available():
        pytest.fail("the gpu lane needs a CUDA device (torch.cuda.is_available() is False)")
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(params.model).to(device)
    optimizer = make_optimizer(model, params)
    scaler = torch.amp.GradScaler("cuda")  # what the trainer builds: init scale 2**16, backoff 0.5
    dtypes: list[torch.dtype] = []
    model.decoder.final_head.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    stage = params.train.stages[0]
    criterion = build_criterion()

    def epoch(m, opt, sc, seed: int) -> dict[str, float]:  # noqa: ANN001
        torch.manual_seed(seed)
        return train_one_epoch(m, _batches(12, seed=seed), opt, criterion, device=device, weights=stage.loss,
                               supervise="all", lr=1e-3, precision="fp16", grad_clip=1.0, scaler=sc)

    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    first = epoch(model, optimizer, scaler, 1)
    assert dtypes and set(dtypes) == {torch.float16}, dtypes
    assert math.isfinite(first["loss"])
    assert 0 <= first["skipped_steps"] < 12
    assert first["grad_scale"] == 65536.0 * 0.5 ** first["skipped_steps"]  # growth needs 2000 good steps
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())
    save_training_state(tmp_path, model=model, model_params=params.model, optimizer=optimizer, scaler=scaler,
                        state={"epoch": 0})
    reference = epoch(model, optimizer, scaler, 2)

    torch.manual_seed(5)
    resumed = build_model(params.model).to(device)
    resumed_optimizer = make_optimizer(resumed, params)
    resumed_scaler = torch.amp.GradScaler("cuda", init_scale=8.0)
    load_training_state(tmp_path, model=resumed, optimizer=resumed_optimizer, scaler=resumed_scaler)
    again = epoch(resumed, resumed_optimizer, resumed_scaler, 2)
    assert again["grad_scale"] == reference["grad_scale"]
    assert again["skipped_steps"] == reference["skipped_steps"]
    assert again["loss"] == pytest.approx(reference["loss"], rel=1e-3)  # cuDNN/atomics: not bit-exact on a GPU
