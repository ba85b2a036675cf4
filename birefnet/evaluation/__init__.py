"""Evaluation: the paper's metrics (:mod:`.metrics`, :mod:`.hce`) and prediction-folder scoring (:mod:`.folders`)."""

from __future__ import annotations

from birefnet.evaluation.hce import HCEParts, relax_hce
from birefnet.evaluation.metrics import (
    METRIC_KEYS,
    ImageScores,
    MetricAccumulator,
    SetResult,
    score_image,
    score_set,
)

__all__ = [
    "METRIC_KEYS",
    "HCEParts",
    "ImageScores",
    "MetricAccumulator",
    "SetResult",
    "relax_hce",
    "score_image",
    "score_set",
]
