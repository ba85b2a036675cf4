"""The per-worker epoch and evaluation functions without Ray: channels_last gives the same training."""

from __future__ import annotations

import copy

import torch

from birefnet.config import load_params
from birefnet.models import build_model
from birefnet.training.criterion import build_criterion
from birefnet.training.engine import evaluate, train_one_epoch
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
    criterion = build_criterion(params)
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
