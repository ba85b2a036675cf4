"""Serving encoded images: base64 PNG/JPEG strings in, base64 PNG masks out, raw pixels as before; the pixel guard
on base64 input; and the same bodies through MLflow's own scoring code on the logged model (no HTTP server)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from birefnet.inference.serving import BiRefNetPyfunc, ImageTooLargeError
from tests.data.bomb_images import png_declaring


def _pyfunc(weights: Path, **config: object) -> BiRefNetPyfunc:
    model = BiRefNetPyfunc()
    model.load_context(SimpleNamespace(artifacts={"weights": str(weights)},
                                       model_config={"size": [64, 64], "batch_size": 2, **config}))
    return model


def _encoded(image: np.ndarray, fmt: str) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _mask_from_png(text: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(text))) as image:
        assert image.format == "PNG" and image.mode == "L", (image.format, image.mode)
        return np.asarray(image)


def _images() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return (rng.integers(0, 256, (45, 61, 3), dtype=np.uint8), rng.integers(0, 256, (30, 52, 3), dtype=np.uint8))


def test_base64_png_and_jpeg_answer_with_png_masks_equal_to_the_pixel_path(tiny_model_file: Path) -> None:
    model = _pyfunc(tiny_model_file)
    png_image, jpeg_image = _images()
    answer = model.predict(None, [_encoded(png_image, "PNG"), _encoded(jpeg_image, "JPEG")])
    assert isinstance(answer, list) and all(isinstance(item, str) for item in answer)
    png_mask, jpeg_mask = (_mask_from_png(item) for item in answer)
    # PNG is lossless: the decoded request is the same pixels, so the mask equals the raw-pixel answer exactly
    np.testing.assert_array_equal(png_mask, model.predict(None, png_image))
    assert jpeg_mask.shape == (30, 52) and jpeg_mask.dtype == np.uint8 and jpeg_mask.max() > jpeg_mask.min()
    # one string -> one string; a data URL and line-wrapped base64 (the `base64` tool's default) decode alike
    text = _encoded(png_image, "PNG")
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    for form in (text, f"data:image/png;base64,{text}", wrapped, np.array(text)):
        single = model.predict(None, form)
        assert isinstance(single, str)
        np.testing.assert_array_equal(_mask_from_png(single), png_mask)


def test_mask_format_param_and_json_integer_pixels(tiny_model_file: Path) -> None:
    model = _pyfunc(tiny_model_file)
    image, _ = _images()
    expected = model.predict(None, image)
    as_arrays = model.predict(None, [_encoded(image, "PNG")], params={"mask_format": "array"})
    np.testing.assert_array_equal(as_arrays[0], expected)
    as_png = model.predict(None, image[None], params={"mask_format": "png"})
    np.testing.assert_array_equal(_mask_from_png(as_png[0]), expected)
    with pytest.raises(ValueError, match=r"params.mask_format: expected one of \['auto', 'png', 'array'\], got 'jpg'"):
        model.predict(None, image, params={"mask_format": "jpg"})
    # JSON pixels arrive as int64: accepted when they are 0..255, refused (naming the range) otherwise
    np.testing.assert_array_equal(model.predict(None, image[None].astype(np.int64))[0], expected)
    bad = image.astype(np.int64)
    bad[0, 0, 0] = 256
    with pytest.raises(ValueError, match=r"image 0: expected uint8 pixels 0\.\.255, got int64 values \d+\.\.256"):
        model.predict(None, bad)
    with pytest.raises(ValueError, match="uint8"):  # floats are not silently rounded
        model.predict(None, image.astype(np.float32))


def test_base64_inputs_keep_the_pixel_guard_and_name_bad_strings(tiny_model_file: Path) -> None:
    model = _pyfunc(tiny_model_file, max_image_pixels=5000)
    small = np.zeros((40, 50, 3), np.uint8)  # 2000 pixels
    large = np.zeros((80, 70, 3), np.uint8)  # 5600 pixels
    assert _mask_from_png(model.predict(None, _encoded(small, "PNG"))).shape == (40, 50)
    with pytest.raises(ImageTooLargeError, match=r"image 1: image header declares 70x80 = 5600 pixels, more than "
                                                 r"serving\.max_image_pixels = 5000"):
        model.predict(None, [_encoded(small, "PNG"), _encoded(large, "JPEG")])
    # an 80-byte PNG declaring 268M pixels: refused from its header, never decoded
    bomb = base64.b64encode(png_declaring(16384, 16384)).decode("ascii")
    with pytest.raises(ImageTooLargeError, match=r"image 0: image header declares 16384x16384 = 268435456 pixels"):
        model.predict(None, [bomb])
    with pytest.raises(ValueError, match=r"image 1: a string input must be a base64-encoded image .* not valid "
                                         r"base64"):
        model.predict(None, [_encoded(small, "PNG"), "not base64!"])
    with pytest.raises(ValueError, match="image 0: not a recognised image format"):
        model.predict(None, base64.b64encode(b"plain text, not an image").decode("ascii"))


def test_http_bodies_through_mlflow_scoring_code(tiny_model_file: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The logged model (no input schema, a ``mask_format`` param) answers every documented body shape through
    ``mlflow.pyfunc.scoring_server.invocations``, the function ``mlflow models serve`` runs per request."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import invocations

    from birefnet.registry.pyfunc import log_pyfunc_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        mlflow.set_experiment("serving-bodies")
        with mlflow.start_run():
            info = log_pyfunc_model(tiny_model_file, (64, 64), max_image_pixels=1_000_000)
        assert info.signature.inputs is None and info.signature.params.to_dict()[0]["name"] == "mask_format"
        served = mlflow.pyfunc.load_model(info.model_uri)
    finally:
        mlflow.set_tracking_uri(None)

    def post(body: dict) -> object:
        response = invocations(json.dumps(body), "application/json", served, None)
        assert response.status == 200, response.response[-2000:]
        return json.loads(response.response)["predictions"]

    png_image, jpeg_image = _images()
    expected = BiRefNetPyfunc.predict(_pyfunc(tiny_model_file), None, png_image)
    pixels = np.asarray(post({"inputs": png_image[None].tolist()}))
    np.testing.assert_array_equal(pixels[0], expected)  # raw pixels: as before
    strings = post({"inputs": [_encoded(png_image, "PNG"), _encoded(jpeg_image, "JPEG")]})
    np.testing.assert_array_equal(_mask_from_png(strings[0]), expected)
    assert _mask_from_png(strings[1]).shape == (30, 52)
    tf_b64 = post({"inputs": {"b64": _encoded(png_image, "PNG")}})  # TF serving's binary form
    np.testing.assert_array_equal(_mask_from_png(tf_b64), expected)
    frame = post({"dataframe_split": {"columns": ["image"], "data": [[_encoded(png_image, "PNG")]]}})
    np.testing.assert_array_equal(_mask_from_png(frame[0]), expected)
    arrays = post({"inputs": [_encoded(png_image, "PNG")], "params": {"mask_format": "array"}})
    np.testing.assert_array_equal(np.asarray(arrays[0]), expected)
    with pytest.raises(MlflowException) as refused:  # the server answers 400 with this error and its trace
        invocations(json.dumps({"inputs": ["not base64!"]}), "application/json", served, None)
    assert refused.value.get_http_status_code() == 400 and "not valid base64" in refused.value.serialize_as_json()
