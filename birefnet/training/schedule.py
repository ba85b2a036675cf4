"""The staged training schedule as data (``train.stages``): which stage, loss weights and lr at an epoch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from birefnet.config import LossWeights, TrainParams, TrainStageParams


@dataclass(frozen=True)
class StageAt:
    """The schedule at one epoch (0-based, global)."""

    index: int
    stage: TrainStageParams
    epoch_in_stage: int  # 0-based
    weights: LossWeights
    lr: float


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

    def at(self, epoch: int) -> StageAt:
        i = self.stage_index(epoch)
        return StageAt(i, self.stages[i], epoch - self.starts[i], self.weights_at(epoch), self.lr_at(epoch))
