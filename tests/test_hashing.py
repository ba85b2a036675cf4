"""Content digests: a file's sha256, and the training-data digest the train and register runs both record."""

from __future__ import annotations

import hashlib
from pathlib import Path

from birefnet.hashing import sha256_file, training_data_digest


def test_sha256_file_reads_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 1000 + b"y")
    assert sha256_file(path, chunk=7) == hashlib.sha256(b"x" * 1000 + b"y").hexdigest()


def test_training_data_digest_covers_train_and_val_only(tmp_path: Path) -> None:
    assert training_data_digest(tmp_path) is None
    for split, text in (("train", b"T"), ("val", b"V"), ("test", b"X")):
        (tmp_path / split).mkdir()
        (tmp_path / split / "index.json").write_bytes(text)
    assert training_data_digest(tmp_path) == hashlib.sha256(b"TV").hexdigest()
    (tmp_path / "val" / "index.json").unlink()
    assert training_data_digest(tmp_path) == hashlib.sha256(b"T").hexdigest()
