"""Precomputed gradient labels equal the on-the-fly definition (upstream-spec §3.4)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from birefnet.config import load_params
from birefnet.data.gradients import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    decode_gradient,
    encode_gradient,
    gradient_label,
    gradient_label_torch,
    laplacian_kernel,
)
from birefnet.data.io import load_image
from birefnet.stages.gradients import compute_gradients, gradient_path
from birefnet.stages.ingest import ingest
from birefnet.stages.synthesize import synthesize


def _normalize(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def _reference_laplacian(gray: np.ndarray) -> np.ndarray:
    """Direct definition: 5x5 ones with centre -24, / 48, reflect-101 border, as an explicit sum."""
    padded = np.pad(gray.astype(np.float64), 2, mode="reflect")  # numpy 'reflect' is reflect-101
    h, w = gray.shape
    out = np.zeros((h, w))
    for dy in range(5):
        for dx in range(5):
            out += padded[dy:dy + h, dx:dx + w] * (-24.0 if (dy, dx) == (2, 2) else 1.0)
    return out / 48.0


def test_kernel() -> None:
    k = laplacian_kernel(5)
    assert k.shape == (5, 5) and abs(float(k.sum())) < 1e-7 and abs(float(np.abs(k).sum()) - 1) < 1e-6
    assert k[2, 2] == pytest.approx(-0.5) and k[0, 0] == pytest.approx(1 / 48)


def test_numpy_torch_and_definition_agree() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8)
    x = _normalize(image)
    ours = gradient_label(image)
    on_the_fly = gradient_label_torch(x)[0, 0].numpy()
    ref = _reference_laplacian(x[0].mean(0).numpy())
    assert np.abs(ours - ref).max() < 1e-5
    assert np.abs(on_the_fly - ref).max() < 1e-5


def test_encoding_round_trip_and_range_guard() -> None:
    rng = np.random.default_rng(0)
    label = rng.uniform(-2.3, 2.3, size=(16, 16)).astype(np.float32)
    back = decode_gradient(encode_gradient(label))
    assert np.abs(back - label).max() <= 0.5 / 8192 + 1e-7
    with pytest.raises(ValueError, match="out of the storable range"):
        encode_gradient(np.full((2, 2), 5.0, np.float32))


def test_stage_output_matches_on_the_fly_label(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("{}\n", encoding="utf-8")
    params = load_params(p, [
        f"data.synthetic.out={tmp_path / 'raw'}", f"data.root={tmp_path / 'raw'}",
        f"data.prepared={tmp_path / 'prep'}", f"gradients.out={tmp_path / 'grad'}", "data.size=[128, 96]",
        "data.synthetic.counts={DIS-TR: 4, DIS-VD: 2}", "data.test_sets=[]", "data.synthetic.min_side=96",
        "data.synthetic.max_side=200", "data.workers=1"])
    synthesize(params.data.synthetic, workers=1, progress=False)
    result = ingest(params, progress=False)
    assert compute_gradients(params, progress=False) == 6
    index = json.loads((tmp_path / "grad" / "index.json").read_text(encoding="utf-8"))
    assert index["size"] == [128, 96] and index["count"] == 6
    worst = 0.0
    for rec in result.records:
        stored = cv2.imread(str(gradient_path(tmp_path / "grad", rec["set"], rec["key"])), cv2.IMREAD_UNCHANGED)
        assert stored.dtype == np.uint16 and stored.shape == (96, 128)
        pre = decode_gradient(stored)
        # on the fly, as training would compute it: resize, normalise, Laplacian in torch
        image = cv2.resize(load_image(rec["image"]), (128, 96), interpolation=cv2.INTER_LINEAR)
        live = gradient_label_torch(_normalize(image))[0, 0].numpy()
        rel = float(np.abs(pre - live).max() / np.abs(live).max())
        worst = max(worst, rel)
    assert worst <= 1e-3, worst


def test_on_the_fly_mode_writes_index_only(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("{}\n", encoding="utf-8")
    (tmp_path / "prep").mkdir()
    (tmp_path / "prep" / "manifest.jsonl").write_text("", encoding="utf-8")
    params = load_params(p, [f"data.prepared={tmp_path / 'prep'}", f"gradients.out={tmp_path / 'g'}",
                             "gradients.mode=on_the_fly"])
    assert compute_gradients(params, progress=False) == 0
    assert json.loads((tmp_path / "g" / "index.json").read_text())["mode"] == "on_the_fly"


def test_torch_label_is_differentiable_shape() -> None:
    x = torch.randn(2, 3, 32, 64, requires_grad=True)
    y = gradient_label_torch(x)
    assert y.shape == (2, 1, 32, 64)
    y.sum().backward()
    assert x.grad is not None
    assert torch.allclose(gradient_label_torch(x.detach()), F.conv2d(
        F.pad(x.detach().mean(1, keepdim=True), (2, 2, 2, 2), mode="reflect"),
        torch.from_numpy(laplacian_kernel(5))[None, None]))
