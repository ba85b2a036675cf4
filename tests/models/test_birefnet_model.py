"""BiRefNet forward/backward: output object, shapes, switches, gradients, registry (tiny variant, 64-128 px)."""

from __future__ import annotations

import itertools

import pytest
import torch

from birefnet.config import load_params
from birefnet.imaging import gradient_map, laplacian_kernel, laplacian_kernel_torch
from birefnet.losses import BiRefNetLoss
from birefnet.models import BiRefNet, BiRefNetOutput, build_model, create_model, list_models
from birefnet.models.config import ModelConfig, ModelConfigError
from birefnet.models.decoder import image_to_patches

SIZES = [(64, 64), (64, 96), (128, 64)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny(**kwargs: object) -> BiRefNet:
    return create_model("birefnet_test", **kwargs)


def check_output(out: BiRefNetOutput, batch: int, size: tuple[int, int], training: bool, model: BiRefNet) -> None:
    height, width = size
    assert isinstance(out, BiRefNetOutput)
    assert out.logits.shape == (batch, 1, height, width)
    assert torch.isfinite(out.logits).all()
    strides = (32, 16, 8)
    if model.decoder.multistage_supervision:
        assert [tuple(s.shape) for s in out.stage_logits] == [(batch, 1, height // s, width // s) for s in strides]
    else:
        assert out.stage_logits == []
    if training and model.outward_reference:
        assert [tuple(g.shape) for g in out.gradient_logits] == [(batch, 1, height // s, width // s) for s in strides]
        assert [tuple(g.shape) for g in out.gradient_targets] == [(batch, 1, height, width)] * 3
    else:
        assert out.gradient_logits == [] and out.gradient_targets == []
    assert out.supervised_logits[-1] is out.logits


@pytest.mark.parametrize("size", SIZES)
def test_output_fields_train_and_eval(size: tuple[int, int]) -> None:
    model = tiny(auxiliary_classification=True, num_classes=7)
    image = torch.randn(2, 3, *size)
    model.train()
    out = model(image)
    check_output(out, 2, size, True, model)
    assert out.class_logits is not None and out.class_logits.shape == (2, 7)
    model.eval()
    with torch.no_grad():
        out = model(image)
    check_output(out, 2, size, False, model)
    assert out.class_logits is not None and out.class_logits.shape == (2, 7)
    assert set(vars(out)) == {"logits", "stage_logits", "gradient_logits", "gradient_targets", "class_logits"}


def test_rejects_sides_not_multiple_of_32() -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        tiny().eval()(torch.randn(1, 3, 64, 80))


def assert_all_parameters_get_gradients(model: BiRefNet, image: torch.Tensor, classes: torch.Tensor | None) -> None:
    model.train()
    out = model(image)
    target = (torch.rand(image.shape[0], 1, *image.shape[-2:]) > 0.5).float()
    total, parts = BiRefNetLoss()(out, target, classes)
    assert torch.isfinite(total)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"parameters without gradient: {missing[:10]}"


RECONSTRUCTION = list(itertools.product(["aspp_deformable", "none"], [True, False], [True, False]))
LOCALIZATION = list(itertools.product([3, 0], ["cat", "none"]))


@pytest.mark.parametrize(("attention", "inward", "outward"), RECONSTRUCTION)
def test_reconstruction_ablations_train(attention: str, inward: bool, outward: bool) -> None:
    model = tiny(attention=attention, inward_reference=inward, outward_reference=outward)
    assert_all_parameters_get_gradients(model, torch.randn(2, 3, 64, 64), None)


@pytest.mark.parametrize(("context_levels", "multiscale_input"), LOCALIZATION)
def test_localization_ablations_train(context_levels: int, multiscale_input: str) -> None:
    model = tiny(context_levels=context_levels, multiscale_input=multiscale_input, attention="none")
    assert_all_parameters_get_gradients(model, torch.randn(2, 3, 64, 96), None)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("attention", "inward", "outward", "context_levels", "multiscale_input"),
    list(itertools.product(["aspp_deformable", "none"], [True, False], [True, False], [3, 0], ["cat", "none"])),
)
def test_all_ablation_combinations(
    attention: str, inward: bool, outward: bool, context_levels: int, multiscale_input: str
) -> None:
    model = tiny(
        attention=attention,
        inward_reference=inward,
        outward_reference=outward,
        context_levels=context_levels,
        multiscale_input=multiscale_input,
    )
    assert_all_parameters_get_gradients(model, torch.randn(2, 3, 64, 64), None)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"decoder_block": "residual", "squeeze_block": "residual", "attention": "aspp"},
        {"multiscale_input": "add", "inward_reference_mode": "resize", "attention": "none"},
        {"squeeze_block": "none", "context_levels": 0, "attention": "none", "decoder_inter_channels": "adaptive"},
        {"context_levels": 1, "squeeze_depth": 2, "attention": "none", "auxiliary_classification": True},
        {"outward_reference": False, "multistage_supervision": False, "attention": "none"},
    ],
)
def test_other_switches_train(kwargs: dict[str, object]) -> None:
    model = tiny(num_classes=5, **kwargs)
    classes = torch.tensor([1, 4]) if kwargs.get("auxiliary_classification") else None
    assert_all_parameters_get_gradients(model, torch.randn(2, 3, 64, 64), classes)


@pytest.mark.parametrize("strides", [(32,), (16, 32), (4, 8, 16, 32), ()])
def test_attention_strides_pick_the_blocks(strides: tuple[int, ...]) -> None:
    from birefnet.models.blocks import ASPP

    model = tiny(attention="aspp", attention_strides=strides, squeeze_depth=2)
    squeeze = [isinstance(b.attention, ASPP) for b in model.squeeze]
    decoder = [isinstance(b.attention, ASPP) for b in model.decoder.blocks]
    assert squeeze == [32 in strides] * 2
    assert decoder == [s in strides for s in (32, 16, 8, 4)]
    assert_all_parameters_get_gradients(model, torch.randn(2, 3, 64, 64), None)


def test_attention_strides_rejects_unknown_and_repeated() -> None:
    with pytest.raises(ModelConfigError, match="attention_strides"):
        ModelConfig(attention_strides=(32, 12))
    with pytest.raises(ModelConfigError, match="lists a stride twice"):
        ModelConfig(attention_strides=(32, 32))


def test_batch_of_one_trains() -> None:
    """Upstream cannot train with batch 1 (BatchNorm over the pooled ASPP branch); this model can."""
    model = tiny().train()
    out = model(torch.randn(1, 3, 64, 64))
    assert out.logits.shape == (1, 1, 64, 64)
    assert_one_step_trains(model, BiRefNetLoss()(out, torch.ones(1, 1, 64, 64))[0])


def assert_one_step_trains(model: BiRefNet, total: torch.Tensor) -> None:
    """The loss is finite, every gradient too, and one optimiser step changes the weights."""
    assert torch.isfinite(total) and total.item() > 0
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_gradient_checkpointing_same_loss_and_grads() -> None:
    image = torch.randn(2, 3, 64, 64)
    target = (torch.rand(2, 1, 64, 64) > 0.5).float()
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tiny(attention="aspp", gradient_checkpointing=checkpointing).train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        total, _ = BiRefNetLoss()(model(image), target)
        total.backward()
        results.append((total.detach(), model.decoder.blocks[0].conv_in.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_deform_impls_agree_in_model() -> None:
    model = tiny().eval()
    for conv in model.deformable_convs():
        torch.nn.init.normal_(conv.offset.weight, std=0.05)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model.set_deform_impl("torchvision")
        reference = model(image).logits
        model.set_deform_impl("sampling")
        sampled = model(image).logits
    torch.testing.assert_close(sampled, reference, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_forward_backward_finite() -> None:
    model = tiny(attention="aspp").train()
    target = (torch.rand(2, 1, 64, 64) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
        total, parts = BiRefNetLoss()(out, target)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_registry_and_build_model() -> None:
    assert {"birefnet_test", "birefnet_swin_v1_l", "birefnet_swin_v1_t"} <= set(list_models())
    assert list_models("birefnet_swin*") == ["birefnet_swin_v1_l", "birefnet_swin_v1_t"]
    with pytest.raises(ValueError, match="unknown model"):
        create_model("nope")
    model = build_model(ModelConfig(encoder="test_convnext", attention="none", multiscale_input="none"))
    assert model.encoder.out_channels == (24, 32, 48, 64)


def test_params_yaml_model_block_builds_and_steps(repo_root) -> None:  # noqa: ANN001
    params = load_params(repo_root / "params.yaml").model
    model = build_model(params).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 1, 64, 64)
    assert [tuple(s.shape[:2]) for s in out.stage_logits] == [(2, 1)] * len(out.stage_logits)
    assert_one_step_trains(model, BiRefNetLoss()(out, torch.zeros(2, 1, 64, 64))[0])


def test_unknown_encoder_message() -> None:
    with pytest.raises(ValueError, match="unknown encoder"):
        tiny(encoder="not_a_backbone")


def test_image_to_patches_layout() -> None:
    image = torch.arange(2 * 4 * 6, dtype=torch.float32).view(1, 2, 4, 6)
    patches = image_to_patches(image, 2, 3)
    assert patches.shape == (1, 2 * 6, 2, 2)
    # channel c * gh * gw + i * gw + j holds tile (i, j) of channel c
    for c, i, j in itertools.product(range(2), range(2), range(3)):
        torch.testing.assert_close(patches[0, c * 6 + i * 3 + j], image[0, c, i * 2 : i * 2 + 2, j * 2 : j * 2 + 2])


def test_gradient_map_is_normalised_laplacian() -> None:
    kernel = laplacian_kernel_torch(5)
    assert kernel[2, 2] == pytest.approx(-24 / 48) and kernel.sum().abs() < 1e-7
    assert torch.equal(kernel, torch.from_numpy(laplacian_kernel(5)))  # the data pipeline's numpy kernel
    flat = gradient_map(torch.full((1, 3, 8, 8), 0.7))
    assert flat.shape == (1, 1, 8, 8) and flat.abs().max() < 1e-6
