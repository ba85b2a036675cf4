"""MSE and MAE as loss terms of a training stage: values, soft targets, the composite, the schedule's decay."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from birefnet.config import LossWeights, TrainParams, TrainStageParams, load_params
from birefnet.losses import BiRefNetLoss, MAELoss, MSELoss
from birefnet.models.birefnet import BiRefNetOutput
from birefnet.training.criterion import build_criterion
from birefnet.training.schedule import Schedule

REPO = Path(__file__).resolve().parents[2]
PARAMS = REPO / "params.yaml"


def test_mse_hand_computed_value_and_zero_on_perfect_soft_prediction() -> None:
    logits = torch.tensor([[[[0.0, math.log(3.0)]]]])  # sigmoid: 0.5, 0.75
    target = torch.tensor([[[[1.0, 0.0]]]])
    assert MSELoss()(logits, target).item() == pytest.approx((0.25 + 0.5625) / 2, rel=1e-6)
    # a soft alpha (0.25, 0.5, 0.75) predicted exactly: both terms are 0 (no binarisation of the target)
    alpha = torch.tensor([[[[0.25, 0.5, 0.75]]]])
    exact = torch.logit(alpha)
    assert MSELoss()(exact, alpha).item() == pytest.approx(0.0, abs=1e-12)
    assert MAELoss()(exact, alpha).item() == pytest.approx(0.0, abs=1e-7)


def test_mse_gradient_vanishes_at_a_soft_target_and_points_towards_it() -> None:
    alpha = torch.full((1, 1, 4, 4), 0.3)
    at_target = torch.logit(alpha).requires_grad_()
    MSELoss()(at_target, alpha).backward()
    assert at_target.grad.abs().max().item() < 1e-7
    above = torch.zeros(1, 1, 4, 4, requires_grad=True)  # sigmoid 0.5 > 0.3: the gradient pushes the logit down
    MSELoss()(above, alpha).backward()
    assert (above.grad > 0).all()


def test_mse_is_fp32_and_finite_under_bf16_autocast() -> None:
    logits = torch.randn(2, 1, 16, 16, requires_grad=True)
    target = torch.rand(2, 1, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = MSELoss()((logits * 1.0).to(torch.bfloat16), target)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(logits.grad).all()


def _output(logits: torch.Tensor) -> BiRefNetOutput:
    stage = torch.nn.functional.interpolate(logits, scale_factor=0.5, mode="bilinear")
    return BiRefNetOutput(logits, [stage], [], [], None)


def test_composite_mse_part_is_weight_times_sum_over_maps() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 16, 16, generator=generator)
    target = torch.rand(2, 1, 16, 16, generator=generator)  # soft
    output = _output(logits)
    total, parts = BiRefNetLoss(bce=0, iou=0, ssim=0, mae=0, ce=0, gradient=0, mse=2.5)(output, target)
    upsampled = torch.nn.functional.interpolate(output.stage_logits[0], size=(16, 16), mode="bilinear",
                                                align_corners=True)
    expected = 2.5 * (MSELoss()(upsampled, target) + MSELoss()(logits, target))
    assert set(parts) == {"mse"}
    torch.testing.assert_close(parts["mse"], expected)
    torch.testing.assert_close(total, expected)
    # weight 0 (the default): no mse part
    _, default_parts = BiRefNetLoss()(output, target)
    assert "mse" not in default_parts


def test_matting_recipe_weights_are_upstreams() -> None:
    """configs/matting.yaml trains with upstream's Matting weights in both stages: BCE 30, MAE 100, SSIM 10."""
    stages = load_params(REPO / "configs" / "matting.yaml").train.stages
    assert [s.name for s in stages] == ["main", "finetune"]
    for stage in stages:
        active = {k: v for k, v in stage.loss.model_dump().items() if v}
        assert active == {"bce": 30, "ssim": 10, "mae": 100, "gradient": 1}, stage.name


def test_mse_and_mae_are_stage_loss_keys_with_per_epoch_decay() -> None:
    stage = TrainStageParams(name="finetune", epochs=3, loss=LossWeights(mse=2.0, mae=100.0, ssim=10.0),
                             decay={"mse": 0.5, "mae": 1.0, "ssim": 0.9})
    schedule = Schedule(TrainParams(stages=[TrainStageParams(name="main", epochs=2), stage]))
    assert schedule.weights_at(0).mse == 0.0  # default stage: mse off
    # epoch k (1-based) of the stage: weight * factor ** k, so a resume recomputes the same value
    assert [schedule.weights_at(e).mse for e in (2, 3, 4)] == pytest.approx([1.0, 0.5, 0.25])
    assert [schedule.weights_at(e).mae for e in (2, 3, 4)] == pytest.approx([100.0] * 3)
    assert [schedule.weights_at(e).ssim for e in (2, 3, 4)] == pytest.approx([9.0, 8.1, 7.29])


def test_stage_loss_key_mse_validates_like_the_others() -> None:
    from birefnet.config import ParamsError

    params = load_params(PARAMS, ["train.stages=[{name: s, epochs: 1, loss: {mse: 3}, decay: {mse: 0.9}}]"])
    assert params.train.stages[0].loss.mse == 3.0 and params.train.stages[0].decay == {"mse": 0.9}
    with pytest.raises(ParamsError, match="mse"):
        load_params(PARAMS, ["train.stages=[{name: s, epochs: 1, loss: {mse: -1}}]"])
    with pytest.raises(ParamsError, match="decay"):
        load_params(PARAMS, ["train.stages=[{name: s, epochs: 1, decay: {mse: 1.5}}]"])


def test_training_criterion_applies_the_schedules_mse_weight() -> None:
    criterion = build_criterion()
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 8, 8, generator=generator)
    mask = torch.rand(2, 1, 8, 8, generator=generator)
    weights = LossWeights(bce=0, iou=0, ssim=0, mae=0, ce=0, gradient=0, mse=4.0)
    total, parts = criterion(BiRefNetOutput(logits), {"mask": mask}, weights, "all")
    assert set(parts) == {"mse"}
    assert parts["mse"] == pytest.approx(4 * MSELoss()(logits, mask).item(), rel=1e-6)
    assert total.item() == pytest.approx(parts["mse"], rel=1e-6)
