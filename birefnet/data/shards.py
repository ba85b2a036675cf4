"""WebDataset shard writer: deterministic, atomic tar shards plus a per-split ``index.json``.

Sample layout inside a tar (``<key>.<ext>`` members, in this order):

* ``<key>.image.jpg`` (or ``.image.png`` / ``.image.webp``): RGB image, resized to the training size when
  ``shard.resize`` is on.
* ``<key>.mask.png``: 8-bit gray mask at the image's size.
* ``<key>.gradient.png``: 16-bit gradient label at the training size (``gradients.mode: precomputed`` only),
  the gradients stage's file copied byte for byte.
* ``<key>.mask_original.png``: the mask at the original resolution (splits listed in ``shard.original_masks``),
  so metrics can be computed at original size from the shards alone.
* ``<key>.json``: set, original key, index, class name and id, original width/height, source paths and sha256.

``<key>`` is ``<set>-<index:06d>`` with the set name reduced to ``[A-Za-z0-9_-]``: WebDataset splits a member
name at its first dot, so the original file stem (which may hold dots, spaces, ``#`` or any unicode) lives in
the json only.

Members are written by ``webdataset.TarWriter`` (members of a sample in sorted extension order).

Determinism: members carry fixed metadata (mtime 0, mode 0444, uid/gid 0, no user names, USTAR format) and
samples are written in a fixed order, so equal inputs and params give byte-identical shards. Atomicity: a shard
is written to a hidden ``.<name>.tmp`` file, flushed and fsynced, then renamed; ``index.json`` (written the same
way) is the only entry point for readers and is removed before a split is rewritten.

Object storage: a split location may be an fsspec URL (``s3://bucket/prefix/train``; credentials and endpoint
from the usual AWS variables or config). A shard is then streamed to its final key as a multipart upload that is
committed only when the shard is complete (an S3 object appears whole or not at all), so no temporary name is
needed; ``index.json`` is one PUT. Nothing is staged on local disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import tarfile
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

INDEX_NAME = "index.json"
INDEX_VERSION = 1
TMP_SUFFIX = ".tmp"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def is_url(location: str | Path) -> bool:
    """Whether a shard location is an fsspec URL (``s3://bucket/prefix``) rather than a local path."""
    return "://" in str(location)


def join_location(base: str | Path, *names: str) -> str | Path:
    """``base / name / ...``: a Path for a local base, a ``/``-joined URL for a URL base."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *names])
    return Path(base).joinpath(*names)


def url_filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a URL (``s3://bucket/key`` -> s3fs, ``bucket/key``)."""
    import fsspec

    return fsspec.core.url_to_fs(url)


def open_for_read(location: str | Path, block_size: int = 8 << 20) -> Any:
    """A binary file object streaming ``location``: a local file, or an fsspec file reading ahead ``block_size``
    bytes per ranged request (the object is never copied to local disk)."""
    if not is_url(location):
        return open(location, "rb")  # noqa: SIM115 - the caller closes it
    fs, path = url_filesystem(str(location))
    return fs.open(path, "rb", block_size=block_size, cache_type="readahead")


def read_location_text(location: str | Path) -> str:
    """A whole (small) text file, local or at a URL.

    Raises:
        FileNotFoundError: it does not exist.
    """
    if not is_url(location):
        return Path(location).read_text(encoding="utf-8")
    fs, path = url_filesystem(str(location))
    return fs.cat_file(path).decode("utf-8")


def remove_location(location: str | Path) -> None:
    """Delete a file or object if it exists."""
    if not is_url(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = url_filesystem(str(location))
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(path)


def safe_name(name: str) -> str:
    """A name usable in a WebDataset key and a file name: runs of characters outside ``[A-Za-z0-9_-]`` -> ``_``."""
    out = _UNSAFE.sub("_", name).strip("_")
    return out or "set"


def sample_key(set_name: str, index: int) -> str:
    """The WebDataset ``__key__`` of sample ``index`` of a set (no dots, no slashes)."""
    return f"{safe_name(set_name)}-{index:06d}"


def shard_name(set_name: str, number: int) -> str:
    """File name of shard ``number`` of a set: ``<set>-%06d.tar``."""
    return f"{safe_name(set_name)}-{number:06d}.tar"


def encode_image(image: np.ndarray, image_format: str, quality: int, png_compression: int) -> bytes:
    """Encode an RGB image.

    Args:
        image: (H, W, 3) uint8 RGB.
        image_format: ``jpg``, ``png`` or ``webp``.
        quality: jpg/webp quality 1..100.
        png_compression: zlib level 0..9 for png.

    Returns:
        The encoded bytes (deterministic for equal inputs).
    """
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if image_format == "jpg":
        flags = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif image_format == "webp":
        flags = [cv2.IMWRITE_WEBP_QUALITY, quality]
    elif image_format == "png":
        flags = [cv2.IMWRITE_PNG_COMPRESSION, png_compression]
    else:
        raise ValueError(f"image_format must be jpg, png or webp, got {image_format!r}")
    ok, buf = cv2.imencode("." + image_format, bgr, flags)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.shape} image as {image_format}")
    return buf.tobytes()


def encode_png(array: np.ndarray, compression: int) -> bytes:
    """Encode an (H, W) uint8 or uint16 array as a gray PNG."""
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise ValueError(f"OpenCV could not encode a {array.shape} {array.dtype} array as PNG")
    return buf.tobytes()


def png_header(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk, without decoding.

    Raises:
        ValueError: not a PNG.
    """
    if len(data) < 26 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    width, height = struct.unpack(">II", data[16:24])
    return width, height, data[24], data[25]


def member_bytes(size: int) -> int:
    """Bytes a member of ``size`` bytes takes in a tar: a 512-byte header plus padded data."""
    return 512 + (size + 511) // 512 * 512


def tar_size(member_total: int) -> int:
    """Size of a tar file whose members take ``member_total`` bytes: end blocks, padded to 10240-byte records."""
    return (member_total + 1024 + tarfile.RECORDSIZE - 1) // tarfile.RECORDSIZE * tarfile.RECORDSIZE


@dataclass
class ShardInfo:
    """One finished shard: file name (relative to the split folder), sample count, bytes, sha256."""

    file: str
    samples: int
    bytes: int
    sha256: str


class AtomicShardWriter:
    """Writes a stream of samples of one set into numbered tar shards, each published only when complete.

    A sample is a mapping ``{"__key__": str, ext: bytes, ...}``; ``webdataset.TarWriter`` writes its members in
    sorted extension order. A new shard starts when adding the sample would exceed ``max_samples`` or
    ``max_bytes`` (a sample larger than ``max_bytes`` gets a shard of its own). Local shards are renamed into
    place after an fsync; shards at a URL are multipart uploads committed on completion (aborted otherwise).

    Args:
        folder: the split folder (or URL) shards go to.
        set_name: names the shards ``<set>-%06d.tar``.
        max_samples: samples per shard at most.
        max_bytes: tar bytes per shard at most (headers and end-of-archive blocks included).
    """

    def __init__(self, folder: str | Path, set_name: str, max_samples: int, max_bytes: int) -> None:
        self.remote = is_url(folder)
        self.folder: str | Path = str(folder).rstrip("/") if self.remote else Path(folder)
        self.set_name = set_name
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.shards: list[ShardInfo] = []
        self._tar: Any = None
        self._file: Any = None
        self._sink: _HashingWriter | None = None
        self._tmp: Path | None = None
        self._count = 0
        self._bytes = 0

    def __enter__(self) -> AtomicShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open(self) -> None:
        import webdataset as wds

        name = shard_name(self.set_name, len(self.shards))
        if self.remote:
            fs, path = url_filesystem(f"{self.folder}/{name}")
            # autocommit off: close() uploads the last part, commit() publishes the object, discard() aborts
            self._file = fs.open(path, "wb", autocommit=False)
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._tmp = self.folder / f".{name}{TMP_SUFFIX}"
            self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in _finish/abort
        self._sink = _HashingWriter(self._file, hashlib.sha256())
        # encoder=False: members are bytes already; fixed mtime and empty user/group names for determinism
        self._tar = wds.TarWriter(self._sink, user="", group="", mode=0o444, encoder=False, mtime=0)
        # TarWriter accepts a format but does not pass it to tarfile (PAX by default): keep the USTAR headers
        self._tar.tarstream.format = tarfile.USTAR_FORMAT
        self._count = 0
        self._bytes = 0

    def write(self, sample: dict[str, Any]) -> None:
        """Append one sample; ``sample["__key__"]`` is the key, every other entry ``ext: bytes``."""
        key = sample["__key__"]
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        size = sum(member_bytes(len(data)) for ext, data in sample.items() if ext != "__key__")
        full = self._count >= self.max_samples or tar_size(self._bytes + size) > self.max_bytes
        if self._tar is not None and full:
            self._finish()
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._count += 1
        self._bytes += size

    def _finish(self) -> None:
        assert self._tar is not None and self._file is not None and self._sink is not None
        self._tar.close()
        name = shard_name(self.set_name, len(self.shards))
        if self.remote:
            self._file.close()
            self._file.commit()
        else:
            assert self._tmp is not None
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self.folder / name)
        self.shards.append(ShardInfo(name, self._count, self._sink.size, self._sink.digest.hexdigest()))
        self._tar = self._file = self._tmp = self._sink = None

    def close(self) -> list[ShardInfo]:
        """Finish the open shard (if any) and return every shard written."""
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temporary file is removed, its upload aborted); finished shards
        stay."""
        if self._sink is not None:
            self._sink.raw = None  # the half-written tar's buffered tail, flushed when it is collected, goes nowhere
        if self._file is not None and self.remote:
            self._file.discard()
            self._file.closed = True  # discarded: closing would try to upload
        elif self._file is not None:
            self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._tar = self._file = self._tmp = self._sink = None


class _HashingWriter:
    """A write-only file wrapper that counts and hashes every byte (tarfile's stream mode only calls ``write``)."""

    def __init__(self, raw: Any, digest: Any) -> None:
        self.raw = raw
        self.digest = digest
        self.size = 0

    def write(self, data: bytes) -> int:
        if self.raw is None:  # aborted
            return len(data)
        self.digest.update(data)
        self.size += len(data)
        self.raw.write(data)
        return len(data)


@dataclass
class SplitIndex:
    """``index.json`` of one split: what a reader needs to stream it.

    Attributes:
        split: ``train``, ``val`` or ``test``.
        size: (width, height) every image/mask has, or None when not resized at shard time.
        image_ext: member extension of the image (``image.jpg`` ...).
        gradient: whether samples carry ``gradient.png``.
        original_mask: whether samples carry ``mask_original.png``.
        sets: set name -> {"samples": n, "shards": [ShardInfo as dict, ...]}.
    """

    split: str
    size: list[int] | None
    image_ext: str
    gradient: bool
    original_mask: bool
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    version: int = INDEX_VERSION

    @property
    def samples(self) -> int:
        """Samples over all sets."""
        return sum(s["samples"] for s in self.sets.values())

    def shard_paths(self, folder: str | Path, sets: Iterable[str] | None = None) -> list[tuple[str, int]]:
        """(path or URL, samples) of each shard of the given sets (all sets when None), in index order."""
        names = list(self.sets) if sets is None else list(sets)
        missing = [n for n in names if n not in self.sets]
        if missing:
            raise KeyError(f"set(s) {missing} not in {join_location(folder, INDEX_NAME)} (has {list(self.sets)})")
        return [(str(join_location(folder, s["file"])), s["samples"]) for n in names for s in self.sets[n]["shards"]]

    def shard_digests(self, folder: str | Path) -> dict[str, str]:
        """Path or URL of every shard -> the sha256 recorded when it was written."""
        return {str(join_location(folder, s["file"])): s["sha256"] for v in self.sets.values() for s in v["shards"]}

    def to_json(self) -> str:
        """Deterministic JSON text (sorted keys, no timestamps)."""
        doc = asdict(self)
        doc["samples"] = self.samples
        return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def read(cls, folder: str | Path) -> SplitIndex:
        """Load ``<folder>/index.json`` (a local folder or a URL such as ``s3://bucket/shards/train``).

        Raises:
            FileNotFoundError: no index (the split was never sharded, or a shard run did not finish).
        """
        path = join_location(folder, INDEX_NAME)
        try:
            text = read_location_text(path)
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(f"{path}: no shard index (run `birefnet shard`; an interrupted run leaves "
                                    "none)") from None
        doc = json.loads(text)
        if doc.get("version") != INDEX_VERSION:
            raise ValueError(f"{path}: index version {doc.get('version')} is not {INDEX_VERSION}; reshard")
        doc.pop("samples", None)
        return cls(**doc)


def write_atomic(path: str | Path, text: str) -> None:
    """Write a text file under a temporary name, fsync, then rename into place (at a URL: one PUT, which
    replaces the object atomically)."""
    if is_url(path):
        fs, key = url_filesystem(str(path))
        fs.pipe_file(key, text.encode("utf-8"))
        fs.invalidate_cache(key)
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def clean_split_folder(folder: str | Path, keep: Iterable[str] = ()) -> list[str]:
    """Remove leftover temporary files and shards not in ``keep`` from a split folder (or URL prefix); return
    removed names."""
    keep = set(keep)
    removed: list[str] = []
    if is_url(folder):
        fs, prefix = url_filesystem(str(folder).rstrip("/"))
        fs.invalidate_cache(prefix)
        names = sorted(posixpath_name(p) for p in fs.find(prefix, maxdepth=1))
        stale = [n for n in names if n.endswith(".tar") and n not in keep]
        if stale:
            fs.rm([f"{prefix}/{n}" for n in stale])
            fs.invalidate_cache(prefix)
        return stale
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        stale_tmp = entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX)
        stale_tar = entry.suffix == ".tar" and entry.name not in keep
        if entry.is_file() and (stale_tmp or stale_tar):
            entry.unlink()
            removed.append(entry.name)
    return removed


def posixpath_name(key: str) -> str:
    """Last component of an object key (``bucket/a/b.tar`` -> ``b.tar``)."""
    return urllib.parse.unquote(key.rstrip("/").rsplit("/", 1)[-1])


def iter_tar_members(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of a tar (local or at a URL) in order; a test and debugging helper."""
    with open_for_read(path) as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        for info in tar:
            if info.isreg():
                fh = tar.extractfile(info)
                assert fh is not None
                yield info.name, fh.read()


# ------------------------------------------------------------------------------------- sample encoding


class SampleError(ValueError):
    """A manifest entry could not be packed; the message names the set, key and file."""


@dataclass(frozen=True)
class EncodeOptions:
    """How samples are encoded.

    Attributes:
        size: (width, height) to resize images and masks to, or None to keep the original size.
        image_format: ``jpg``, ``png`` or ``webp``.
        quality: jpg/webp quality.
        png_compression: zlib level for PNG members.
        gradient_size: (width, height) the gradient labels must have (the training size).
        max_pixels: decompression-bomb guard passed to the image readers.
    """

    size: tuple[int, int] | None
    image_format: str = "jpg"
    quality: int = 95
    png_compression: int = 3
    gradient_size: tuple[int, int] | None = None
    max_pixels: int = 200_000_000


@dataclass(frozen=True)
class SampleTask:
    """One manifest entry to pack: the entry, its index in its set, the gradient file (and the sha256 the
    gradients stage recorded for it, when known) and whether to keep the full-resolution mask."""

    entry: dict[str, Any]
    index: int
    gradient_path: str | None
    original_mask: bool
    gradient_sha256: str | None = None


def read_gradient_label(path: str | Path, size: tuple[int, int] | None, *, expected_sha256: str | None = None,
                        where: str = "") -> bytes:
    """Read a precomputed gradient label, check it completely, and return its bytes (packed as they are).

    The file is read once; its sha256 is compared with ``expected_sha256`` (the gradients stage's record) when
    given, and the bytes are decoded in full, so a truncated or corrupt PNG with an intact header is refused.

    Args:
        path: the ``<gradients.out>/<set>/<key>.png`` file.
        size: the (width, height) it must have (the training size), or None.
        expected_sha256: the hex digest the gradients stage recorded for it, or None.
        where: prefix of error messages (the sample).

    Returns:
        The PNG bytes.

    Raises:
        SampleError: unreadable, hash mismatch, not a 16-bit gray PNG, truncated/corrupt, or of the wrong size.
    """
    prefix = f"{where}: " if where else ""
    try:
        data = Path(path).read_bytes()
        width, height, depth, colour = png_header(data)
    except (OSError, ValueError) as exc:
        raise SampleError(f"{prefix}gradient label {path}: {exc} (run `birefnet gradients`)") from None
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise SampleError(f"{prefix}gradient label {path}: sha256 mismatch: expected {expected_sha256} "
                              f"(gradients index), actual {actual}; the file changed after `birefnet gradients` "
                              "wrote it: rerun it")
    if depth != 16 or colour != 0:
        raise SampleError(f"{prefix}gradient label {path} must be a 16-bit gray PNG, got bit depth {depth}, colour "
                          f"type {colour}")
    if size is not None and (width, height) != tuple(size):
        raise SampleError(f"{prefix}gradient label {path} is {width}x{height}, expected the training size "
                          f"{size[0]}x{size[1]} (data.size); rerun `birefnet gradients`")
    decoded = _decode_png_fully(data)
    if decoded is None or decoded.dtype != np.uint16 or decoded.shape != (height, width):
        got = "nothing" if decoded is None else f"{decoded.dtype} {decoded.shape}"
        raise SampleError(f"{prefix}gradient label {path} does not decode to its declared {width}x{height} 16-bit "
                          f"image (got {got}): truncated or corrupt; rerun `birefnet gradients`")
    return data


def _decode_png_fully(data: bytes) -> np.ndarray | None:
    """Decode every row of a PNG with Pillow, which raises on truncated or corrupt data (OpenCV may not)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            array = np.asarray(img)
    except (OSError, SyntaxError, ValueError):
        return None
    return array.astype(np.uint16) if array.dtype in (np.int32, np.uint16) else array


def encode_sample(task: SampleTask, options: EncodeOptions) -> dict[str, Any]:
    """Read, resize and encode one manifest entry into WebDataset members.

    Args:
        task: the entry (manifest fields ``set, key, image, mask, width, height, class_name, class_id,
            image_sha256, mask_sha256``), its index and gradient path.
        options: encoding options.

    Returns:
        ``{"__key__": key, "image.<fmt>": bytes, "mask.png": bytes, ["gradient.png": bytes,]
        ["mask_original.png": bytes,] "json": bytes}`` in that member order.

    Raises:
        SampleError: an unreadable original or gradient file, an original whose sha256 is not the manifest's,
            or a gradient label that does not decode fully, has the wrong size or depth, or not the recorded hash.
    """
    from birefnet.data.io import ImageReadError, load_image, load_mask

    entry = task.entry
    where = f"set {entry['set']!r}, key {entry['key']!r}"
    hashes = {field: entry.get(field) for field in ("image_sha256", "mask_sha256")}
    absent = [field for field, value in hashes.items() if not isinstance(value, str) or not value]
    if absent:
        raise SampleError(f"{where}: the manifest entry has no {' / '.join(absent)}, so the originals cannot be "
                          "checked against what ingest validated; rerun `birefnet ingest`")
    try:
        # each file is hashed while it is read and decoded from those same bytes: an original that changed after
        # ingest fails here, naming the file and both hashes, instead of being packed under the old hash
        image = load_image(entry["image"], options.max_pixels, expected_sha256=hashes["image_sha256"])
        mask = load_mask(entry["mask"], options.max_pixels, expected_sha256=hashes["mask_sha256"])
    except ImageReadError as exc:
        raise SampleError(f"{where}: {exc} (rerun `birefnet ingest` if the change is intended)") from None
    if image.shape[:2] != mask.shape[:2]:
        raise SampleError(f"{where}: image {entry['image']} is {image.shape[1]}x{image.shape[0]} but mask "
                          f"{entry['mask']} is {mask.shape[1]}x{mask.shape[0]}")
    height, width = mask.shape[:2]
    original_mask_png = encode_png(mask, options.png_compression) if task.original_mask else None
    if options.size is not None and (width, height) != tuple(options.size):
        image = cv2.resize(image, tuple(options.size), interpolation=cv2.INTER_LINEAR)
        mask = cv2.resize(mask, tuple(options.size), interpolation=cv2.INTER_LINEAR)
    key = sample_key(entry["set"], task.index)
    sample: dict[str, Any] = {"__key__": key}
    sample[f"image.{options.image_format}"] = encode_image(image, options.image_format, options.quality,
                                                           options.png_compression)
    sample["mask.png"] = encode_png(mask, options.png_compression)
    if task.gradient_path is not None:
        sample["gradient.png"] = read_gradient_label(task.gradient_path, options.gradient_size,
                                                     expected_sha256=task.gradient_sha256, where=where)
    if original_mask_png is not None:
        sample["mask_original.png"] = original_mask_png
    meta = {
        "set": entry["set"],
        "split": entry.get("split"),
        "key": entry["key"],
        "index": task.index,
        "class_name": entry.get("class_name"),
        "class_id": int(entry.get("class_id", -1) if entry.get("class_id") is not None else -1),
        "width": width,
        "height": height,
        "image": str(entry["image"]),
        "mask": str(entry["mask"]),
        "image_sha256": entry.get("image_sha256"),
        "mask_sha256": entry.get("mask_sha256"),
        "gradient": task.gradient_path,
    }
    sample["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return sample
