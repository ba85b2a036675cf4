"""The ``shard`` stage on a tiny fixture dataset: round trip, index, determinism, atomicity."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds

from birefnet.data.io import load_mask
from birefnet.data.shards import TMP_SUFFIX, SplitIndex
from birefnet.stages.shard import main

try:
    from tests.data.wds_fixtures import tree_bytes, write_params, write_prepared
except ImportError:  # tests/ is not a package: pytest put this folder on sys.path
    from wds_fixtures import tree_bytes, write_params, write_prepared

REPO = Path(__file__).resolve().parents[2]
COUNTS = {"DIS-TR": 11, "DIS-VD": 3, "DIS-TE1": 5}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("shardstage")
    return root, write_prepared(root, COUNTS)


def _shard(root: Path, paths: dict[str, Path], name: str, **shard: object) -> Path:
    out = root / name
    params = write_params(root, paths, out, shard={"max_samples": 4, **shard})
    assert main(["--params", str(params), "--quiet"]) == 0
    return out


def test_round_trip_and_index(dataset: tuple[Path, dict[str, Path]]) -> None:
    root, paths = dataset
    out = _shard(root, paths, "shards")
    manifest = [json.loads(line) for line in (paths["prepared"] / "manifest.jsonl").read_text().splitlines()]
    by_key = {(e["set"], e["key"]): e for e in manifest}
    seen = set()
    for split, sets in (("train", ["DIS-TR"]), ("val", ["DIS-VD"]), ("test", ["DIS-TE1"])):
        index = SplitIndex.read(out / split)
        assert list(index.sets) == sets
        assert index.samples == sum(COUNTS[s] for s in sets)
        assert index.original_mask == (split == "test") and index.gradient and index.size == [64, 64]
        counts = [s["samples"] for s in index.sets[sets[0]]["shards"]]
        assert all(c <= 4 for c in counts) and sum(counts) == COUNTS[sets[0]]
        for info in index.sets[sets[0]]["shards"]:
            data = (out / split / info["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == info["sha256"] and len(data) == info["bytes"]
        urls = [p for p, _ in index.shard_paths(out / split)]
        for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
            meta = json.loads(sample["json"])
            entry = by_key[(meta["set"], meta["key"])]
            seen.add((meta["set"], meta["key"]))
            assert "." not in sample["__key__"] and sample["__key__"] == f"{meta['set']}-{meta['index']:06d}"
            assert (meta["width"], meta["height"]) == (entry["width"], entry["height"])
            assert meta["class_id"] == entry["class_id"] and meta["image_sha256"] == entry["image_sha256"]
            original = load_mask(entry["mask"])
            expected = cv2.resize(original, (64, 64), interpolation=cv2.INTER_LINEAR)
            np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(sample["mask.png"], np.uint8), 0), expected)
            grad_file = paths["gradients"] / meta["set"] / f"{meta['key']}.png"
            assert sample["gradient.png"] == grad_file.read_bytes()
            image = cv2.imdecode(np.frombuffer(sample["image.jpg"], np.uint8), cv2.IMREAD_COLOR)
            assert image.shape == (64, 64, 3)
            if split == "test":
                kept = cv2.imdecode(np.frombuffer(sample["mask_original.png"], np.uint8), cv2.IMREAD_GRAYSCALE)
                np.testing.assert_array_equal(kept, original)
            else:
                assert "mask_original.png" not in sample
    assert seen == set(by_key)


def test_reshard_is_byte_identical(dataset: tuple[Path, dict[str, Path]]) -> None:
    root, paths = dataset
    first = tree_bytes(_shard(root, paths, "again1"))
    second = tree_bytes(_shard(root, paths, "again2"))
    assert first == second and any(name.endswith(".tar") for name in first)
    again = tree_bytes(_shard(root, paths, "again1"))  # rerun in place: same bytes, nothing stale left
    assert again == first


def test_missing_gradient_is_named(tmp_path: Path) -> None:
    paths = write_prepared(tmp_path, {"DIS-TR": 2})
    victim = next((paths["gradients"] / "DIS-TR").iterdir())
    victim.unlink()
    params = write_params(tmp_path, paths, tmp_path / "shards", workers=1)
    assert main(["--params", str(params), "--quiet"]) == 3
    assert not (tmp_path / "shards" / "train" / "index.json").exists()
    assert not list((tmp_path / "shards" / "train").glob("*.tar"))


def test_interrupted_write_then_rerun(tmp_path: Path) -> None:
    """SIGKILL the writer while a shard is open: no index, no visible partial shard; a rerun equals a clean run."""
    paths = write_prepared(tmp_path, {"DIS-TR": 24}, orig=(900, 700))
    clean = tree_bytes(_shard(tmp_path, paths, "clean", image_format="png", png_compression=9))
    out = tmp_path / "killed"
    params = write_params(tmp_path, paths, out, workers=1,
                          shard={"max_samples": 4, "image_format": "png", "png_compression": 9})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "birefnet.stages.shard", "--params", str(params), "--quiet"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    caught = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            folder = out / "train"
            if folder.is_dir() and any(p.name.endswith(TMP_SUFFIX) and p.name.endswith(".tar" + TMP_SUFFIX)
                                       for p in folder.iterdir()):
                os.killpg(proc.pid, signal.SIGKILL)
                caught = True
                break
            time.sleep(0.001)
    finally:
        if proc.poll() is None and not caught:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert caught, "the writer finished before a shard was seen open; make the fixture larger"
    left = tree_bytes(out)
    assert "train/index.json" not in left
    for name, data in left.items():  # whatever has a shard name is a complete, final shard
        if not Path(name).name.startswith("."):
            assert clean[name] == data
    with pytest.raises(FileNotFoundError, match="no shard index"):
        SplitIndex.read(out / "train")
    assert main(["--params", str(params), "--quiet"]) == 0
    assert tree_bytes(out) == clean


def _reencode(path: Path, quality: int) -> None:
    """Rewrite a JPEG with other bytes (still a valid image of the same size)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok and data.tobytes() != path.read_bytes()
    path.write_bytes(data.tobytes())


