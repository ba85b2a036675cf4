from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np

from birefnet.config import SyntheticParams
from birefnet.data.synthetic import MIN_STROKE, _background, _distinct_color, _random_color, generate_sample, level_of
from birefnet.stages.synthesize import synthesize

COUNTS = {"DIS-TR": 6, "DIS-VD": 2, "DIS-TE1": 3, "DIS-TE2": 3, "DIS-TE3": 3, "DIS-TE4": 3}


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_byte_identical_reruns_and_dis5k_layout(tmp_path: Path) -> None:
    cfg = SyntheticParams(out=tmp_path / "a", counts=COUNTS, min_side=96, max_side=160)
    synthesize(cfg, workers=2, progress=False)
    synthesize(cfg.model_copy(update={"out": tmp_path / "b"}), workers=1, progress=False)
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a == b
    assert len(a) == 2 * sum(COUNTS.values())
    for set_name, n in COUNTS.items():
        ims = sorted((tmp_path / "a" / set_name / "im").glob("*.jpg"))
        gts = sorted((tmp_path / "a" / set_name / "gt").glob("*.png"))
        assert len(ims) == n and [p.stem for p in ims] == [p.stem for p in gts]
        for p in ims:
            fields = p.stem.split("#")
            assert len(fields) == 5 and fields[3]  # DIS5K naming: class is the 4th field
    other = SyntheticParams(out=tmp_path / "c", counts={"DIS-TR": 6}, min_side=96, max_side=160, seed=1)
    synthesize(other, workers=1, progress=False)
    assert _digest(tmp_path / "c") != {k: v for k, v in a.items() if k.startswith("DIS-TR")}


def test_images_non_square_varied_and_masks_soft_nonempty() -> None:
    sizes = set()
    for i in range(12):
        s = generate_sample(0, 0, i, "DIS-TR", 128, 256)
        assert s.image.shape[:2] == s.mask.shape
        assert s.image.dtype == np.uint8 and s.image.shape[2] == 3
        assert 128 <= s.mask.shape[0] <= 256 and 128 <= s.mask.shape[1] <= 256
        assert s.mask.max() == 255
        sizes.add(s.mask.shape)
    assert len(sizes) > 6
    assert any(h != w for h, w in sizes)
    soft = generate_sample(0, 0, 0, "DIS-TR", 128, 256).mask
    assert ((soft > 0) & (soft < 255)).any()  # anti-aliased edges, as DIS5K ground truth


def test_test_sets_increase_in_structural_complexity() -> None:
    assert [level_of(f"DIS-TE{k}", 0) for k in range(1, 5)] == [1, 2, 3, 4]
    means = []
    for k in range(1, 5):
        contours = [len(cv2.findContours((generate_sample(0, 1 + k, i, f"DIS-TE{k}", 256, 320).mask > 127)
                                         .astype(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_NONE)[0])
                    for i in range(20)]
        means.append(float(np.mean(contours)))
    assert means[0] < means[1] < means[2] < means[3], means


def test_foreground_strokes_survive_a_min_stroke_erosion() -> None:
    # Every structure is at least MIN_STROKE px wide: eroding the binary mask with a MIN_STROKE x MIN_STROKE
    # kernel keeps a part of (nearly) every connected component; 1 px lines would vanish.
    kernel = np.ones((MIN_STROKE, MIN_STROKE), np.uint8)
    kept = total = 0
    for i in range(20):
        binary = (generate_sample(0, 0, i, "DIS-TR", 256, 384).mask > 127).astype(np.uint8)
        n, labels = cv2.connectedComponents(binary)
        eroded = cv2.erode(binary, kernel)
        for c in range(1, n):
            total += 1
            kept += bool(eroded[labels == c].any())
    assert total > 20 and kept / total > 0.9, (kept, total)


def test_background_clutter_is_defocused() -> None:
    # The clutter has the object's colours and thin shapes but not its sharpness: the background's strongest
    # second derivatives stay far below what one sharp anti-aliased line of the same contrast gives
    # (measured: 99.9th percentile |Laplacian| 5-24 with the defocus, 65-272 without).
    for i in range(12):
        rng = np.random.default_rng(i)
        fg = _random_color(rng)
        background = _background(rng, 300, 300, fg, 4)
        lap = np.abs(cv2.Laplacian(cv2.cvtColor(background, cv2.COLOR_RGB2GRAY).astype(np.float32), cv2.CV_32F))
        assert np.percentile(lap, 99.9) < 40, (i, float(np.percentile(lap, 99.9)))


def test_background_colours_keep_their_distance_from_the_foreground() -> None:
    rng = np.random.default_rng(3)
    fg = np.array([120.0, 80.0, 200.0])
    distances = [float(np.linalg.norm(_distinct_color(rng, fg) - fg)) for _ in range(200)]
    assert min(distances) >= 90.0, min(distances)
