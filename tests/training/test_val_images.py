"""The per-epoch validation image: the first N validation samples as image | ground truth | prediction rows, logged
to a real MLflow run (embedded SQLite) as image ``val_masks`` at step = epoch. No Ray: the function rank 0 calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from birefnet.imaging import IMAGENET_MEAN, IMAGENET_STD, predictions_to_uint8
from birefnet.training.trainer import (
    VAL_GRID_GAP,
    VAL_IMAGE_KEY,
    VAL_IMAGES_TAG,
    log_validation_images,
    validation_grid,
    validation_samples,
)


def _batch(rgb: np.ndarray, masks: np.ndarray, keys: list[str]) -> dict:
    """A loader batch as the evaluation loader yields it (normalised float image, float mask in [0, 1])."""
    image = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return {"image": (image - mean) / std, "mask": torch.from_numpy(masks)[:, None].float() / 255.0, "key": keys,
            "size": len(keys)}


def _loader(size: int = 64) -> tuple[list[dict], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    masks = (rng.random((5, size, size)) > 0.5).astype(np.uint8) * 255
    keys = [f"sample-{i}" for i in range(5)]
    return [_batch(rgb[i:i + 2], masks[i:i + 2], keys[i:i + 2]) for i in (0, 2, 4)], rgb, masks


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    from birefnet.config import ModelParams
    from birefnet.models import build_model

    torch.manual_seed(0)
    return build_model(ModelParams(encoder="test_convnext", attention="none", multiscale_input="none")).eval()


def test_samples_are_the_first_n_in_loader_order_across_batches() -> None:
    loader, rgb, _ = _loader()
    samples = validation_samples(loader, 3)
    assert samples["key"] == ["sample-0", "sample-1", "sample-2"] and samples["image"].shape == (3, 3, 64, 64)
    assert validation_samples(loader, 3)["key"] == samples["key"]  # the same samples every epoch
    assert validation_samples(loader, 50)["key"] == [f"sample-{i}" for i in range(5)]  # a smaller set: all of it


def test_grid_rows_are_image_truth_prediction_and_large_samples_shrink() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)
    masks = rng.integers(0, 256, (2, 40, 50), dtype=np.uint8)
    predictions = rng.integers(0, 256, (2, 40, 50), dtype=np.uint8)
    grid = validation_grid(images, masks, predictions)
    gap = VAL_GRID_GAP
    assert grid.shape == (2 * 40 + gap, 3 * 50 + 2 * gap, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[40 + gap:, :50], images[1])
    np.testing.assert_array_equal(grid[:40, 50 + gap:100 + gap, 1], masks[0])
    np.testing.assert_array_equal(grid[:40, 100 + 2 * gap:, 2], predictions[0])
    big = validation_grid(np.zeros((1, 600, 400, 3), np.uint8), np.zeros((1, 600, 400), np.uint8),
                          np.zeros((1, 600, 400), np.uint8))
    assert big.shape == (256, 3 * 171 + 2 * gap, 3)  # longest panel side 256 (400 * 256 / 600 = 170.7)
    with pytest.raises(ValueError, match="2 images, 1 masks and 2 predictions"):
        validation_grid(images, masks[:1], predictions)


def test_logged_to_the_run_at_the_epoch_step(model: torch.nn.Module, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from PIL import Image

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("val-images", str((tmp_path / "artifacts").as_uri()))
                               ).info.run_id
    loader, rgb, masks = _loader()
    for epoch in (0, 5):
        assert log_validation_images(client, run_id, model, loader, epoch, 3, device=torch.device("cpu"),
                                     precision="fp32", set_name="DIS-VD")
    files = sorted(f.path for f in client.list_artifacts(run_id, "images"))
    pngs = [p for p in files if p.endswith(".png")]
    assert [p.split("+")[:3] for p in pngs] == [["images/" + VAL_IMAGE_KEY, "step", "0"],
                                                ["images/" + VAL_IMAGE_KEY, "step", "5"]]
    assert client.get_run(run_id).data.tags[VAL_IMAGES_TAG] == "DIS-VD: sample-0, sample-1, sample-2"
    local = client.download_artifacts(run_id, pngs[1], str(tmp_path / "dl"))
    grid = np.asarray(Image.open(local).convert("RGB"))
    gap = VAL_GRID_GAP
    assert grid.shape == (3 * 64 + 2 * gap, 3 * 64 + 2 * gap, 3)
    with torch.no_grad():
        expected = predictions_to_uint8(model(validation_samples(loader, 3)["image"]).logits)
    for row in range(3):
        top = row * (64 + gap)
        np.testing.assert_array_equal(grid[top:top + 64, :64], rgb[row])  # the input, de-normalised exactly
        np.testing.assert_array_equal(grid[top:top + 64, 64 + gap:128 + gap, 0], masks[row])
        np.testing.assert_array_equal(grid[top:top + 64, 128 + 2 * gap:, 0], expected[row])
