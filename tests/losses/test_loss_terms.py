"""Loss terms and the composite: zero on perfect predictions, hand-computed values, gradients, bf16."""

from __future__ import annotations

import math

import pytest
import torch

from birefnet.config import LossWeights
from birefnet.losses import (
    BCELoss,
    BiRefNetLoss,
    ClassificationLoss,
    GradientLoss,
    IoULoss,
    MAELoss,
    SSIMLoss,
)
from birefnet.losses.terms import gaussian_window
from birefnet.models.birefnet import BiRefNetOutput

BIG = 30.0  # |logit| whose sigmoid is 0/1 to float precision


def perfect_logits(mask: torch.Tensor) -> torch.Tensor:
    return (mask * 2 - 1) * BIG


@pytest.fixture
def mask() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(2, 1, 32, 32, generator=generator) > 0.5).float()


@pytest.mark.parametrize("term", [BCELoss(), IoULoss(), SSIMLoss(), MAELoss()])
def test_region_terms_zero_on_perfect_prediction(term: torch.nn.Module, mask: torch.Tensor) -> None:
    assert term(perfect_logits(mask), mask).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("term", [BCELoss(), IoULoss(), SSIMLoss(), MAELoss(), GradientLoss()])
def test_terms_give_finite_gradients(term: torch.nn.Module, mask: torch.Tensor) -> None:
    logits = torch.randn(2, 1, 32, 32, requires_grad=True)
    value = term(logits, mask)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_hand_computed_values() -> None:
    logits = torch.tensor([[[[0.0, math.log(3.0)]]]])  # sigmoid: 0.5, 0.75
    target = torch.tensor([[[[1.0, 0.0]]]])
    assert BCELoss()(logits, target).item() == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)
    # intersection 0.5, union 1 + 1.25 - 0.5 = 1.75
    assert IoULoss()(logits, target).item() == pytest.approx(1 - 0.5 / 1.75, rel=1e-6)
    assert MAELoss()(logits, target).item() == pytest.approx((0.5 + 0.75) / 2, rel=1e-6)
    # IoU is summed over the batch, not averaged
    twice = IoULoss()(logits.repeat(2, 1, 1, 1), target.repeat(2, 1, 1, 1)).item()
    assert twice == pytest.approx(2 * (1 - 0.5 / 1.75), rel=1e-6)
    # cross-entropy of uniform logits over 4 classes; -1 labels are ignored
    ce = ClassificationLoss()(torch.zeros(3, 4), torch.tensor([1, -1, 3]))
    assert ce.item() == pytest.approx(math.log(4), rel=1e-6)
    assert ClassificationLoss()(torch.zeros(2, 4), torch.tensor([-1, -1])).item() == 0.0
    # gradient loss: BCE(sigmoid(0), sigmoid(0)) = log 2, prediction upsampled to the target size
    assert GradientLoss()(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 4, 4)).item() == pytest.approx(
        math.log(2), rel=1e-6
    )


def naive_ssim_loss(prob: torch.Tensor, target: torch.Tensor) -> float:
    """Direct loops: 11x11 Gaussian window, zero padding, mean SSIM map, (1 - SSIM) / 2."""
    window = gaussian_window(11, 1.5).double()
    height, width = prob.shape
    x = torch.zeros(height + 10, width + 10, dtype=torch.float64)
    y = torch.zeros_like(x)
    x[5:-5, 5:-5], y[5:-5, 5:-5] = prob.double(), target.double()
    c1, c2, total = 0.01**2, 0.03**2, 0.0
    for i in range(height):
        for j in range(width):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (window * px).sum(), (window * py).sum()
            vx = (window * px * px).sum() - mx * mx
            vy = (window * py * py).sum() - my * my
            cov = (window * px * py).sum() - mx * my
            total += float(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return (1 - total / (height * width)) / 2


def test_ssim_matches_direct_computation() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 1, 6, 7, generator=generator)
    target = (torch.rand(1, 1, 6, 7, generator=generator) > 0.5).float()
    expected = naive_ssim_loss(torch.sigmoid(logits)[0, 0], target[0, 0])
    assert SSIMLoss()(logits, target).item() == pytest.approx(expected, rel=1e-5)


