"""Content digests shared by the stages and the registry: one file's sha256 and the training data's digest."""

from __future__ import annotations

import hashlib
from pathlib import Path

#: The shard splits whose indexes identify the training data (the test split only scores the model).
TRAINING_SPLITS = ("train", "val")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def training_data_digest(shard_root: str | Path) -> str | None:
    """Hex SHA-256 over the bytes of the train and val shard indexes (``<shard_root>/<split>/index.json``).

    An index that does not exist is skipped; with neither, there is nothing to digest.

    Returns:
        The digest (the train stage's ``birefnet.data_digest`` tag), or None when no index exists.
    """
    h = hashlib.sha256()
    found = False
    for split in TRAINING_SPLITS:
        data = read_optional_bytes(f"{str(shard_root).rstrip('/')}/{split}/index.json" if "://" in str(shard_root)
                                   else Path(shard_root) / split / "index.json")
        if data is not None:
            h.update(data)
            found = True
    return h.hexdigest() if found else None


def read_optional_bytes(location: str | Path) -> bytes | None:
    """A small file's bytes, local or at a URL (``s3://...``, through fsspec); None when it does not exist."""
    if "://" not in str(location):
        path = Path(location)
        return path.read_bytes() if path.is_file() else None
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(location))
    return fs.cat_file(path) if fs.exists(path) else None
