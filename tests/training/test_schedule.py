"""``Schedule``: stage boundaries, warm-up and cosine learning rates, per-stage lr, as pure functions of the epoch."""

from __future__ import annotations

import math

import pytest

from birefnet.config import TrainParams, TrainStageParams
from birefnet.training.schedule import Schedule


def schedule(*stages: tuple[int, float | None], **train: object) -> Schedule:
    """A schedule of stages ``(epochs, lr)`` (lr None = ``train.lr``)."""
    return Schedule(TrainParams(stages=[TrainStageParams(name=f"s{i}", epochs=epochs, lr=lr)
                                        for i, (epochs, lr) in enumerate(stages)], **train))


def test_stage_boundaries() -> None:
    s = schedule((3, None), (2, None), (1, None))
    assert s.total_epochs == 6 and s.starts == [0, 3, 5]
    assert [s.stage_index(e) for e in range(6)] == [0, 0, 0, 1, 1, 2]
    assert [s.at(e).epoch_in_stage for e in range(6)] == [0, 1, 2, 0, 1, 0]
    assert [s.at(e).stage.name for e in (2, 3, 5)] == ["s0", "s1", "s2"]
    for outside in (-1, 6):
        with pytest.raises(IndexError, match=f"epoch {outside} outside the schedule"):
            s.stage_index(outside)


def test_constant_lr_follows_each_stage_lr_across_boundaries() -> None:
    s = schedule((2, None), (2, 1e-5), lr=1e-3, lr_schedule="constant")
    assert [s.lr_at(e) for e in range(4)] == [1e-3, 1e-3, 1e-5, 1e-5]


def test_warmup_ramps_linearly_towards_the_base_lr() -> None:
    s = schedule((6, None), lr=1e-3, warmup_epochs=3, lr_schedule="constant")
    # epoch e < warmup: base * (e + 1) / (warmup + 1), never 0 and never the full lr yet
    assert [s.lr_at(e) for e in range(3)] == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3], rel=1e-12)
    assert [s.lr_at(e) for e in range(3, 6)] == [1e-3] * 3


def test_cosine_values_at_start_middle_and_end() -> None:
    s = schedule((5, None), lr=1e-3, lr_schedule="cosine")
    # t = epoch / total_epochs: the last epoch stops one step short of 0
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(5)]
    assert [s.lr_at(e) for e in range(5)] == pytest.approx(expected, rel=1e-12)
    assert s.lr_at(0) == pytest.approx(1e-3, rel=1e-12)
    assert s.lr_at(4) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.8)), rel=1e-12) and s.lr_at(4) > 0
    even = schedule((4, None), lr=2e-4, lr_schedule="cosine")
    assert even.lr_at(2) == pytest.approx(1e-4, rel=1e-12)  # the middle: half the base lr
    rates = [even.lr_at(e) for e in range(4)]
    assert rates == sorted(rates, reverse=True) and len(set(rates)) == 4  # strictly decreasing


def test_cosine_after_warmup_and_across_a_stage_with_its_own_lr() -> None:
    s = schedule((3, None), (3, 1e-4), lr=1e-3, warmup_epochs=2, lr_schedule="cosine")
    assert s.lr_at(0) == pytest.approx(1e-3 / 3) and s.lr_at(1) == pytest.approx(2e-3 / 3)
    # the cosine starts after the warm-up (t = 0 at epoch 2) and spans the rest of the run (4 epochs)
    assert s.lr_at(2) == pytest.approx(1e-3, rel=1e-12)
    assert s.lr_at(3) == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-12)  # stage 2's base
    assert s.lr_at(4) == pytest.approx(1e-4 * 0.5, rel=1e-12)
    assert s.lr_at(5) == pytest.approx(1e-4 * 0.5 * (1 + math.cos(3 * math.pi / 4)), rel=1e-12)
    assert [s.at(e).lr for e in range(6)] == [s.lr_at(e) for e in range(6)]


def test_warmup_uses_the_stage_lr_when_a_short_first_stage_ends_inside_it() -> None:
    s = schedule((1, None), (3, 5e-4), lr=1e-3, warmup_epochs=2)
    assert s.lr_at(0) == pytest.approx(1e-3 / 3) and s.lr_at(1) == pytest.approx(5e-4 * 2 / 3)
