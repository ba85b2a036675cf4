"""``birefnet predict``: original-size masks, RGBA cut-outs, bad files skipped and named, every input format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from birefnet.models import BiRefNet
from birefnet.predict import (
    collect_inputs,
    main,
    make_cutout,
    model_resolution,
    postprocess,
    predict_files,
    predict_images,
)
from tests.inference.tiny_model import TEST_SIZE


def _rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack(((xx * 255) // max(width - 1, 1), (yy * 255) // max(height - 1, 1), (xx + yy) % 256), axis=2)
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


def _write_formats(folder: Path) -> dict[str, tuple[int, int]]:
    """One image per supported flavour; returns file name -> (height, width)."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, tuple[int, int]] = {}

    def put(name: str, image: Image.Image) -> None:
        image.save(folder / name)
        sizes[name] = (image.height, image.width)

    put("color.jpg", Image.fromarray(_rgb(50, 70, 1)))
    put("gray.png", Image.fromarray(_rgb(41, 33, 2)[..., 0]))
    rgba = np.concatenate((_rgb(37, 45, 3), np.full((37, 45, 1), 128, np.uint8)), axis=2)
    put("rgba.png", Image.fromarray(rgba))
    put("deep16.png", Image.fromarray(_rgb(29, 61, 4)[..., 1].astype(np.uint16) * 257))
    put("photo.webp", Image.fromarray(_rgb(64, 48, 5)))
    put("scan.tiff", Image.fromarray(_rgb(30, 90, 6)))
    return sizes


