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
  (decompression-bomb guard). The header is parsed with Pillow's format plugins directly, so this limit
  replaces Pillow's for these reads (it may be above ``Image.MAX_IMAGE_PIXELS``) without reading or
  assigning that process-wide global: concurrent readers leave Pillow's own guard as it was. A few formats
  (TIFF tiles, GIF frames) re-check Pillow's global while decoding; above twice its value they are refused.
* ``expected_sha256`` reads the file once, checks its hash, and decodes those same bytes.
"""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageFile, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 200_000_000


class ImageReadError(ValueError):
    """A file could not be read as an image; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self) -> tuple[type[ImageReadError], tuple[str, str]]:
        # the default rebuilds from ``args`` (the one formatted message): keep both fields across processes
        return type(self), (self.path, self.reason)


class PixelLimitError(ImageReadError):
    """The header declares more pixels than the limit; raised before any pixel is decoded."""


def _identify(fp: IO[bytes], filename: str) -> ImageFile.ImageFile:
    """Parse an image header with Pillow's format plugins, as ``Image.open`` does, minus its bomb check.

    ``Image.open`` checks the declared size against the process-wide ``Image.MAX_IMAGE_PIXELS`` and raises
    above twice that value. Calling the plugin factories directly reads the same header (so the size agrees
    with what Pillow decodes) without reading or changing that global, so concurrent readers cannot leave
    Pillow's own guard off for the whole process; the caller applies its own limit to the returned size.

    Raises:
        Image.UnidentifiedImageError: no plugin accepts the data.
        OSError: a plugin accepted the data but its header is unreadable.
    """
    Image.preinit()  # the common formats first (BMP, GIF, JPEG, PPM, PNG), as Image.open tries them
    Image.init()  # then every other plugin; both return at once after the first call
    prefix = fp.read(16)
    for name in list(Image.ID):  # a copy: another thread's init() may append while this one iterates
        factory, accept = Image.OPEN[name]
        try:  # accept() may parse the prefix too: an empty or short file must not escape as struct.error
            if accept is not None:
                verdict = accept(prefix)
                if not verdict or isinstance(verdict, str):  # a string is a "maybe, but unsupported" note
                    continue
            fp.seek(0)
            return factory(fp, filename)
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # not this format after all (Image.open tries the next plugin too)
    raise Image.UnidentifiedImageError(f"cannot identify image file {filename!r}")


def _header_size(fp: IO[bytes], path: Path) -> tuple[ImageFile.ImageFile, int, int]:
    try:
        img = _identify(fp, str(path))
    except Image.UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format (cannot identify image file)") from None
    except Image.DecompressionBombError as exc:
        # a few plugins (GIF, ICO, ICNS, MPO) check Pillow's process-wide limit themselves while opening
        raise ImageReadError(path, f"Pillow refused the declared size under its process-wide "
                                   f"Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} ({exc})") from None
    except (OSError, ValueError) as exc:
        raise ImageReadError(path, f"cannot open image: {exc}") from None
    width, height = img.size
    return img, width, height


def _check_pixels(path: Path, width: int, height: int, max_pixels: int, key: str) -> None:
    if width * height > max_pixels:
        raise PixelLimitError(
            path, f"image header declares {width}x{height} = {width * height} pixels, more than {key} = "
                  f"{max_pixels} (decompression-bomb guard)")


