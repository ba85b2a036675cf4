"""Exact rewrites equal the layers they replace, values and gradients: the inward-reference embedding's
composed 5x5 path, its projected form, and the final head folded ahead of the upsampling."""

from __future__ import annotations

import pytest
import torch

from birefnet.models import create_model
from birefnet.models.blocks import SimpleConvs


@pytest.mark.parametrize(
    ("channels", "size"),
    [((3, 64, 8), (40, 40)), ((3, 64, 24), (33, 17)), ((48, 64, 16), (5, 3)), ((2, 16, 5), (3, 3)),
     ((3, 8, 4), (3, 7))],
)
def test_composed_path_equals_two_convolutions(channels: tuple[int, int, int], size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    cin, mid, cout = channels
    block = SimpleConvs(cin, cout, mid, fused=True).double()
    for p in block.parameters():  # non-trivial biases, so the border fix matters
        torch.nn.init.normal_(p)
    x = torch.randn(2, cin, *size, dtype=torch.float64, requires_grad=True)
    fused = block(x)
    block.fused = False
    plain = block(x)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(plain)
    grads_fused = torch.autograd.grad(fused, [x, *block.parameters()], upstream)
    grads_plain = torch.autograd.grad(plain, [x, *block.parameters()], upstream)
    for a, b in zip(grads_fused, grads_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_border_fix_is_needed() -> None:
    """Without the border correction the composed kernel differs on the one-pixel output border only."""
    torch.manual_seed(1)
    block = SimpleConvs(3, 4, 16).double()
    torch.nn.init.normal_(block.conv_in.bias)
    x = torch.randn(1, 3, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        plain = block.conv_out(block.conv_in(x))
        assert float((block(x) - plain).abs().max()) < 1e-12
    # What the composed kernel computes before the fix: the first convolution also evaluated on the ring
    # outside the image (input zero-padded by 2), then the second without padding.
    conv = torch.nn.functional.conv2d
    with torch.no_grad():
        unfixed = conv(conv(torch.nn.functional.pad(x, (2, 2, 2, 2)), block.conv_in.weight, block.conv_in.bias),
                       block.conv_out.weight, block.conv_out.bias)
    assert unfixed.shape == plain.shape
    off = (unfixed - plain).abs()[0].amax(dim=0)
    assert float(off[1:-1, 1:-1].max()) < 1e-12
    assert float(off[0].min()) > 1e-6 and float(off[:, 0].min()) > 1e-6


def test_default_chooses_composed_path_only_for_large_savings() -> None:
    assert SimpleConvs(3, 8, 64).composes()  # full-size embedding: a tenth of the multiply-adds
    assert SimpleConvs(3, 24, 64).composes()
    assert not SimpleConvs(48, 16, 64).composes()  # stride 4: half, measured slower
    assert not SimpleConvs(3072, 64, 64).composes()
    assert SimpleConvs(48, 16, 64).composes(out_channels=1)  # projected to one channel: an eighth
    assert not SimpleConvs(3, 24, 64, fused=False).composes(out_channels=1)


@pytest.mark.parametrize(("channels", "projected", "fused"),
                         [((3, 64, 24), 1, None), ((3, 64, 24), 1, False), ((48, 64, 16), 3, None)])
def test_projected_embedding_equals_embedding_then_1x1(channels: tuple[int, int, int], projected: int,
                                                        fused: bool | None) -> None:
    torch.manual_seed(2)
    cin, mid, cout = channels
    block = SimpleConvs(cin, cout, mid, fused=fused).double()
    weight = torch.randn(projected, cout, 1, 1, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(projected, dtype=torch.float64, requires_grad=True)
    for p in block.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, cin, 12, 10, dtype=torch.float64, requires_grad=True)
    projected_out = block.forward_projected(x, weight, bias)
    reference = torch.nn.functional.conv2d(block.conv_out(block.conv_in(x)), weight, bias)
    assert projected_out.shape == (2, projected, 12, 10)
    torch.testing.assert_close(projected_out, reference, rtol=1e-12, atol=1e-12)
    inputs = [x, weight, bias, *block.parameters()]
    upstream = torch.randn_like(reference)
    for a, b in zip(torch.autograd.grad(projected_out, inputs, upstream),
                    torch.autograd.grad(reference, inputs, upstream), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _outputs_and_grads(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = model(x)
    tensors = [out.logits, *out.stage_logits, *out.gradient_logits, *out.gradient_targets]
    loss = sum((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t)).sum() for t in tensors)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return [t.detach() for t in tensors] + [g for g in grads if g is not None]


@pytest.mark.parametrize("overrides", [{}, {"inward_reference": False}, {"inward_reference_mode": "resize"},
                                       {"attention": "aspp"}])
def test_model_same_with_and_without_computed_kernels(overrides: dict[str, object]) -> None:
    """Eval logits, and in training every output and parameter gradient, with and without the rewrites."""
    torch.manual_seed(0)
    model = create_model("birefnet_test", **overrides).double()
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    assert model.decoder.fold_final_head
    if model.decoder.inward_reference:
        assert any(b.composes() for b in model.inward_embeddings())
    results = {}
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    for enabled in (True, False):
        model.load_state_dict(initial)  # training mode updates the BatchNorm running statistics
        model.set_computed_kernels(enabled)
        model.eval()
        with torch.no_grad():
            logits = model(x).logits
        model.train()
        torch.manual_seed(3)  # the same stochastic-depth draws on both passes
        results[enabled] = [logits, *_outputs_and_grads(model, x)]
    assert not model.decoder.fold_final_head
    assert not any(b.composes() for b in model.inward_embeddings())
    assert not any(getattr(m, "split_projection", False) for m in model.modules())
    assert len(results[True]) == len(results[False]) > 5
    for a, b in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


def test_layers_as_stated_restores_each_setting() -> None:
    model = create_model("birefnet_test")
    embedding = next(iter(model.inward_embeddings()))
    embedding.fused = True
    pyramids = [m for m in model.modules() if hasattr(m, "split_projection")]
    assert pyramids and all(m.split_projection for m in pyramids)
    with model.layers_as_stated():
        assert embedding.fused is False and not model.decoder.fold_final_head
        assert not any(m.split_projection for m in pyramids)
    assert embedding.fused is True and model.decoder.fold_final_head
    assert all(m.split_projection for m in pyramids)
