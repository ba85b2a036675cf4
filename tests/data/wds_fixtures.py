"""Fixture builders for the shard/loader tests: a tiny prepared dataset (originals, manifest, gradient labels)
and a params file pointing at it, all under a temporary folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import yaml

from birefnet.data.gradients import encode_gradient, gradient_label

# Keys as ingest may produce them: spaces, dots, '#', unicode.
WEIRD_KEYS = ["1#Accessories#1#Bag#a b.c", "2#Animal#3#Cat#ümlaut ☃", "plain", "dots.in.the.name", "x#y"]


def blocky_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB of large random blocks plus a disc (low frequency, so interpolation only matters at
    edges)."""
    cells = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    image = cv2.resize(cells, (width, height), interpolation=cv2.INTER_NEAREST)
    cv2.circle(image, (width // 2, height // 2), min(width, height) // 4, (250, 30, 120), -1)
    return image


def write_prepared(root: Path, counts: dict[str, int], size: tuple[int, int] = (64, 64),
                   orig: tuple[int, int] = (96, 80), seed: int = 0, gradients: bool = True) -> dict[str, Path]:
    """Write originals (JPEG images, PNG masks), ``manifest.jsonl`` and gradient labels.

    Args:
        root: folder to write under.
        counts: set name -> samples (sets named DIS-TR / DIS-VD / DIS-TE* fall into the default splits).
        size: training size (width, height) of the gradient labels.
        orig: original (width, height) of the first sample; later samples vary by a few pixels.
        seed: random seed.
        gradients: write ``gradients/<set>/<key>.png``.

    Returns:
        Paths: ``raw``, ``prepared``, ``gradients``.
    """
    rng = np.random.default_rng(seed)
    raw, prepared, grads = root / "raw", root / "prepared", root / "gradients"
    prepared.mkdir(parents=True, exist_ok=True)
    lines = []
    splits = {"DIS-TR": "train", "DIS-VD": "val"}
    for set_name, n in counts.items():
        (raw / set_name / "im").mkdir(parents=True, exist_ok=True)
        (raw / set_name / "gt").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            key = f"{WEIRD_KEYS[i % len(WEIRD_KEYS)]}-{i}" if i % 2 == 0 else f"s{i:03d}"
            w, h = orig[0] + 4 * (i % 3), orig[1] + 2 * (i % 2)
            image = blocky_image(rng, w, h)
            mask = np.where(image[..., 0] > 128, 255, 0).astype(np.uint8)
            image_path, mask_path = raw / set_name / "im" / f"{key}.jpg", raw / set_name / "gt" / f"{key}.png"
            bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
            ok1, enc_image = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 92])
            ok2, enc_mask = cv2.imencode(".png", mask)
            assert ok1 and ok2
            image_path.write_bytes(enc_image.tobytes())
            mask_path.write_bytes(enc_mask.tobytes())
            class_name = key.split("#")[3] if key.count("#") >= 3 else None
            lines.append({
                "set": set_name, "split": splits.get(set_name, "test"), "key": key,
                "image": str(image_path), "mask": str(mask_path), "width": w, "height": h,
                "class_name": class_name, "class_id": 7 if class_name else -1,
                "image_sha256": hashlib.sha256(image_path.read_bytes()).hexdigest(),
                "mask_sha256": hashlib.sha256(mask_path.read_bytes()).hexdigest(),
            })
            if gradients:
                from birefnet.data.io import load_image

                resized = cv2.resize(load_image(image_path), size, interpolation=cv2.INTER_LINEAR)
                (grads / set_name).mkdir(parents=True, exist_ok=True)
                ok, enc = cv2.imencode(".png", encode_gradient(gradient_label(resized)))
                assert ok
                (grads / set_name / f"{key}.png").write_bytes(enc.tobytes())
    with open(prepared / "manifest.jsonl", "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    (prepared / "classes.json").write_text(json.dumps(["Bag", "Cat"]), encoding="utf-8")
    return {"raw": raw, "prepared": prepared, "gradients": grads}


def write_params(root: Path, paths: dict[str, Path], out: Path, size: tuple[int, int] = (64, 64),
                 workers: int = 2, shard: dict | None = None, loader: dict | None = None,
                 test_sets: list[str] | None = None, gradients_mode: str = "precomputed") -> Path:
    """Write a params.yaml for the fixture dataset and return its path."""
    doc = {
        "data": {"root": str(paths["raw"]), "prepared": str(paths["prepared"]), "size": list(size),
                 "workers": workers, "train_sets": ["DIS-TR"], "val_sets": ["DIS-VD"],
                 "test_sets": test_sets if test_sets is not None else ["DIS-TE1"]},
        "gradients": {"mode": gradients_mode, "out": str(paths["gradients"])},
        "shard": {"out": str(out), **(shard or {})},
        "loader": loader or {},
    }
    path = root / f"params-{out.name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``folder`` (hidden files included)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