def read_header_size(path: str | Path, max_pixels: int | None = None, *,
                     limit_name: str = "data.max_image_pixels") -> tuple[int, int]:
    """Declared ``(width, height)`` of an image file from its header only (no pixel is decoded).

    Args:
        path: the image file.
        max_pixels: when given, refuse a declared size above it.
        limit_name: the parameter named in the error when ``max_pixels`` is exceeded.

    Raises:
        ImageReadError: missing, not an image, unreadable header, or over ``max_pixels``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            img, width, height = _header_size(fh, path)
            img.close()
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot read file: {exc}") from None
    if max_pixels is not None:
        _check_pixels(path, width, height, max_pixels, limit_name)
    return width, height


def header_size_of_bytes(data: bytes, max_pixels: int | None = None, *, name: str = "<bytes>",
                         limit_name: str = "max_image_pixels") -> tuple[int, int]:
    """Declared ``(width, height)`` of encoded image bytes (PNG, JPEG, ...) from the header only.

    Args:
        data: the encoded file content.
        max_pixels: when given, refuse a declared size above it.
        name: what the error messages call the data.
        limit_name: the parameter named in the error when ``max_pixels`` is exceeded.

    Raises:
        ImageReadError: not an image, unreadable header, or over ``max_pixels``.
    """
    img, width, height = _header_size(io.BytesIO(data), Path(name))
    img.close()
    if max_pixels is not None:
        _check_pixels(Path(name), width, height, max_pixels, limit_name)
    return width, height


def _decode(fp: IO[bytes], path: Path, max_pixels: int, limit_name: str = "data.max_image_pixels") -> Image.Image:
    """Decode from ``fp`` (kept open by the caller until this returns) after checking the declared size."""
    img, width, height = _header_size(fp, path)
    try:
        _check_pixels(path, width, height, max_pixels, limit_name)
    except ImageReadError:
        img.close()
        raise
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        # A few plugins (TIFF tiles, GIF frames) re-check Pillow's process-wide limit while decoding.
        raise ImageReadError(
            path, f"Pillow refused to decode {width}x{height} pixels under its process-wide "
                  f"Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"cannot decode image data ({exc})") from None
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001 - a broken EXIF block is a bad input, reported by name
        raise ImageReadError(path, f"invalid EXIF orientation data ({exc})") from None


def _open(path: str | Path, max_pixels: int, expected_sha256: str | None = None) -> Image.Image:
    """Decode ``path`` after checking its declared size (and its sha256 when ``expected_sha256`` is given)."""
    path = Path(path)
    try:
        if expected_sha256 is None:
            with open(path, "rb") as fh:
                return _decode(fh, path, max_pixels)
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot read file: {exc}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256.strip().lower():
        raise ImageReadError(path, f"sha256 mismatch: expected {expected_sha256}, actual {actual} "
                                   "(the file changed after its hash was recorded)")
    return _decode(io.BytesIO(data), path, max_pixels)


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


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, *,
               expected_sha256: str | None = None) -> np.ndarray:
    """Read an image file as RGB.

    Args:
        path: the image file.
        max_pixels: refuse a header that declares more pixels (checked before decoding).
        expected_sha256: when given, the file is read once into memory, its SHA-256 compared with this hex
            digest, and the image decoded from those same bytes (so what is decoded is what was hashed).

    Returns:
        (H, W, 3) uint8 array, RGB order, EXIF orientation applied.

    Raises:
        ImageReadError: unreadable, truncated, not an image, over ``max_pixels``, or (with
            ``expected_sha256``) content whose hash differs; the message names the file.
    """
    return _to_rgb(_open(path, max_pixels, expected_sha256))


def load_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, name: str = "<bytes>",
                     limit_name: str = "data.max_image_pixels") -> np.ndarray:
    """Decode an encoded image (PNG, JPEG, ...) held in memory as RGB, with :func:`load_image`'s conversions.

    Args:
        data: the encoded file content.
        max_pixels: refuse a header that declares more pixels (checked before decoding).
        name: what error messages call the data (a file name, "request image 3", ...).
        limit_name: the parameter named when ``max_pixels`` is exceeded.

    Returns:
        (H, W, 3) uint8 array, RGB order, EXIF orientation applied.

    Raises:
        ImageReadError: not an image, truncated, or over ``max_pixels``; the message names ``name``.
    """
    return _to_rgb(_decode(io.BytesIO(data), Path(name), max_pixels, limit_name))


def _to_rgb(img: Image.Image) -> np.ndarray:
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


def load_mask(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, *,
              expected_sha256: str | None = None) -> np.ndarray:
    """Read a ground-truth mask as 8-bit gray.

    Args:
        path: the mask file.
        max_pixels: refuse a header that declares more pixels (checked before decoding).
        expected_sha256: when given, the file is read once into memory, its SHA-256 compared with this hex
            digest, and the mask decoded from those same bytes.

    Returns:
        (H, W) uint8 array (0 background .. 255 foreground), EXIF orientation applied.

    Raises:
        ImageReadError: unreadable, truncated, not an image, over ``max_pixels``, or (with
            ``expected_sha256``) content whose hash differs; the message names the file.
    """
    img = _open(path, max_pixels, expected_sha256)
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
