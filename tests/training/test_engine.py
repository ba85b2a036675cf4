"""The per-worker epoch and evaluation functions without Ray: channels_last, stage sizes, precise BN."""

from __future__ import annotations

import copy
from collections import deque

import pytest
import torch

from birefnet.config import load_params
from birefnet.models import build_model
from birefnet.training.criterion import build_criterion
from birefnet.training.engine import evaluate, recalibrate_batchnorm, resize_batch, train_one_epoch
from birefnet.training.trainer import make_optimizer


def _batches(n: int, size: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        mask = (torch.rand(2, 1, size, size, generator=g) > 0.8).float()
        out.append({"image": torch.randn(2, 3, size, size, generator=g), "mask": mask,
                    "gradient": torch.rand(2, 1, size, size, generator=g), "class_id": torch.full((2,), -1)})
    return out


def test_channels_last_trains_like_contiguous(repo_root) -> None:  # noqa: ANN001
    params = load_params(repo_root / "params.yaml", ["model.encoder=test_convnext", "model.deform_impl=sampling",
                                                     "model.attention=aspp_deformable", "model.drop_path_rate=0"])
    torch.manual_seed(0)
    plain = build_model(params.model)
    for module in plain.modules():  # random masks are drawn in memory order, which differs between formats
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    fast = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    assert fast.decoder.final_head.weight.is_contiguous(memory_format=torch.channels_last)
    criterion = build_criterion()
    stage = params.train.stages[0]
    results = []
    for model, channels_last in ((plain, False), (fast, True)):
        optimizer = make_optimizer(model, params)
        epoch = train_one_epoch(model, _batches(1), optimizer, criterion, device=torch.device("cpu"),
                                weights=stage.loss, supervise=stage.supervise, lr=1e-3, precision="fp32",
                                channels_last=channels_last)
        scores = evaluate(model, _batches(1), device=torch.device("cpu"), precision="fp32",
                          channels_last=channels_last)
        results.append((epoch, scores, model))
    (a, sa, ma), (b, sb, mb) = results
    # Same loss up to float rounding (the two layouts sum in different orders: logits differ by ~5e-5 at init).
    assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["loss"], b["loss"])
    # One Adam step moves every weight by at most ~lr whatever its gradient's size, so rounding-level gradient
    # differences can show up as up to 2 lr; a wrong update (a layout bug) would be far off everywhere.
    diffs = torch.cat([(pa - pb).abs().flatten() for pa, pb in zip(ma.parameters(), mb.parameters(), strict=True)])
    assert float(diffs.max()) <= 2.1e-3 and float(diffs.median()) < 1e-6, (float(diffs.max()), float(diffs.median()))
    assert abs(sa["Sm"] - sb["Sm"]) < 1e-2 and abs(sa["MAE"] - sb["MAE"]) < 1e-2


def test_resize_batch_keeps_thin_strokes_as_soft_values() -> None:
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 31, :] = 1.0  # a 1-px line: nearest or plain bilinear downsizing can drop it entirely
    batch = {"image": torch.rand(1, 3, 64, 64), "mask": mask, "gradient": mask * 0.5, "class_id": torch.tensor([3])}
    small = resize_batch(batch, (32, 16))
    assert small["image"].shape == (1, 3, 16, 32) and small["mask"].shape == (1, 1, 16, 32)
    assert small["gradient"].shape == (1, 1, 16, 32) and small["class_id"] is batch["class_id"]
    # the line's area is kept: 64 px of 4096 before, the same fraction of 512 pixels after
    assert float(small["mask"].sum()) / 512 == pytest.approx(64 / 4096, rel=1e-4)
    assert 0.0 <= float(small["mask"].min()) and float(small["mask"].max()) <= 1.0
    assert resize_batch(batch, (64, 64)) is batch


def test_train_one_epoch_at_a_stage_size_keeps_the_last_images_as_loaded(repo_root) -> None:  # noqa: ANN001
    params = load_params(repo_root / "params.yaml", ["model.encoder=test_convnext", "model.drop_path_rate=0"])
    torch.manual_seed(0)
    model = build_model(params.model)
    seen: list[tuple[int, ...]] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    batches = _batches(3)
    recent: deque[torch.Tensor] = deque(maxlen=3)
    stage = params.train.stages[0]
    epoch = train_one_epoch(model, batches, make_optimizer(model, params), build_criterion(),
                            device=torch.device("cpu"), weights=stage.loss, supervise="all", lr=1e-3,
                            precision="fp32", size=(32, 32), recent=recent)
    assert seen == [(2, 3, 32, 32)] * 3 and epoch["samples"] == 6
    assert len(recent) == 3 and all(t.shape == (3, 64, 64) for t in recent)
    assert torch.equal(recent[0], batches[1]["image"][1]) and torch.equal(recent[2], batches[2]["image"][1])


