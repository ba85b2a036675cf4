"""Reading dataset images and masks the same way in every stage.

Ingest validates with these functions and every later stage decodes originals with them, so a file that
passed ingest is read identically by the gradient and shard stages.

Conversions (what a user feeding arbitrary files should expect):

* EXIF orientation is applied (``ImageOps.exif_transpose``) to images and masks alike.
* Images: gray and 1-bit are replicated to RGB; palette images are expanded to RGB; RGBA / LA drop the
  alpha channel (as upstream's ``cv2.imread(..., IMREAD_COLOR)`` does: the colour values are kept, not
  composited); 16-bit images are scaled to 8 bits (``v >> 8``); CMYK/YCbCr are converted to RGB.
* Masks: 8-bit gray is used as is; 1-bit becomes 0/255; 16-bit gray is scaled to 8 bits with rounding
  (``round(v / 257)``); RGB masks become luma (ITU-R 601, as OpenCV's grayscale read); RGBA / LA masks use
  the alpha channel when it is not fully opaque (a cut-out), else the luma; palette masks are expanded first.
* Declared sizes larger than ``max_pixels`` are rejected from the header, before decoding
  (decompression-bomb guard).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 200_000_000


class ImageReadError(ValueError):
    """A file could not be read as an image; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _open(path: str | Path, max_pixels: int) -> Image.Image:
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # The header is read lazily: size is known before any pixel is decoded.
            old = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                img = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = old
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format (cannot identify image file)") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot open image: {exc}") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageReadError(
            path, f"image header declares {w}x{h} = {w * h} pixels, more than data.max_image_pixels = {max_pixels} "
                  "(decompression-bomb guard)")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"cannot decode image data ({exc})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001 - a broken EXIF block is a bad input, reported by name
        raise ImageReadError(path, f"invalid EXIF orientation data ({exc})") from None
    return img


def _to_uint8(arr: np.ndarray, round_scale: bool) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype in (np.uint16, np.int32, np.int16) or np.issubdtype(arr.dtype, np.integer):
        a = arr.astype(np.int64).clip(0, 65535)
        if round_scale:
            return np.rint(a / 257.0).astype(np.uint8)
        return (a >> 8).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        a = np.nan_to_num(arr.astype(np.float64))
        scale = 255.0 if a.max(initial=0.0) <= 1.0 else 1.0
        return np.rint(a * scale).clip(0, 255).astype(np.uint8)
    raise TypeError(f"unsupported pixel type {arr.dtype}")


def _luma(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float64)
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    return np.rint(y).clip(0, 255).astype(np.uint8)


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as RGB.

    Returns:
        (H, W, 3) uint8 array, RGB order, EXIF orientation applied.

    Raises:
        ImageReadError: unreadable, truncated, not an image, or over ``max_pixels``.
    """
    img = _open(path, max_pixels)
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = _to_uint8(np.asarray(img), round_scale=False)
        return np.repeat(arr[..., None], 3, axis=2)
    if mode in ("1", "L"):
        arr = _to_uint8(np.asarray(img), round_scale=False)
        return np.repeat(arr[..., None], 3, axis=2)
    if mode == "LA":
        arr = np.asarray(img)[..., 0]
        return np.repeat(arr[..., None], 3, axis=2).astype(np.uint8)
    if mode in ("RGBA", "RGBa"):
        return np.ascontiguousarray(np.asarray(img)[..., :3])
    if mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        arr = _to_uint8(arr, round_scale=False)
    return np.ascontiguousarray(arr)


def load_mask(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a ground-truth mask as 8-bit gray.

    Returns:
        (H, W) uint8 array (0 background .. 255 foreground), EXIF orientation applied.

    Raises:
        ImageReadError: unreadable, truncated, not an image, or over ``max_pixels``.
    """
    img = _open(path, max_pixels)
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode == "1":
        return np.asarray(img).astype(np.uint8) * 255
    if mode in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
        return np.ascontiguousarray(_to_uint8(np.asarray(img), round_scale=True))
    if mode in ("LA", "RGBA"):
        arr = np.asarray(img)
        alpha = arr[..., -1]
        if alpha.min() < 255:
            return np.ascontiguousarray(alpha.astype(np.uint8))
        color = arr[..., 0] if mode == "LA" else _luma(arr[..., :3])
        return np.ascontiguousarray(color.astype(np.uint8))
    if mode != "RGB":
        img = img.convert("RGB")
    return _luma(np.asarray(img))


def image_size(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) after EXIF orientation, decoding the whole file (so truncation is detected)."""
    arr = load_mask(path, max_pixels)
    return arr.shape[1], arr.shape[0]
