"""Dynamic-size training (``train.stages[].dynamic_size``): per-step sizes drawn from (seed, epoch, step)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from birefnet.config import ParamsError, load_params
from birefnet.models import build_model
from birefnet.training.criterion import build_criterion
from birefnet.training.engine import train_one_epoch
from birefnet.training.runtime import seed_everything
from birefnet.training.schedule import Schedule, draw_dynamic_size
from birefnet.training.trainer import make_optimizer

RANGES = ((64, 256), (32, 160))
DYNAMIC = "train.stages=[{name: fixed, epochs: 1, size: [64, 64]}, {name: dyn, epochs: 2, " \
          "dynamic_size: [[64, 256], [32, 160]]}]"


def test_draws_are_multiples_of_32_inside_the_ranges_and_cover_them() -> None:
    sizes = [draw_dynamic_size(RANGES, seed=7, epoch=e, step=s) for e in range(4) for s in range(100)]
    widths, heights = {w for w, _ in sizes}, {h for _, h in sizes}
    assert widths == {64, 96, 128, 160, 192, 224, 256}  # bounds included, every multiple of 32 reached
    assert heights == {32, 64, 96, 128, 160}
    assert len(set(sizes)) > 20  # width and height drawn independently
    assert draw_dynamic_size(((96, 96), (32, 32)), seed=7, epoch=0, step=0) == (96, 32)


def test_draws_are_a_function_of_seed_epoch_and_step_only() -> None:
    grid = [(e, s) for e in range(3) for s in range(20)]
    first = [draw_dynamic_size(RANGES, seed=7, epoch=e, step=s) for e, s in grid]
    # any process RNG state (each rank seeds seed + rank), any call order: the same draws
    for rank in (0, 1, 3):
        seed_everything(7 + rank)
        torch.rand(10), np.random.rand(3), random.random()
        backwards = {(e, s): draw_dynamic_size(RANGES, seed=7, epoch=e, step=s) for e, s in reversed(grid)}
        assert [backwards[key] for key in grid] == first, rank
    assert [draw_dynamic_size(RANGES, seed=8, epoch=e, step=s) for e, s in grid] != first
    per_epoch = [[draw_dynamic_size(RANGES, seed=7, epoch=e, step=s) for s in range(20)] for e in range(3)]
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]  # epochs do not repeat one sequence


def test_schedule_draws_with_the_run_seed_only_in_dynamic_stages(repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml", [DYNAMIC, "train.seed=11"])
    schedule = Schedule(params.train)
    assert schedule.size_at(0) is None  # the fixed-size stage
    for epoch in (1, 2):
        size_at = schedule.size_at(epoch)
        assert size_at is not None
        assert [size_at(s) for s in range(10)] == [draw_dynamic_size(RANGES, seed=11, epoch=epoch, step=s)
                                                   for s in range(10)]
    # two ranks build the schedule from the same params: same sizes at every step, whatever their RNG streams
    seed_everything(11)
    rank0 = [Schedule(params.train).size_at(1)(s) for s in range(10)]
    seed_everything(12)
    torch.rand(5)
    rank1 = [Schedule(params.train).size_at(1)(s) for s in range(10)]
    assert rank0 == rank1


def test_default_schedule_has_no_dynamic_size(repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml")
    schedule = Schedule(params.train)
    assert all(stage.dynamic_size is None for stage in params.train.stages)
    assert all(schedule.size_at(e) is None for e in range(schedule.total_epochs))


@pytest.mark.parametrize(("stage", "message"), [
    ("{name: a, epochs: 1, size: [64, 64], dynamic_size: [[64, 128], [64, 128]]}", "mutually exclusive"),
    ("{name: a, epochs: 1, dynamic_size: [[64, 100], [64, 128]]}", "width bounds must be multiples of 32"),
    ("{name: a, epochs: 1, dynamic_size: [[64, 128], [48, 128]]}", "height bounds must be multiples of 32"),
    ("{name: a, epochs: 1, dynamic_size: [[128, 64], [64, 128]]}", "min > max"),
    ("{name: a, epochs: 1, dynamic_size: [[0, 64], [64, 128]]}", r"dynamic_size\[0\]\[0\]: expected a number > 0"),
    ("{name: a, epochs: 1, dynamic_size: [[64, 128]]}", "dynamic_size"),
])
def test_bad_dynamic_size_is_refused(repo_root: Path, stage: str, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        load_params(repo_root / "params.yaml", [f"train.stages=[{stage}]"])


def test_draw_refuses_bad_ranges() -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        draw_dynamic_size(((64, 80), (32, 64)), seed=0, epoch=0, step=0)
    with pytest.raises(ValueError, match="min <= max"):
        draw_dynamic_size(((64, 32), (32, 64)), seed=0, epoch=0, step=0)


def test_training_steps_run_at_the_drawn_sizes(repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml", ["model.encoder=test_convnext", "model.deform_impl=sampling",
                                                     "model.drop_path_rate=0", DYNAMIC])
    torch.manual_seed(0)
    model = build_model(params.model)
    seen: list[tuple[int, ...]] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(2, 3, 64, 64, generator=g), "mask": (torch.rand(2, 1, 64, 64, generator=g) > .8)
                .float(), "gradient": torch.rand(2, 1, 64, 64, generator=g), "class_id": torch.full((2,), -1)}
               for _ in range(3)]
    at = Schedule(params.train).at(2)
    size_at = Schedule(params.train).size_at(2)
    out = train_one_epoch(model, batches, make_optimizer(model, params), build_criterion(),
                          device=torch.device("cpu"), weights=at.weights, supervise="all", lr=1e-3, precision="fp32",
                          size_at=size_at)
    expected = [draw_dynamic_size(RANGES, seed=params.train.seed, epoch=2, step=s) for s in range(3)]
    assert seen == [(2, 3, h, w) for w, h in expected]
    assert len(set(expected)) > 1 and out["samples"] == 6 and np.isfinite(out["loss"])
    with pytest.raises(ValueError, match="size or size_at"):
        train_one_epoch(model, batches, make_optimizer(model, params), build_criterion(),
                        device=torch.device("cpu"), weights=at.weights, supervise="all", lr=1e-3, size=(64, 64),
                        size_at=size_at)
