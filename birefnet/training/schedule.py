"""The staged training schedule as data (``train.stages``): stage, loss weights, lr, encoder freeze at an epoch."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from birefnet.config import LossWeights, TrainParams, TrainStageParams

#: Salt of the dynamic-size stream, so its draws are not those of any other generator seeded with the same numbers.
DYNAMIC_SIZE_STREAM = 0x5A1E


def draw_dynamic_size(ranges: Sequence[Sequence[int]], *, seed: int, epoch: int, step: int) -> tuple[int, int]:
    """The (width, height) of one training step under a stage's ``dynamic_size``.

    Each side is uniform over the multiples of 32 in its ``[min, max]`` range (bounds included), as upstream's
    ``dynamic_size``. The draw is a pure function of ``(seed, epoch, step)``: no process-local RNG stream is read
    or advanced, so every DDP rank (which shares ``train.seed``, not its rank-offset seed) gets the same size at
    the same step, and a resumed run draws what an uninterrupted one would have.

    Args:
        ranges: ``[[min_width, max_width], [min_height, max_height]]``, bounds multiples of 32.
        seed: the run's seed (``train.seed``).
        epoch: global 0-based epoch.
        step: 0-based step inside the epoch.

    Raises:
        ValueError: a bound is not a positive multiple of 32 or a range is empty.
    """
    (min_w, max_w), (min_h, max_h) = ranges
    for low, high in ((min_w, max_w), (min_h, max_h)):
        if low <= 0 or low % 32 or high % 32 or low > high:
            raise ValueError(f"dynamic_size ranges must be [min, max] with positive multiples of 32 and min <= max, "
                             f"got {[list(r) for r in ranges]}")
    if epoch < 0 or step < 0:
        raise ValueError(f"epoch and step must be >= 0, got epoch {epoch}, step {step}")
    rng = np.random.default_rng([DYNAMIC_SIZE_STREAM, seed % 2**64, epoch, step])
    width = int(rng.integers(min_w // 32, max_w // 32, endpoint=True)) * 32
    height = int(rng.integers(min_h // 32, max_h // 32, endpoint=True)) * 32
    return width, height


@dataclass(frozen=True)
class StageAt:
    """The schedule at one epoch (0-based, global)."""

    index: int
    stage: TrainStageParams
    epoch_in_stage: int  # 0-based
    weights: LossWeights
    lr: float
    encoder_frozen: bool = False


class Schedule:
    """Maps a global epoch to its stage, loss weights and learning rate.

    Everything is a pure function of the epoch, so a resumed run continues with exactly the weights and lr
    an uninterrupted run would have used (upstream mutates loss weights in place each epoch and loses that
    on resume).
    """

    def __init__(self, train: TrainParams) -> None:
        self.train = train
        self.stages = list(train.stages)
        self.starts: list[int] = []
        start = 0
        for s in self.stages:
            self.starts.append(start)
            start += s.epochs
        self.total_epochs = start

    def stage_index(self, epoch: int) -> int:
        if not 0 <= epoch < self.total_epochs:
            raise IndexError(f"epoch {epoch} outside the schedule (0..{self.total_epochs - 1})")
        for i in range(len(self.stages) - 1, -1, -1):
            if epoch >= self.starts[i]:
                return i
        return 0

    def weights_at(self, epoch: int) -> LossWeights:
        i = self.stage_index(epoch)
        stage = self.stages[i]
        k = epoch - self.starts[i] + 1
        values = stage.loss.model_dump()
        for term, factor in stage.decay.items():
            values[term] = values[term] * factor**k
        return LossWeights(**values)

    def lr_at(self, epoch: int) -> float:
        i = self.stage_index(epoch)
        base = self.stages[i].lr or self.train.lr
        if epoch < self.train.warmup_epochs:
            return base * (epoch + 1) / (self.train.warmup_epochs + 1)
        if self.train.lr_schedule == "cosine":
            span = max(1, self.total_epochs - self.train.warmup_epochs)
            t = (epoch - self.train.warmup_epochs) / span
            return base * 0.5 * (1 + math.cos(math.pi * t))
        return base

    def size_at(self, epoch: int) -> Callable[[int], tuple[int, int]] | None:
        """Step -> (width, height) in ``epoch`` when its stage has ``dynamic_size``, else None.

        The draws use ``train.seed`` (never a rank-offset seed), so every DDP rank resizes a step's batch alike.
        """
        ranges = self.stages[self.stage_index(epoch)].dynamic_size
        if ranges is None:
            return None
        seed = self.train.seed
        return lambda step: draw_dynamic_size(ranges, seed=seed, epoch=epoch, step=step)

    def encoder_frozen_at(self, epoch: int) -> bool:
        """Whether ``train.freeze_encoder_epochs`` freezes the encoder at ``epoch`` (epochs < K, or all)."""
        self.stage_index(epoch)  # range check
        freeze = self.train.freeze_encoder_epochs
        return freeze == "all" or epoch < freeze

    def at(self, epoch: int) -> StageAt:
        i = self.stage_index(epoch)
        return StageAt(i, self.stages[i], epoch - self.starts[i], self.weights_at(epoch), self.lr_at(epoch),
                       self.encoder_frozen_at(epoch))
