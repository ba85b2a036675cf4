"""The training criterion: the composite BiRefNet loss with the active schedule stage's weights."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from birefnet.config import LossWeights
from birefnet.losses import BiRefNetLoss
from birefnet.training.engine import Criterion


def build_criterion() -> Criterion:
    """A callable ``(output, batch, weights, supervise) -> (total, parts)`` for :func:`train_one_epoch`.

    Every weight comes from the schedule stage and is passed to the loss per call, so the loss module is never
    changed. ``supervise="final"`` drops the stage side outputs from the region terms (the gradient terms still
    use them, as their labels are masked by the stage predictions).
    """
    loss = BiRefNetLoss()

    def criterion(output: Any, batch: dict[str, Any], weights: LossWeights,
                  supervise: str) -> tuple[torch.Tensor, dict[str, float]]:
        device = output.logits.device
        mask = batch["mask"].to(device, non_blocking=True)
        class_id = batch.get("class_id")
        if isinstance(class_id, torch.Tensor):
            class_id = class_id.to(device, non_blocking=True)
        else:
            class_id = None
        if supervise == "final":
            output = dataclasses.replace(output, stage_logits=[])
        total, parts = loss(output, mask, class_id, weights=weights.model_dump())
        return total, {k: float(v.detach()) for k, v in parts.items()}

    return criterion
