"""``birefnet predict``: original-size masks, RGBA cut-outs, bad files skipped and named, every input format."""

from __future__ import annotations

import hashlib
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from birefnet.commands.predict import main
from birefnet.inference.files import PredictInputError, collect_inputs, plan_outputs
from birefnet.inference.predict import model_resolution, predict_files, predict_images
from birefnet.inference.processing import make_cutout, postprocess
from birefnet.models import BiRefNet
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


def test_plan_outputs_disambiguates_clashing_stems(tmp_path: Path) -> None:
    for name in ("x.png", "x.jpg"):
        Image.fromarray(_rgb(8, 8)).save(tmp_path / name)
    images, failures = collect_inputs([tmp_path / "x.png", tmp_path / "x.jpg", tmp_path / "x.png",
                                       str(tmp_path / "nothing*.png")])
    assert [f.reason for f in failures] == ["pattern matched no file"]
    plan, renames = plan_outputs(images, tmp_path / "out")
    assert [stem.as_posix() for _, stem in plan] == ["x", "x_jpg"]
    assert [(r.path, r.wanted, r.used) for r in renames] == [(str(tmp_path / "x.jpg"), "x", "x_jpg")]


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_input_named_like_another_inputs_cutout_gets_its_own_outputs(
        tiny_model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``x.png`` and ``x_cutout.png``: x's cut-out and x_cutout's mask both wanted ``x_cutout.png``."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(_rgb(20, 30, 1)).save(inputs / "x.png")
    Image.fromarray(_rgb(44, 52, 2)).save(inputs / "x_cutout.png")
    out = tmp_path / "out"
    args = [str(inputs), "--model", str(tiny_model_file), "--out", str(out), "--size", *map(str, TEST_SIZE),
            "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    summary = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["x.png", "x_cutout.png", "x_cutout_png.png",
                                                     "x_cutout_png_cutout.png"]
    # every output is at its own input's size: nothing was written twice
    assert Image.open(out / "x.png").size == Image.open(out / "x_cutout.png").size == (30, 20)
    assert Image.open(out / "x_cutout_png.png").size == Image.open(out / "x_cutout_png_cutout.png").size == (52, 44)
    assert Image.open(out / "x_cutout.png").mode == "RGBA"
    assert "predicted 2 of 2" in summary and "1 output name(s) changed" in summary
    assert f"{inputs / 'x_cutout.png'}: x_cutout.png -> x_cutout_png.png" in summary
    assert f"{out / 'x_cutout.png'} is already the output of {inputs / 'x.png'}" in summary


def test_out_in_an_input_folder_is_refused_and_inputs_are_never_overwritten(
        tiny_model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(_rgb(20, 30, 1)).save(photos / "x.png")
    Image.fromarray(_rgb(24, 32, 2)).save(photos / "y.jpg")
    before = _digests(photos)
    common = ["--model", str(tiny_model_file), "--size", *map(str, TEST_SIZE), "--device", "cpu", "--no-progress"]

    for out, inputs in [(photos, [str(photos)]),                       # --out is the input folder
                        (photos / "masks", [str(photos)]),             # --out inside the input folder
                        (photos, [str(photos / "x.png")]),             # --out holds an input file
                        (photos, [str(photos / "*.png")]),             # ... matched by a glob
                        (photos / "masks", [str(photos / "**" / "*.png")])]:  # inside a recursive glob's folder
        assert main([*inputs, "--out", str(out), *common]) == 3, (out, inputs)
        err = capsys.readouterr().err
        assert f"--out {out}" in err and str(photos) in err and "--overwrite" in err
        assert _digests(photos) == before and not (photos / "masks").exists()
    with pytest.raises(PredictInputError, match="input folder"):
        predict_files([photos], tiny_model_file, photos, size=TEST_SIZE, progress=False)

    # --overwrite lets the masks in, but the photos stay: x.png's mask takes another name
    assert main([str(photos), "--out", str(photos), "--overwrite", *common]) == 0
    summary = capsys.readouterr().out
    after = _digests(photos)
    assert {k: after[k] for k in before} == before
    assert sorted(after) == ["x.png", "x_png.png", "x_png_cutout.png", "y.jpg", "y.png", "y_cutout.png"]
    assert f"{photos / 'x.png'}: x.png -> x_png.png (would overwrite the input {photos / 'x.png'})" in summary


def test_rerun_replaces_its_own_outputs_but_not_other_files(tiny_model_file: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    Image.fromarray(_rgb(20, 30, 1)).save(inputs / "a.png")
    Image.fromarray(_rgb(22, 26, 2)).save(inputs / "b.jpg")
    args = [str(inputs), "--model", str(tiny_model_file), "--out", str(out), "--size", *map(str, TEST_SIZE),
            "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    first = _digests(out)
    assert main(args) == 0  # an earlier run's outputs are replaced, under the same names
    assert _digests(out) == first and "changed" not in capsys.readouterr().out

    foreign = out / "b.png"
    Image.fromarray(_rgb(5, 5, 3)).save(foreign)  # a file this tool did not write, where b's mask goes
    kept = foreign.read_bytes()
    assert main(args) == 3
    err = capsys.readouterr().err
    assert str(foreign) in err and "did not write" in err and "--overwrite" in err
    assert foreign.read_bytes() == kept
    assert main([*args, "--overwrite"]) == 0
    assert _digests(out) == first


def test_too_small_size_is_a_clear_usage_error(tiny_model_file: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The tiny model reads the half-size image too (multiscale_input cat): 32 px leaves no deepest map."""
    Image.fromarray(_rgb(20, 30)).save(tmp_path / "a.png")
    common = [str(tmp_path / "a.png"), "--model", str(tiny_model_file), "--out", str(tmp_path / "out"),
              "--device", "cpu", "--no-progress"]
    assert main([*common, "--size", "32", "32"]) == 2
    err = capsys.readouterr().err
    assert str(tiny_model_file) in err and "32x32" in err and "at least 64" in err and "Traceback" not in err
    assert main([*common, "--size", "64", "32"]) == 2
    assert main([*common, "--size", "64", "64"]) == 0


def test_truncated_model_file_is_a_clear_input_error(tiny_model_file: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    truncated = tmp_path / "model.safetensors"
    with tiny_model_file.open("rb") as src:
        truncated.write_bytes(src.read(1 << 20))  # header complete, tensor data cut short
    Image.fromarray(_rgb(20, 30)).save(tmp_path / "a.png")
    args = [str(tmp_path / "a.png"), "--model", str(truncated), "--out", str(tmp_path / "out"), "--device", "cpu",
            "--no-progress"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert str(truncated) in err and "not a readable safetensors file" in err and f"{1 << 20} bytes" in err
    assert main([*args, "--size", *map(str, TEST_SIZE)]) == 3
    not_safetensors = tmp_path / "model.pth"
    shutil.copy(tmp_path / "a.png", not_safetensors)
    assert main([*args[:2], str(not_safetensors), *args[3:]]) == 3
    assert str(not_safetensors) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("server", ["closed", "silent"])
def test_unreachable_tracking_server_fails_fast_with_redacted_uri(server: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``closed``: nothing listens (refused at once). ``silent``: a host that accepts the connection and never
    answers (a hung server, a firewall that swallows packets): only a client-side timeout ends the wait."""
    import mlflow

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if server == "silent":
        listener.listen(64)  # the kernel completes handshakes into the backlog; nobody ever reads or replies
    else:
        listener.close()
    uri = f"http://alice:s3cret-pw@127.0.0.1:{port}"
    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # another test may have set one in this process
    Image.fromarray(_rgb(20, 30)).save(tmp_path / "a.png")
    try:
        start = time.monotonic()
        code = main([str(tmp_path / "a.png"), "--model", "models:/birefnet@champion", "--out", str(tmp_path / "out"),
                     "--device", "cpu", "--no-progress"])
        elapsed = time.monotonic() - start
    finally:
        mlflow.set_tracking_uri(previous)
        listener.close()
    err = capsys.readouterr().err
    assert code == 3
    assert elapsed < 15, f"took {elapsed:.1f} s"
    assert f"http://alice:***@127.0.0.1:{port}" in err and "unreachable" in err
    assert "s3cret-pw" not in err
    assert not (tmp_path / "out").exists()


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


# ------------------------------------------------------------------------------- --refine-foreground, fp16


def test_refine_foreground_cutout_recovers_a_known_foreground() -> None:
    """A warm object over a cool background with a soft edge: the refined cut-out loses the background's tint."""
    from tests.inference.test_foreground import composite

    image, foreground, _, alpha = composite()
    image8, mask = np.rint(image * 255).astype(np.uint8), np.rint(alpha * 255).astype(np.uint8)
    plain, refined = make_cutout(image8, mask), make_cutout(image8, mask, refine_foreground=True)
    assert refined.dtype == np.uint8 and refined.shape == (*mask.shape, 4)
    np.testing.assert_array_equal(refined[..., 3], mask)
    soft = (mask > 12) & (mask < 243)
    plain_error = np.abs(plain[..., :3] / 255 - foreground)[soft].mean()
    refined_error = np.abs(refined[..., :3] / 255 - foreground)[soft].mean()
    assert refined_error < 0.4 * plain_error
    opaque = mask == 255
    assert np.abs(refined[..., :3][opaque].astype(int) - image8[opaque]).max() <= 1  # alpha 1 keeps the pixel


def test_cli_refine_foreground_writes_estimated_colours(tiny_model_file: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from birefnet.inference.foreground import estimate_foreground

    image = _rgb(33, 47, 9)
    Image.fromarray(image).save(tmp_path / "a.png")
    common = [str(tmp_path / "a.png"), "--model", str(tiny_model_file), "--size", *map(str, TEST_SIZE),
              "--device", "cpu", "--no-progress", "-q"]
    assert main([*common, "--out", str(tmp_path / "out"), "--refine-foreground"]) == 0
    mask = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    cutout = np.asarray(Image.open(tmp_path / "out" / "a_cutout.png"))
    np.testing.assert_array_equal(cutout[..., 3], mask)
    np.testing.assert_array_equal(cutout[..., :3], estimate_foreground(image, mask))
    assert (cutout[..., :3] != image).any()  # the tiny model's soft mask changes colours
    # refining needs cut-outs: a usage error (exit 2), nothing written
    with pytest.raises(SystemExit) as exc:
        main([*common, "--out", str(tmp_path / "none"), "--refine-foreground", "--no-cutout"])
    assert exc.value.code == 2 and "--no-cutout" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_fp16_is_refused_off_cuda_with_exit_2(tiny_model_file: Path, tiny_model: BiRefNet, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """fp16 autocast is CUDA-only: on the CPU predict refuses it (no silent fallback to another precision)."""
    Image.fromarray(_rgb(20, 30)).save(tmp_path / "a.png")
    args = [str(tmp_path / "a.png"), "--model", str(tiny_model_file), "--out", str(tmp_path / "out"),
            "--size", *map(str, TEST_SIZE), "--device", "cpu", "--precision", "fp16", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "fp16 needs a CUDA device" in err and "fp32 or bf16" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        predict_images(tiny_model, [_rgb(20, 30)], TEST_SIZE, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        predict_images(tiny_model, [_rgb(20, 30)], TEST_SIZE, device="cpu", precision="fp8")


@pytest.mark.gpu
def test_fp16_on_cuda_matches_fp32(tiny_model_file: Path, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.fail("the gpu lane needs a CUDA device (torch.cuda.is_available() is False)")
    from birefnet.inference.predict import inference_autocast
    from birefnet.models.io import load_model

    model = load_model(tiny_model_file, device="cuda")
    images = [_rgb(50, 70, 1), _rgb(90, 30, 2)]
    with torch.inference_mode(), inference_autocast(torch.device("cuda"), "fp16"):
        logits = model(torch.zeros(1, 3, TEST_SIZE[1], TEST_SIZE[0], device="cuda")).logits
    assert logits.dtype == torch.float16  # the forward really ran under fp16 autocast
    half = predict_images(model, images, TEST_SIZE, device="cuda", precision="fp16")
    full = predict_images(model, images, TEST_SIZE, device="cuda", precision="fp32")
    for a, b, image in zip(half, full, images, strict=True):
        assert a.shape == image.shape[:2]
        difference = np.abs(a.astype(int) - b.astype(int))
        assert difference.mean() < 1.0 and difference.max() <= 8, (difference.mean(), difference.max())
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    assert main([str(tmp_path / "a.png"), "--model", str(tiny_model_file), "--out", str(tmp_path / "out"),
                 "--size", *map(str, TEST_SIZE), "--device", "cuda", "--precision", "fp16", "--refine-foreground",
                 "--no-progress", "-q"]) == 0
    assert (tmp_path / "out" / "a_cutout.png").is_file()
