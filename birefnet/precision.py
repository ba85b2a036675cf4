"""Autocast selection shared by training, evaluation and inference (a leaf: imports nothing of ``birefnet``).

``precision`` names the forward pass's numeric format: ``auto`` (bf16 autocast on CUDA, fp32 elsewhere), ``fp32``
(no autocast), ``bf16`` or ``fp16`` (autocast to that type). Training pairs fp16 with a ``GradScaler``
(:func:`birefnet.training.engine.train_one_epoch`); inference refuses fp16 off CUDA
(:func:`birefnet.inference.predict.check_precision`).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: Every ``precision`` value (torch is imported only when an autocast is made: command lines list these cheaply).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast for ``precision`` on ``device``: a no-op context for ``fp32``.

    ``auto`` is bf16 on CUDA and fp32 elsewhere; ``bf16`` and ``fp16`` autocast to that type on any device (fp16
    training needs a ``torch.amp.GradScaler``, see :func:`birefnet.training.engine.train_one_epoch`; on a CPU fp16
    kernels are emulated).
    """
    import torch

    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
