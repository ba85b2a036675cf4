"""The hybrid loss of BiRefNet (Zheng et al., CAAI AIR 2024), applied as upstream applies it.

``BiRefNetLoss(output, target)`` returns ``(total, parts)``:

* region terms (BCE, IoU, SSIM, optionally MAE and MSE) on **every** supervised map (stage logits at strides
  32/16/8 and the final logits), each resized to the target size (bilinear, ``align_corners=True``);
  the weighted terms are summed over maps with no per-stage weighting;
* the auxiliary classification CE when the output carries class logits and labels are given;
* the outward-reference gradient loss, summed over the three stages.

The defaults are the paper's main-stage weights (BCE 30, IoU 0.5, SSIM 10, CE 5, gradient 1; MAE and MSE off).
Upstream changes weights in place every fine-tuning epoch (IoU x0.5, or for Matting MSE and SSIM x0.9); here the
training schedule computes each epoch's weights (``train.stages[].loss`` and ``.decay``) and passes them to
``forward`` (``weights=``), so the module is never mutated. Other stages' and tasks' weights (region-only
fine-tuning, upstream's Matting task) are params (``configs/*.yaml``), not constants here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from birefnet.losses.terms import BCELoss, ClassificationLoss, GradientLoss, IoULoss, MAELoss, MSELoss, SSIMLoss
from birefnet.models.birefnet import BiRefNetOutput

REGION_TERMS = ("bce", "iou", "ssim", "mae", "mse")


class BiRefNetLoss(nn.Module):
    """Weighted sum of the BiRefNet loss terms over every output of the model.

    Args:
        bce: weight of the binary cross-entropy (per supervised map).
        iou: weight of the IoU loss (per map; the IoU loss itself is summed over the batch).
        ssim: weight of the SSIM loss (per map).
        mae: weight of the mean absolute error (per map; 0 in the paper's DIS setting).
        ce: weight of the auxiliary classification cross-entropy.
        gradient: weight of the outward-reference gradient loss (summed over stages).
        mse: weight of the mean squared error (per map; 0 in every upstream task, a matting option). Last, so
            positional calls written before it existed keep their meaning.
    """

    def __init__(
        self,
        bce: float = 30.0,
        iou: float = 0.5,
        ssim: float = 10.0,
        mae: float = 0.0,
        ce: float = 5.0,
        gradient: float = 1.0,
        mse: float = 0.0,
    ) -> None:
        super().__init__()
        weights = {"bce": bce, "iou": iou, "ssim": ssim, "mae": mae, "mse": mse, "ce": ce, "gradient": gradient}
        negative = {k: v for k, v in weights.items() if v < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0, given {negative}")
        self.weights = weights
        self.terms = nn.ModuleDict(
            {
                "bce": BCELoss(),
                "iou": IoULoss(),
                "ssim": SSIMLoss(),
                "mae": MAELoss(),
                "mse": MSELoss(),
                "ce": ClassificationLoss(),
                "gradient": GradientLoss(),
            }
        )

    def forward(
        self,
        output: BiRefNetOutput,
        target: torch.Tensor,
        class_target: torch.Tensor | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the loss.

        Args:
            output: the model's output (train mode for gradient terms).
            target: ``(B, 1, H, W)`` mask in [0, 1].
            class_target: ``(B,)`` class indices (-1 = none) for the auxiliary head, or None.
            weights: per-term weights for this call (every term named; e.g. a schedule stage's), used instead of
                the constructor's; the module is left unchanged.

        Returns:
            The fp32 scalar total and the weighted contribution of every active term (``bce``, ``iou``,
            ``ssim``, ``mae``, ``mse``, ``ce``, ``gradient``; a term with weight 0 is absent); the total is their
            sum.
        """
        weights = self.weights if weights is None else weights
        with torch.autocast(target.device.type, enabled=False):
            target = target.float()
            parts: dict[str, torch.Tensor] = {}
            maps = [_resize_to(m.float(), target) for m in output.supervised_logits]
            for name in REGION_TERMS:
                if not weights[name]:
                    continue
                if name == "ssim":
                    # One pass over the maps stacked on channels (the target blurred once): the mean SSIM of
                    # the stack is the mean of the per-map SSIMs, so the sum of the per-map losses is
                    # len(maps) times the stack's loss.
                    value = len(maps) * self.terms[name](torch.cat(maps, dim=1), target)
                else:
                    value = sum(self.terms[name](m, target) for m in maps)
                parts[name] = weights[name] * value
            if weights["ce"] and output.class_logits is not None and class_target is not None:
                parts["ce"] = weights["ce"] * self.terms["ce"](output.class_logits, class_target)
            if weights["gradient"] and output.gradient_logits:
                parts["gradient"] = weights["gradient"] * sum(
                    self.terms["gradient"](p, t)
                    for p, t in zip(output.gradient_logits, output.gradient_targets, strict=True)
                )
            total = sum(parts.values()) if parts else target.new_zeros(())
        return total, parts  # type: ignore[return-value]


def _resize_to(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if logits.shape[-2:] == target.shape[-2:]:
        return logits
    return F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=True)
