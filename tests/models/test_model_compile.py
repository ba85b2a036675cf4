"""``torch.compile`` captures the whole model and differentiates it like eager mode.

The trainer compiles the model on GPU (``train.compile``). On the CPU lane this checks what a GPU run
depends on before code generation: TorchDynamo captures the forward in one graph (``fullgraph=True``: no
graph break anywhere, the patched Swin window attention and the exact kernel rewrites included) and AOT
Autograd's traced forward and backward equal eager mode. The ``aot_eager`` backend runs that traced graph
with eager kernels, so the comparison isolates tracing from code generation. It runs in float64: in
float32 the batch-of-2 BatchNorms over 2x2 maps of a random 64 px model amplify reordered roundings to
percent-level gradient differences, which would hide a real error instead of exposing one.
The ``gpu`` lane (``make test-gpu``) runs the same check with TorchInductor's generated kernels on CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo

from birefnet.models import BiRefNet, create_model

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def outputs_loss(out) -> torch.Tensor:
    """A scalar that depends on every supervised output (final, stage and gradient logits)."""
    parts = [out.logits, *out.stage_logits, *out.gradient_logits]
    weights = [torch.linspace(-1.0, 1.0, part.numel(), dtype=part.dtype, device=part.device).view_as(part)
               for part in parts]
    return sum((part * weight).sum() for part, weight in zip(parts, weights, strict=True))


def check_compiled_matches_eager(model: BiRefNet, size: int, backend: str = "aot_eager", device: str = "cpu") -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # AOT Autograd draws its dropout masks in another order
    model = model.to(device, torch.float64).train()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    image = torch.randn(2, 3, size, size, dtype=torch.float64, device=device)

    torch.manual_seed(1)  # stochastic depth draws the same masks in both when seeded alike
    out = compiled(image)
    torch.manual_seed(1)
    expected = reference(image)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-9, atol=1e-9)
    outputs_loss(out).backward()
    outputs_loss(expected).backward()

    grads = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    assert len(grads) > 0.9 * sum(1 for _ in reference.parameters())
    scale = max(g.abs().max().item() for g in grads.values())
    for name, param in model.named_parameters():
        if name in grads:
            assert param.grad is not None, name
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-7, atol=1e-9 * scale, msg=name)
        else:
            assert param.grad is None or not param.grad.any(), name
    for (name, buffer), ref_buffer in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(buffer, ref_buffer, rtol=1e-9, atol=1e-12, msg=name)  # BN running stats

    model.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(image).logits, reference(image).logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("deform_impl", ["sampling", "torchvision"])
def test_compiled_tiny_model_matches_eager(deform_impl: str) -> None:
    # Every component on: deformable reconstruction blocks, both references, pyramid input, context fusion,
    # auxiliary classification, and the exact rewrites (composed embedding, split ASPP projection).
    torch.manual_seed(0)
    model = create_model(
        "birefnet_test", attention="aspp_deformable", deform_impl=deform_impl, auxiliary_classification=True
    )
    check_compiled_matches_eager(model, 64)


def test_compiled_swin_t_matches_eager() -> None:
    # 96 px: every stage (24, 12, 6, 3) is smaller than or not a multiple of the 7x7 window, so the
    # pad -> roll -> mask path of the patched window attention runs in all four stages.
    torch.manual_seed(0)
    model = create_model("birefnet_test", encoder="swin_v1_t", deform_impl="sampling")
    check_compiled_matches_eager(model, 96)


@pytest.mark.gpu
@pytest.mark.parametrize("deform_impl", ["sampling", "torchvision"])
def test_inductor_on_cuda_matches_eager(deform_impl: str) -> None:
    # What train.compile runs on a GPU: TorchInductor's generated kernels (Triton), forward and backward.
    if not torch.cuda.is_available():
        pytest.fail("the gpu lane needs a CUDA device (torch.cuda.is_available() is False)")
    torch.manual_seed(0)
    model = create_model(
        "birefnet_test", attention="aspp_deformable", deform_impl=deform_impl, auxiliary_classification=True
    )
    check_compiled_matches_eager(model, 64, backend="inductor", device="cuda")
