"""Ingest on a corpus of bad and unusual inputs: every file ends up accepted or listed with its reason."""

from __future__ import annotations

import json
import struct
import subprocess
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from birefnet.config import load_params
from birefnet.data.io import load_image, load_mask
from birefnet.stages.common import StageInputError
from birefnet.stages.ingest import ingest

RNG = np.random.default_rng(0)


def _image(h: int = 40, w: int = 56) -> np.ndarray:
    return RNG.integers(0, 255, size=(h, w, 3), dtype=np.uint8)


def _mask(h: int = 40, w: int = 56) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
    return m


def _png_with_header(path: Path, width: int, height: int) -> None:
    """A PNG whose IHDR declares width x height (a decompression bomb by its header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                     + chunk(b"IEND", b""))


def build_bad_corpus(root: Path) -> None:
    tr = root / "DIS-TR"
    (tr / "im").mkdir(parents=True)
    (tr / "gt").mkdir(parents=True)
    im, gt = tr / "im", tr / "gt"
    # good pairs
    Image.fromarray(_image()).save(im / "1#Group#1#Bag#good.jpg", quality=95)
    Image.fromarray(_mask()).save(gt / "1#Group#1#Bag#good.png")
    # unicode name with spaces (accepted)
    Image.fromarray(_image()).save(im / "café été 1.jpg")
    Image.fromarray(_mask()).save(gt / "café été 1.png")
    # corrupt JPEG: valid header, garbage body
    good = (im / "1#Group#1#Bag#good.jpg").read_bytes()
    (im / "corrupt.jpg").write_bytes(good[:200] + b"\x00\xff" * 50)
    Image.fromarray(_mask()).save(gt / "corrupt.png")
    # truncated PNG mask
    Image.fromarray(_image()).save(im / "truncated.png")
    Image.fromarray(RNG.integers(0, 255, (40, 56), dtype=np.uint8)).save(gt / "truncated.png")
    full = (gt / "truncated.png").read_bytes()
    (gt / "truncated.png").write_bytes(full[: len(full) // 2])
    # size mismatch
    Image.fromarray(_image(40, 56)).save(im / "mismatch.jpg")
    Image.fromarray(_mask(40, 50)).save(gt / "mismatch.png")
    # missing mask (orphan image) and orphan mask
    Image.fromarray(_image()).save(im / "lonely_image.jpg")
    Image.fromarray(_mask()).save(gt / "lonely_mask.png")
    # RGBA image (accepted: alpha dropped)
    rgba = np.dstack([_image(), np.full((40, 56), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(im / "rgba.png")
    Image.fromarray(_mask()).save(gt / "rgba.png")
    # 16-bit mask (accepted: scaled to 8 bits)
    Image.fromarray(_image()).save(im / "mask16.jpg")
    cv2.imwrite(str(gt / "mask16.png"), _mask().astype(np.uint16) * 257)
    # oversized header
    Image.fromarray(_image()).save(im / "bomb.jpg")
    _png_with_header(gt / "bomb.png", 60000, 60000)
    # a text file with an image extension
    Image.fromarray(_image()).save(im / "notimage.jpg")
    (gt / "notimage.png").write_text("this is not a PNG", encoding="utf-8")
    # EXIF-rotated image (accepted; orientation 6 = rotate 90 CW, so 40x56 stored becomes 56 wide x 40 tall shown)
    stored = Image.fromarray(_image(56, 40))
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(im / "exif.jpg", exif=exif.tobytes())
    Image.fromarray(_mask(40, 56)).save(gt / "exif.png")
    # a file with an unsupported extension, and a hidden file (ignored but listed)
    (im / "notes.txt").write_text("hello", encoding="utf-8")
    (im / ".DS_Store").write_bytes(b"\x00")
    # validation set: one good pair
    vd = root / "DIS-VD"
    (vd / "im").mkdir(parents=True)
    (vd / "gt").mkdir(parents=True)
    Image.fromarray(_image()).save(vd / "im" / "v.jpg")
    Image.fromarray(_mask()).save(vd / "gt" / "v.png")
    # an extra set nobody listed
    (root / "EXTRA" / "im").mkdir(parents=True)
    (root / "EXTRA" / "gt").mkdir(parents=True)


EXPECTED_REJECTED = {
    "corrupt.jpg": "cannot decode image data",
    "truncated.png": "cannot decode image data",
    "mismatch.png": "mask size 50x40 differs from image size 56x40",
    "lonely_image.jpg": "orphan image: no mask with stem 'lonely_image'",
    "lonely_mask.png": "orphan mask: no image with stem 'lonely_mask'",
    "bomb.png": "image header declares 60000x60000 = 3600000000 pixels, more than data.max_image_pixels",
    "notimage.png": "not a recognised image format",
    "notes.txt": "unsupported file extension '.txt'",
}
EXPECTED_ACCEPTED = {"1#Group#1#Bag#good", "café été 1", "rgba", "mask16", "exif", "v"}


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "raw"
    build_bad_corpus(root)
    return root


def _params(tmp_path: Path, root: Path, mode: str):
    return load_params(_write_params(tmp_path),
                       [f"data.root={root}", f"data.prepared={tmp_path / 'prepared'}", f"data.on_bad_sample={mode}",
                        "data.train_sets=[DIS-TR]", "data.val_sets=[DIS-VD]", "data.test_sets=[]", "data.workers=1"])


def _write_params(tmp_path: Path) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text("{}\n", encoding="utf-8")
    return p


def test_quarantine_lists_every_bad_file_with_its_reason(tmp_path: Path, corpus: Path) -> None:
    result = ingest(_params(tmp_path, corpus, "quarantine"), progress=False)
    assert {r["key"] for r in result.records} == EXPECTED_ACCEPTED
    report = json.loads((tmp_path / "prepared" / "quarantine.json").read_text(encoding="utf-8"))
    assert report["rejected"] == len(EXPECTED_REJECTED) == len(report["entries"])
    assert report["accepted"] == len(EXPECTED_ACCEPTED)
    by_name = {Path(e["file"]).name: e for e in report["entries"]}
    assert set(by_name) == set(EXPECTED_REJECTED)
    for name, fragment in EXPECTED_REJECTED.items():
        assert fragment in by_name[name]["reason"], (name, by_name[name]["reason"])
        assert by_name[name]["set"] == "DIS-TR"
    assert report["ignored_sets"] == ["EXTRA"]
    assert any(f.endswith(".DS_Store") for f in report["ignored_files"])
    assert report["per_set"]["DIS-TR"] == {"accepted": 5, "rejected": 8}
    manifest = [json.loads(x) for x in (tmp_path / "prepared" / "manifest.jsonl").read_text("utf-8").splitlines()]
    assert len(manifest) == len(EXPECTED_ACCEPTED)
    rec = {r["key"]: r for r in manifest}
    assert rec["exif"]["width"] == 56 and rec["exif"]["height"] == 40
    assert rec["1#Group#1#Bag#good"]["class_name"] == "Bag" and rec["1#Group#1#Bag#good"]["class_id"] == 0
    assert rec["v"]["split"] == "val" and rec["v"]["class_id"] == -1
    assert len(rec["rgba"]["image_sha256"]) == 64


def test_fail_mode_names_the_file_and_problem_and_writes_nothing(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(StageInputError) as info:
        ingest(_params(tmp_path, corpus, "fail"), progress=False)
    msg = str(info.value)
    assert "8 bad sample(s)" in msg
    for name, fragment in EXPECTED_REJECTED.items():
        assert name in msg and fragment in msg
    assert not (tmp_path / "prepared" / "manifest.jsonl").exists()


def test_fail_mode_cli_exit_code(tmp_path: Path, corpus: Path, venv_bin: Path) -> None:
    p = _write_params(tmp_path)
    proc = subprocess.run(
        [str(venv_bin / "birefnet"), "ingest", "-q", "--params", str(p), "--set", f"data.root={corpus}",
         "--set", f"data.prepared={tmp_path / 'prep'}", "--set", "data.on_bad_sample=fail",
         "--set", "data.test_sets=[]"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert "truncated.png" in proc.stderr and "orphan mask" in proc.stderr


def test_conversions(corpus: Path) -> None:
    tr = corpus / "DIS-TR"
    rgba = load_image(tr / "im" / "rgba.png")
    assert rgba.shape == (40, 56, 3) and rgba.dtype == np.uint8
    m16 = load_mask(tr / "gt" / "mask16.png")
    assert m16.dtype == np.uint8 and set(np.unique(m16)) == {0, 255}
    exif = load_image(tr / "im" / "exif.jpg")
    assert exif.shape == (40, 56, 3)
    # RGBA cut-out mask: alpha is the mask
    cut = np.zeros((8, 8, 4), np.uint8)
    cut[..., 3] = 0
    cut[2:6, 2:6, 3] = 200
    Image.fromarray(cut, "RGBA").save(corpus / "cut.png")
    m = load_mask(corpus / "cut.png")
    assert m[3, 3] == 200 and m[0, 0] == 0
    # gray image replicated to RGB; palette mask expanded
    Image.fromarray(np.full((5, 7), 77, np.uint8)).save(corpus / "gray.png")
    assert load_image(corpus / "gray.png").shape == (5, 7, 3)
    Image.fromarray(_mask(8, 8)).convert("P").save(corpus / "pal.png")
    assert load_mask(corpus / "pal.png").max() == 255


def test_generic_im_gt_layout(tmp_path: Path) -> None:
    root = tmp_path / "my_data"
    (root / "im").mkdir(parents=True)
    (root / "gt").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(_image()).save(root / "im" / f"img {i}.JPG")
        Image.fromarray(_mask()).save(root / "gt" / f"img {i}.png")
    params = load_params(_write_params(tmp_path), [f"data.root={root}", f"data.prepared={tmp_path / 'p'}",
                                                   "data.train_sets=[my_data]", "data.val_sets=[]",
                                                   "data.test_sets=[]", "data.workers=1",
                                                   "register.selection_sets=[]"])
    result = ingest(params, progress=False)
    assert sorted(r["key"] for r in result.records) == ["img 0", "img 1", "img 2"]
    assert all(r["set"] == "my_data" and r["split"] == "train" for r in result.records)


def test_listed_set_missing_is_a_clear_error(tmp_path: Path, corpus: Path) -> None:
    params = load_params(_write_params(tmp_path), [f"data.root={corpus}", "data.test_sets=[DIS-TE9]"])
    with pytest.raises(StageInputError, match=r"\['DIS-TE9'\].*not found under"):
        ingest(params, progress=False)