def test_recalibrate_batchnorm_gives_the_statistics_of_the_images() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Dropout(0.5), torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2))
    net.train()
    for _ in range(3):  # running averages from other data
        net(torch.randn(2, 3, 8, 8) * 5 + 2)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "batches" not in k}
    images = list(torch.randn(6, 3, 8, 8))
    n = recalibrate_batchnorm(net, images, device=torch.device("cpu"), chunk=3, precision="fp32")
    assert n == 2 and net.training and net[1].momentum == 0.1
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())
    # the first layer's statistics are those of the conv output, averaged over the two chunks of 3 images
    with torch.no_grad():
        feats = [net[0](torch.stack(images[i:i + 3])) for i in (0, 3)]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).flatten(1).var(1, unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-5, atol=1e-6)


def test_recalibrated_model_no_longer_depends_on_its_old_running_statistics(repo_root) -> None:  # noqa: ANN001
    params = load_params(repo_root / "params.yaml", ["model.encoder=resnet10t", "model.drop_path_rate=0"])
    torch.manual_seed(0)
    a = build_model(params.model)
    b = copy.deepcopy(a)
    b.train()
    with torch.no_grad():  # b's running averages drift on other data; its weights stay a's
        for _ in range(4):
            b(torch.randn(2, 3, 64, 64) * 3, torch.rand(2, 1, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    a.eval(), b.eval()
    with torch.no_grad():
        assert not torch.allclose(a(x).logits, b(x).logits, atol=1e-3)
    images = list(torch.randn(4, 3, 64, 64))
    for model in (a, b):
        assert recalibrate_batchnorm(model, images, device=torch.device("cpu"), precision="fp32") > 10
    assert not a.training
    with torch.no_grad():
        torch.testing.assert_close(a(x).logits, b(x).logits, rtol=1e-5, atol=1e-5)


def test_optimizer_is_fused_and_steps_like_the_multi_tensor_kernel(repo_root) -> None:  # noqa: ANN001
    params = load_params(repo_root / "params.yaml", ["model.encoder=test_convnext"])
    torch.manual_seed(0)
    model = build_model(params.model)
    twin = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters()]
    fused = make_optimizer(model, params)
    assert fused.param_groups[0]["fused"] is True
    reference = torch.optim.AdamW(twin.parameters(), lr=params.train.lr, betas=params.train.betas,
                                  weight_decay=params.train.weight_decay, foreach=True)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        fused.step()
        reference.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = [float((a - p0).abs().max()) for a, p0 in zip(model.parameters(), initial, strict=True)]
    assert min(moved) > 1e-4  # every weight moved (3 Adam steps of lr 1e-3)


def test_bf16_autocast_on_cpu_tracks_fp32_and_learns(repo_root) -> None:  # noqa: ANN001
    """``train.precision: bf16`` on the CPU: the loss stays within bf16 rounding of fp32's, and training on a
    fixed batch drives it down as fp32 training does."""
    params = load_params(repo_root / "params.yaml", ["model.encoder=resnet10t", "model.drop_path_rate=0"])
    torch.manual_seed(0)
    base = build_model(params.model).to(memory_format=torch.channels_last)
    criterion = build_criterion()
    stage = params.train.stages[0]
    batches = _batches(1, size=64) * 12
    curves = {}
    for precision in ("fp32", "bf16"):
        model = copy.deepcopy(base)
        optimizer = make_optimizer(model, params)
        losses: list[float] = []
        train_one_epoch(model, batches, optimizer, criterion, device=torch.device("cpu"), weights=stage.loss,
                        supervise=stage.supervise, lr=3e-3, precision=precision, grad_clip=1.0,
                        channels_last=True, on_step=lambda _step, parts, out=losses: out.append(parts["loss"]))
        curves[precision] = losses
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert abs(fp32[0] - bf16[0]) <= 0.02 * fp32[0], (fp32[0], bf16[0])
    assert bf16[-1] < 0.9 * bf16[0] and fp32[-1] < 0.9 * fp32[0], curves
    assert abs(fp32[-1] - bf16[-1]) <= 0.1 * fp32[-1], curves
