"""Evaluation: the paper's metrics (:mod:`.metrics`, :mod:`.hce`), the optional matting/boundary metrics
(``extra_metrics``: MSE, mBA, boundary IoU) and prediction-folder scoring (:mod:`.folders`)."""

from __future__ import annotations

from birefnet.evaluation.hce import HCEParts, relax_hce
from birefnet.evaluation.metrics import (
    EXTRA_METRIC_KEYS,
    EXTRA_METRICS,
    METRIC_KEYS,
    ExtraScores,
    ImageScores,
    MetricAccumulator,
    SetResult,
    extra_metrics,
    score_extra,
    score_image,
    score_set,
)

__all__ = [
    "EXTRA_METRICS",
    "EXTRA_METRIC_KEYS",
    "METRIC_KEYS",
    "ExtraScores",
    "HCEParts",
    "ImageScores",
    "MetricAccumulator",
    "SetResult",
    "extra_metrics",
    "relax_hce",
    "score_extra",
    "score_image",
    "score_set",
]