def test_original_changed_after_ingest_is_refused_naming_file_and_hashes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_prepared(tmp_path, {"DIS-TR": 3}, gradients=False)
    entry = json.loads((paths["prepared"] / "manifest.jsonl").read_text(encoding="utf-8").splitlines()[1])
    _reencode(Path(entry["image"]), 60)
    actual = hashlib.sha256(Path(entry["image"]).read_bytes()).hexdigest()
    params = write_params(tmp_path, paths, tmp_path / "shards", workers=1, gradients_mode="on_the_fly")
    assert main(["--params", str(params), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert entry["image"] in err and entry["image_sha256"] in err and actual in err and "sha256 mismatch" in err
    assert not (tmp_path / "shards" / "train" / "index.json").exists()


def test_gradient_label_truncated_after_its_header_is_refused(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_prepared(tmp_path, {"DIS-TR": 2})
    victim = sorted((paths["gradients"] / "DIS-TR").iterdir())[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # IHDR intact: 64x64, 16-bit gray
    params = write_params(tmp_path, paths, tmp_path / "shards", workers=1)
    assert main(["--params", str(params), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert str(victim) in err and "truncated or corrupt" in err


def test_gradient_label_changed_after_gradients_stage_is_refused(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from birefnet.stages import gradients

    paths = write_prepared(tmp_path, {"DIS-TR": 3}, gradients=False)
    params = write_params(tmp_path, paths, tmp_path / "shards", workers=1)
    assert gradients.main(["--params", str(params), "-q"]) == 0
    index = json.loads((paths["gradients"] / "index.json").read_text(encoding="utf-8"))
    labels = sorted((paths["gradients"] / "DIS-TR").iterdir())
    assert len(index["files"]) == 3 and all(len(r["sha256"]) == 64 for r in index["files"].values())
    assert main(["--params", str(params), "--quiet"]) == 0
    labels[0].write_bytes(labels[1].read_bytes())  # a valid label of the right size, but another image's
    assert main(["--params", str(params), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert str(labels[0]) in err and "sha256 mismatch" in err


def test_gradients_stage_refuses_an_original_changed_after_ingest(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from birefnet.stages import gradients

    paths = write_prepared(tmp_path, {"DIS-TR": 2}, gradients=False)
    entry = json.loads((paths["prepared"] / "manifest.jsonl").read_text(encoding="utf-8").splitlines()[0])
    _reencode(Path(entry["image"]), 55)
    params = write_params(tmp_path, paths, tmp_path / "shards", workers=1)
    assert gradients.main(["--params", str(params), "-q"]) == 3
    err = capsys.readouterr().err
    assert entry["image"] in err and "sha256 mismatch" in err and not paths["gradients"].exists()
