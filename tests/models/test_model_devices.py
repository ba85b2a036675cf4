"""One training step of the whole model per device and precision: the default lane runs it on the CPU, the
``gpu`` lane (``make test-gpu``) on CUDA, with the same assertions.

Both deformable kernels start from the same weights and must agree; under bf16 autocast the loss stays fp32
and finite, every parameter that takes part gets a finite gradient, and the step tracks fp32.
"""

from __future__ import annotations

import pytest
import torch

from birefnet.losses import BiRefNetLoss
from birefnet.models import create_model

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def require(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.fail("the gpu lane needs a CUDA device (torch.cuda.is_available() is False)")
    return torch.device(device)


def train_step(model: torch.nn.Module, image: torch.Tensor, target: torch.Tensor, bf16: bool) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(image)
        total, _ = BiRefNetLoss()(out, target)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return total.item(), grads


@pytest.mark.parametrize("device", DEVICES)
def test_paper_blocks_train_step_per_precision_and_kernel(device: str) -> None:
    dev = require(device)
    torch.manual_seed(0)
    model = create_model("birefnet_test", attention="aspp_deformable", deform_impl="torchvision").to(dev).train()
    model = model.to(memory_format=torch.channels_last)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    image = torch.randn(2, 3, 64, 96, device=dev).to(memory_format=torch.channels_last)
    target = (torch.rand(2, 1, 64, 96, device=dev) > 0.5).float()
    expected = {name for name, p in model.named_parameters() if p.requires_grad }

    results = {}
    for impl in ("torchvision", "sampling"):
        model.set_deform_impl(impl)
        for bf16 in (False, True):
            torch.manual_seed(1)
            results[impl, bf16] = train_step(model, image, target, bf16)
    for (impl, bf16), (_, grads) in results.items():
        assert set(grads) >= expected, (impl, bf16, sorted(expected - set(grads))[:5])
        assert all(torch.isfinite(g).all() for g in grads.values()), (impl, bf16)
    fp32_loss = results["torchvision", False][0]
    assert results["sampling", False][0] == pytest.approx(fp32_loss, rel=1e-4)
    for impl in ("torchvision", "sampling"):
        assert results[impl, True][0] == pytest.approx(fp32_loss, rel=0.05), impl
    # the two kernels agree on the deformable layers' own weight gradients (fp32; the batch-of-2 BatchNorms behind
    # them amplify rounding to ~0.3 %)
    for name, grad in results["torchvision", False][1].items():
        if ".conv.conv.weight" in name:
            other = results["sampling", False][1][name]
            assert torch.linalg.vector_norm(grad - other) <= 1e-2 * torch.linalg.vector_norm(grad) + 1e-6, name