def _write_broken(folder: Path) -> list[Path]:
    """Files with image extensions that cannot be decoded."""
    truncated = folder / "truncated.png"
    Image.fromarray(_rgb(40, 40, 7)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    not_an_image = folder / "notes.jpg"
    not_an_image.write_text("this is text, not a JPEG\n", encoding="utf-8")
    empty = folder / "empty.webp"
    empty.write_bytes(b"")
    return [truncated, not_an_image, empty]


def test_folder_with_broken_files_reports_each_and_predicts_the_rest(tiny_model_file: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    sizes = _write_formats(inputs)
    broken = _write_broken(inputs)
    (inputs / "readme.txt").write_text("not an image extension: ignored in folders\n", encoding="utf-8")
    out = tmp_path / "out"

    report = predict_files([inputs], tiny_model_file, out, size=TEST_SIZE, batch_size=4, progress=False)

    assert sorted(f.path for f in report.failures) == sorted(str(p) for p in broken)
    summary = report.summary()
    for path in broken:
        assert str(path) in summary
    assert f"predicted {len(sizes)} of {len(sizes) + len(broken)}" in summary
    assert len(report.masks) == len(sizes) and len(report.cutouts) == len(sizes)
    for name, (height, width) in sizes.items():
        stem = Path(name).stem
        mask = Image.open(out / f"{stem}.png")
        cutout = Image.open(out / f"{stem}_cutout.png")
        assert (mask.mode, mask.size) == ("L", (width, height)), name
        assert (cutout.mode, cutout.size) == ("RGBA", (width, height)), name
        mask_arr = np.asarray(mask)
        np.testing.assert_array_equal(np.asarray(cutout)[..., 3], mask_arr)
        assert mask_arr.std() > 1.0, f"{name}: constant mask"


def test_cutout_colours_are_the_input_pixels(tiny_model_file: Path, tmp_path: Path) -> None:
    image = _rgb(33, 47, 9)
    Image.fromarray(image).save(tmp_path / "a.png")
    predict_files([tmp_path / "a.png"], tiny_model_file, tmp_path / "out", size=TEST_SIZE, progress=False)
    cutout = np.asarray(Image.open(tmp_path / "out" / "a_cutout.png"))
    np.testing.assert_array_equal(cutout[..., :3], image)


def test_cli_exit_status_and_summary(tiny_model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    inputs = tmp_path / "in"
    _write_formats(inputs)
    good = ["--model", str(tiny_model_file), "--out", str(tmp_path / "out"), "--size", *map(str, TEST_SIZE),
            "--batch-size", "3", "--device", "cpu", "--no-progress", "-q"]
    assert main([str(inputs / "*.png"), str(inputs / "color.jpg"), *good]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{s}{suffix}.png" for s in ("color", "gray", "rgba", "deep16") for suffix in ("", "_cutout"))

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    missing = tmp_path / "missing.jpg"
    assert main([str(bad), str(missing), str(inputs / "gray.png"), "--no-cutout", *good]) == 1
    err = capsys.readouterr().err
    assert "predicted 1 of 3" in err and str(bad) in err and str(missing) in err


def test_no_cutout_and_recursive_mirror(tiny_model_file: Path, tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        Image.fromarray(_rgb(20, 30)).save(tmp_path / "in" / sub / "same.png")
    report = predict_files([tmp_path / "in"], tiny_model_file, tmp_path / "out", size=TEST_SIZE, cutout=False,
                           recursive=True, progress=False)
    assert report.ok and not report.cutouts
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in report.masks) == ["a/same.png", "b/same.png"]


def test_collect_inputs_disambiguates_clashing_stems(tmp_path: Path) -> None:
    for name in ("x.png", "x.jpg"):
        Image.fromarray(_rgb(8, 8)).save(tmp_path / name)
    images, failures = collect_inputs([tmp_path / "x.png", tmp_path / "x.jpg", tmp_path / "x.png",
                                       str(tmp_path / "nothing*.png")])
    assert [stem.as_posix() for _, stem in images] == ["x", "x_jpg"]
    assert [f.reason for f in failures] == ["pattern matched no file"]


def test_predict_images_batch_equals_one_by_one(tiny_model: BiRefNet) -> None:
    images = [_rgb(50, 70, 1), _rgb(90, 30, 2)]
    batched = predict_images(tiny_model, images, TEST_SIZE)
    single = [predict_images(tiny_model, [image], TEST_SIZE)[0] for image in images]
    for a, b, image in zip(batched, single, images, strict=True):
        assert a.shape == image.shape[:2]
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_postprocess_is_upstream_sigmoid_resize_truncate() -> None:
    logits = torch.tensor([[[[-2.0, 0.0], [1.0, 3.0]]]])
    (mask,) = postprocess(logits, [(3, 3)])
    probs = torch.nn.functional.interpolate(logits.sigmoid(), size=(3, 3), mode="bilinear", align_corners=True)
    expected = (probs[0, 0] * 255).floor().to(torch.uint8).numpy()
    np.testing.assert_array_equal(mask, expected)
    assert mask[0, 0] == int(255 / (1 + np.exp(2.0)))  # corners are kept exactly with align_corners=True


def test_make_cutout_alpha_is_the_mask() -> None:
    image, mask = _rgb(5, 6), np.arange(30, dtype=np.uint8).reshape(5, 6)
    cutout = make_cutout(image, mask)
    np.testing.assert_array_equal(cutout[..., 3], mask)
    with pytest.raises(ValueError, match="differ in size"):
        make_cutout(image, mask[:4])


def test_model_resolution(tiny_model_file: Path) -> None:
    assert model_resolution(tiny_model_file) == (1024, 1024)
    assert model_resolution(tiny_model_file, (64, 96)) == (64, 96)
    with pytest.raises(ValueError, match="multiples of 32"):
        model_resolution(tiny_model_file, (100, 96))


def test_registered_model_uri_loads_the_safetensors_inside(tiny_model_file: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A real local MLflow registry (SQLite, no server): a version whose files hold the safetensors."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("predict-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp)
    client.log_artifact(run.info.run_id, str(tiny_model_file), artifact_path="model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("birefnet")
    version = client.create_model_version("birefnet", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("birefnet", "champion", version.version)
    Image.fromarray(_rgb(20, 30)).save(tmp_path / "a.png")
    report = predict_files([tmp_path / "a.png"], "models:/birefnet@champion", tmp_path / "out", size=TEST_SIZE,
                           progress=False)
    assert report.ok and len(report.masks) == 1
    assert np.asarray(Image.open(report.masks[0])).shape == (20, 30)