def grouped_conv_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM through plain autograd: one 11x11 grouped convolution per statistic, zero padding."""
    from birefnet.losses.terms import gaussian_line

    line = gaussian_line(11, 1.5).to(x.dtype)
    window = torch.outer(line, line)[None, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, window.expand(t.shape[1], 1, 11, 11), padding=5, groups=t.shape[1])

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return (((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))).mean()


def test_ssim_value_and_gradient_equal_plain_autograd() -> None:
    """The blur's hand-written backward (the blur itself) gives autograd's gradient, for stacked maps too."""
    from birefnet.losses.terms import gaussian_line, ssim

    generator = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 19, 23, generator=generator, dtype=torch.float64, requires_grad=True)
    y = (torch.rand(2, 1, 19, 23, generator=generator, dtype=torch.float64) > 0.6).double()
    line = gaussian_line().double()
    ours = ssim(x, y, line)
    (grad,) = torch.autograd.grad(ours, x)
    expected = grouped_conv_ssim(x, y.expand_as(x))
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    # a target that requires grad gets its gradient through the same blur
    y_soft = torch.rand(1, 1, 9, 8, dtype=torch.float64, requires_grad=True)
    x_soft = torch.rand(1, 1, 9, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: ssim(x_soft, t, line), (y_soft,))


def test_ssim_of_stacked_maps_is_mean_of_per_map_ssim() -> None:
    generator = torch.Generator().manual_seed(3)
    maps = [torch.randn(2, 1, 24, 20, generator=generator) for _ in range(4)]
    target = (torch.rand(2, 1, 24, 20, generator=generator) > 0.5).float()
    stacked = 4 * SSIMLoss()(torch.cat(maps, dim=1), target)
    torch.testing.assert_close(stacked, sum(SSIMLoss()(m, target) for m in maps))


def model_like_output(mask: torch.Tensor, logits: torch.Tensor, with_gradient: bool = True) -> BiRefNetOutput:
    stages = [torch.nn.functional.interpolate(logits, scale_factor=1 / s, mode="bilinear") for s in (8, 4, 2)]
    gradient_logits = [torch.zeros(mask.shape[0], 1, 4 * 2**i, 4 * 2**i) for i in range(3)] if with_gradient else []
    gradient_targets = [torch.zeros_like(mask) for _ in gradient_logits]
    return BiRefNetOutput(logits, stages, gradient_logits, gradient_targets, torch.zeros(mask.shape[0], 5))


def test_composite_sums_terms_over_every_output(mask: torch.Tensor) -> None:
    logits = torch.randn(2, 1, 32, 32)
    output = model_like_output(mask, logits)
    classes = torch.tensor([0, 3])
    total, parts = BiRefNetLoss(bce=30, iou=0.5, ssim=10, mae=0, ce=5, gradient=1, mse=0)(output, mask, classes)
    assert set(parts) == {"bce", "iou", "ssim", "ce", "gradient"}
    maps = [
        torch.nn.functional.interpolate(m, size=(32, 32), mode="bilinear", align_corners=True)
        for m in output.stage_logits
    ] + [logits]
    expected_bce = 30 * sum(BCELoss()(m, mask) for m in maps)
    expected_iou = 0.5 * sum(IoULoss()(m, mask) for m in maps)
    expected_ssim = 10 * sum(SSIMLoss()(m, mask) for m in maps)
    torch.testing.assert_close(parts["bce"], expected_bce)
    torch.testing.assert_close(parts["iou"], expected_iou)
    torch.testing.assert_close(parts["ssim"], expected_ssim)
    assert parts["ce"].item() == pytest.approx(5 * math.log(5), rel=1e-6)
    assert parts["gradient"].item() == pytest.approx(3 * math.log(2), rel=1e-6)
    torch.testing.assert_close(total, sum(parts.values()))


def test_composite_near_zero_on_perfect_prediction(mask: torch.Tensor) -> None:
    logits = perfect_logits(mask)
    output = BiRefNetOutput(logits, [], [], [], None)
    total, parts = BiRefNetLoss()(output, mask)
    assert total.item() == pytest.approx(0.0, abs=1e-4)


def test_region_only_weights_drop_bce(mask: torch.Tensor) -> None:
    region = BiRefNetLoss(bce=0, iou=0.5, ssim=10, ce=5, gradient=1)
    total, parts = region(model_like_output(mask, torch.randn(2, 1, 32, 32)), mask)
    assert "bce" not in parts and {"iou", "ssim", "gradient"} <= set(parts)
    with pytest.raises(ValueError, match="bce"):
        BiRefNetLoss(bce=-1)


def test_per_call_weights_match_constructor_weights_and_leave_the_module_unchanged(mask: torch.Tensor) -> None:
    """The training criterion passes each stage's weights per call: same maths as a module built with them."""
    output = model_like_output(mask, torch.randn(2, 1, 32, 32))
    classes = torch.tensor([0, 3])
    stage = LossWeights(bce=0, iou=0.25, ssim=9, mae=2, mse=1, ce=5, gradient=0.5)
    loss = BiRefNetLoss()
    before = dict(loss.weights)
    total, parts = loss(output, mask, classes, weights=stage.model_dump())
    expected_total, expected_parts = BiRefNetLoss(**stage.model_dump())(output, mask, classes)
    assert loss.weights == before  # not mutated
    assert list(parts) == list(expected_parts) == ["iou", "ssim", "mae", "mse", "ce", "gradient"]
    for name, value in expected_parts.items():
        torch.testing.assert_close(parts[name], value, rtol=0, atol=0)
    torch.testing.assert_close(total, expected_total, rtol=0, atol=0)
    _, default_parts = loss(output, mask, classes)  # the constructor's weights again (bce on, mae/mse off)
    assert set(default_parts) == {"bce", "iou", "ssim", "ce", "gradient"}


def test_bf16_autocast_losses_are_fp32_and_finite(mask: torch.Tensor) -> None:
    logits = torch.randn(2, 1, 32, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lowp = (logits * 1.0).to(torch.bfloat16)
        output = model_like_output(mask, lowp)
        total, parts = BiRefNetLoss()(output, mask, torch.tensor([1, 2]))
    assert total.dtype == torch.float32 and all(torch.isfinite(v) for v in parts.values())
    total.backward()
    assert torch.isfinite(logits.grad).all()


def test_gradient_loss_reaches_its_target() -> None:
    """As upstream, the gradient label is not detached: its producer gets a gradient too."""
    target = torch.randn(1, 1, 8, 8, requires_grad=True)
    GradientLoss()(torch.randn(1, 1, 4, 4), target).backward()
    assert target.grad is not None and target.grad.abs().sum() > 0
