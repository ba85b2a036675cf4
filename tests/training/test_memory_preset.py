"""``train.memory_preset``: gradient checkpointing on small GPUs and the largest per-GPU batch, scaled by size."""

from __future__ import annotations

import pytest

from birefnet.config import Params
from birefnet.training.trainer import apply_memory_preset


def params(preset: str, batch: int, size: int = 1024, checkpointing: bool = False) -> Params:
    return Params.model_validate({"data": {"size": [size, size]}, "loader": {"batch_size": batch},
                                  "model": {"gradient_checkpointing": checkpointing},
                                  "train": {"memory_preset": preset}})


def test_none_leaves_the_model_params_alone() -> None:
    p = params("none", batch=64)
    assert apply_memory_preset(p) is p.model


@pytest.mark.parametrize(("preset", "largest", "checkpointing"), [("24gb", 2, True), ("40gb", 4, True),
                                                                  ("80gb", 4, False)])
def test_preset_at_1024_sets_checkpointing_and_caps_the_batch(preset: str, largest: int, checkpointing: bool) -> None:
    model = apply_memory_preset(params(preset, batch=largest))
    assert model.gradient_checkpointing is checkpointing
    assert model.model_copy(update={"gradient_checkpointing": False}) == params(preset, batch=largest).model
    with pytest.raises(ValueError, match=rf"loader.batch_size {largest + 1} exceeds .* {preset} fits at "
                                         rf"1024x1024 \({largest}\)"):
        apply_memory_preset(params(preset, batch=largest + 1))


def test_smaller_images_fit_a_proportionally_larger_batch() -> None:
    assert apply_memory_preset(params("24gb", batch=8, size=512)).gradient_checkpointing  # 2 * 4 pixels ratio
    with pytest.raises(ValueError, match=r"fits at 512x512 \(8\)"):
        apply_memory_preset(params("24gb", batch=9, size=512))


def test_a_preset_without_checkpointing_keeps_it_when_params_ask_for_it() -> None:
    assert apply_memory_preset(params("80gb", batch=2, checkpointing=True)).gradient_checkpointing
