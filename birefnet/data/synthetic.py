"""A DIS-like synthetic dataset: thin, intricate foregrounds over cluttered, similar-coloured backgrounds.

The embedded default dataset exists so that ``dvc repro`` runs end to end on a fresh clone with no
download. It mimics what makes DIS5K hard (BiRefNet paper, Sec. 1 and 4.1): thin structures (wires,
meshes, lattices, branching trees, text strokes, spoked wheels, chains), objects with holes, distractors of
the foreground's colour in the background, varied non-square sizes, and test sets of increasing structural
complexity (DIS-TE1 simplest .. DIS-TE4 most complex). File names encode the class the way DIS5K does
(``<group id>#<Group>#<class id>#<Class>#<n>``; the class is the fourth ``#`` field).

Everything is drawn with OpenCV from a seeded NumPy generator, so the same parameters give byte-identical
files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

# (group, class) pairs; the primitive drawn for each class is in CLASS_PRIMITIVES.
CLASSES: tuple[tuple[str, str], ...] = (
    ("Electrical", "PowerLine"),
    ("Electrical", "Cable"),
    ("Building", "Fence"),
    ("Building", "Scaffold"),
    ("Nature", "Tree"),
    ("Nature", "Branch"),
    ("Sign", "Lettering"),
    ("Vehicle", "Wheel"),
    ("Accessories", "Necklace"),
    ("Furniture", "Frame"),
)
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(g for g, _ in CLASSES))


@dataclass(frozen=True)
class SyntheticSample:
    """One generated sample: (H, W, 3) uint8 RGB image, (H, W) uint8 mask, and its DIS5K-style name."""

    image: np.ndarray
    mask: np.ndarray
    name: str
    class_name: str
    level: int


def level_of(set_name: str, index: int) -> int:
    """Structural complexity 1..4: fixed per test set (TE1..TE4), cycling in the other sets."""
    if set_name.startswith("DIS-TE") and set_name[-1].isdigit():
        return min(max(int(set_name[-1]), 1), 4)
    return index % 4 + 1


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(30, 226, size=3).astype(np.float64)


def _distinct_color(rng: np.random.Generator, avoid: np.ndarray, min_distance: float = 90.0) -> np.ndarray:
    """A random colour at least ``min_distance`` (RGB Euclidean) from ``avoid`` (a few tries, then the farthest).

    Background colours keep this distance from the foreground's so that the object is visible at all; the
    similar-coloured distractors drawn on top are what makes it hard.
    """
    best, best_d = avoid, -1.0
    for _ in range(8):
        c = _random_color(rng)
        d = float(np.linalg.norm(c - avoid))
        if d >= min_distance:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _jitter(color: np.ndarray, rng: np.random.Generator, amount: float) -> tuple[int, int, int]:
    c = np.clip(color + rng.normal(0, amount, size=3), 0, 255)
    return int(c[0]), int(c[1]), int(c[2])


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    small = rng.random((cells, max(2, int(cells * w / max(h, 1)))), dtype=np.float64).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _background(rng: np.random.Generator, h: int, w: int, fg_color: np.ndarray, level: int) -> np.ndarray:
    base = _distinct_color(rng, fg_color)
    other = _distinct_color(rng, fg_color)
    t = _smooth_noise(rng, h, w, int(rng.integers(3, 8)))[..., None]
    img = base * (1 - t) + other * t
    # Fine texture.
    img += (_smooth_noise(rng, h, w, int(rng.integers(20, 60)))[..., None] - 0.5) * 40
    img = np.clip(img, 0, 255).astype(np.uint8)
    # Distractors: thin clutter and blobs in colours close to the foreground's.
    n_clutter = 3 + 3 * level
    for _ in range(n_clutter):
        color = _jitter(fg_color, rng, 25)
        kind = rng.integers(0, 3)
        if kind == 0:
            p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(img, p1, p2, color, int(rng.integers(1, 3)), cv2.LINE_AA)
        elif kind == 1:
            center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            axes = (int(rng.integers(4, max(5, w // 8))), int(rng.integers(4, max(5, h // 8))))
            cv2.ellipse(img, center, axes, float(rng.uniform(0, 180)), 0, 360, color, -1, cv2.LINE_AA)
        else:
            pts = rng.integers(0, [w, h], size=(int(rng.integers(3, 6)), 2)).astype(np.int32)
            cv2.polylines(img, [pts], False, color, 1, cv2.LINE_AA)
    # The background plane is out of focus, as behind a photographed thin object: the clutter keeps the
    # foreground's colours and shapes but not its sharpness (without some such cue, same-colour thin lines in
    # front and behind would be indistinguishable and the labels ambiguous).
    sigma = float(rng.uniform(1.2, 2.4))
    return cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma)


#: Thinnest stroke of a foreground structure, in pixels at the generated size. Two pixels keep a structure
#: visible after the resize to the training resolution (a 1 px line at 448 px becomes a faint half-pixel
#: smear at 256, in the image and in the label alike).
MIN_STROKE = 2


def _stroke(value: float | np.integer) -> int:
    return max(MIN_STROKE, int(value))


def _bezier(rng: np.random.Generator, w: int, h: int, n: int = 48) -> np.ndarray:
    ctrl = rng.uniform([-0.1 * w, -0.1 * h], [1.1 * w, 1.1 * h], size=(4, 2))
    t = np.linspace(0, 1, n)[:, None]
    pts = ((1 - t) ** 3) * ctrl[0] + 3 * ((1 - t) ** 2) * t * ctrl[1] + 3 * (1 - t) * t**2 * ctrl[2] + t**3 * ctrl[3]
    return np.rint(pts).astype(np.int32)


def _wires(mask: np.ndarray, rng: np.random.Generator, level: int) -> None:
    h, w = mask.shape
    for _ in range(1 + level + int(rng.integers(0, 2))):
        thick = _stroke(rng.integers(1, max(2, 5 - level)))
        cv2.polylines(mask, [_bezier(rng, w, h)], False, 255, thick, cv2.LINE_AA)


def _mesh(mask: np.ndarray, rng: np.random.Generator, level: int) -> None:
    h, w = mask.shape
    x0, y0 = int(rng.integers(0, w // 4)), int(rng.integers(0, h // 4))
    x1, y1 = int(rng.integers(w // 2, w)), int(rng.integers(h // 2, h))
    spacing = max(4 * MIN_STROKE, int(rng.integers(18, 30)) - 3 * level)
    thick = _stroke(1 if level >= 3 else rng.integers(1, 3))
    angle = float(rng.uniform(0, np.pi / 2))
    layer = np.zeros_like(mask)
    diag = int(np.hypot(w, h))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    for d in range(-diag, diag, spacing):
        for a in (angle, angle + np.pi / 2):
            dx, dy = np.cos(a), np.sin(a)
            ox, oy = cx - dy * d, cy + dx * d
            p1 = (int(ox - dx * diag), int(oy - dy * diag))
            p2 = (int(ox + dx * diag), int(oy + dy * diag))
            cv2.line(layer, p1, p2, 255, thick, cv2.LINE_AA)
    region = np.zeros_like(mask)
    cv2.rectangle(region, (x0, y0), (x1, y1), 255, -1)
    layer = np.minimum(layer, region)
    cv2.rectangle(layer, (x0, y0), (x1, y1), 255, max(2, 5 - level), cv2.LINE_AA)  # the frame
    np.maximum(mask, layer, out=mask)


def _scaffold(mask: np.ndarray, rng: np.random.Generator, level: int) -> None:
    h, w = mask.shape
    cols = 2 + level
    rows = 2 + level
    x0, x1 = int(w * 0.1), int(w * 0.9)
    y0, y1 = int(h * 0.1), int(h * 0.9)
    xs = np.linspace(x0, x1, cols).astype(int)
    ys = np.linspace(y0, y1, rows).astype(int)
    thick = _stroke(4 - level)
    for x in xs:
        cv2.line(mask, (int(x), y0), (int(x), y1), 255, thick + 1, cv2.LINE_AA)
    for y in ys:
        cv2.line(mask, (x0, int(y)), (x1, int(y)), 255, thick, cv2.LINE_AA)
    for i in range(cols - 1):
        for j in range(rows - 1):
            if rng.random() < 0.6:
                p = [(int(xs[i]), int(ys[j])), (int(xs[i + 1]), int(ys[j + 1]))]
                if rng.random() < 0.5:
                    p = [(int(xs[i + 1]), int(ys[j])), (int(xs[i]), int(ys[j + 1]))]
                cv2.line(mask, p[0], p[1], 255, _stroke(thick - 1), cv2.LINE_AA)


def _tree(mask: np.ndarray, rng: np.random.Generator, level: int) -> None:
    h, w = mask.shape
    depth = 3 + level

    def grow(x: float, y: float, angle: float, length: float, thick: float, d: int) -> None:
        if d == 0 or length < 3:
            return
        x2, y2 = x + length * np.cos(angle), y - length * np.sin(angle)
        cv2.line(mask, (int(x), int(y)), (int(x2), int(y2)), 255, _stroke(round(thick)), cv2.LINE_AA)
        for _ in range(2 if rng.random() < 0.7 else 3):
            grow(x2, y2, angle + rng.uniform(-0.7, 0.7), length * rng.uniform(0.6, 0.8), thick * 0.65, d - 1)

    grow(w * rng.uniform(0.35, 0.65), h * 0.98, np.pi / 2 + rng.uniform(-0.2, 0.2), h * 0.28, 3 + 6 / level, depth)


def _branch(mask: np.ndarray, rng: np.random.Generator, level: int) -> None:
    _tree(mask, rng, level)
    h, w = mask.shape
    # Leaves: small ellipses at random points along the structure's extent.
    ys, xs = np.nonzero(mask)
    if len(xs):
        for idx in rng.choice(len(xs), size=min(len(xs), 4 + 4 * level), replace=False):
            axes = (int(rng.integers(2, 6)), int(rng.integers(1, 3)))
            cv2.ellipse(mask, (int(xs[idx]), int(ys[idx])), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1,
                        cv2.LINE_AA)


def _lettering(mask: np.ndarray, rng: np.random.Generator, level: int) -> None:
    h, w = mask.shape
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZabdeghkmnqrstwxyz0123456789"
    fonts = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX,
             cv2.FONT_HERSHEY_SCRIPT_SIMPLEX)
    for _ in range(1 + level):
        text = "".join(rng.choice(list(alphabet), size=int(rng.integers(3, 8))))
        scale = float(rng.uniform(0.5, 1.8)) * min(w, h) / 300 / (0.6 + 0.2 * level)
        thick = _stroke(rng.integers(1, 5 - min(level, 3)))
        org = (int(rng.integers(0, max(1, w // 3))), int(rng.integers(h // 6, h)))
        cv2.putText(mask, text, org, fonts[int(rng.integers(0, len(fonts)))], scale, 255, thick, cv2.LINE_AA)


def _wheel(mask: np.ndarray, rng: np.random.Generator, level: int) -> None:
    h, w = mask.shape
    for _ in range(1 if level < 3 else 2):
        r = int(min(w, h) * rng.uniform(0.2, 0.35))
        c = (int(rng.integers(r, max(r + 1, w - r))), int(rng.integers(r, max(r + 1, h - r))))
        cv2.circle(mask, c, r, 255, max(2, 6 - level), cv2.LINE_AA)
        cv2.circle(mask, c, max(3, r // 8), 255, -1, cv2.LINE_AA)
        spokes = 6 + 6 * level
        for k in range(spokes):
            a = 2 * np.pi * k / spokes
            p = (int(c[0] + r * np.cos(a)), int(c[1] + r * np.sin(a)))
            cv2.line(mask, c, p, 255, _stroke(1), cv2.LINE_AA)


def _necklace(mask: np.ndarray, rng: np.random.Generator, level: int) -> None:
    h, w = mask.shape
    pts = _bezier(rng, w, h, n=12 + 10 * level)
    cv2.polylines(mask, [pts], False, 255, _stroke(1), cv2.LINE_AA)
    for p in pts[:: max(1, 3 - level // 2)]:
        rad = int(rng.integers(3, 7))
        cv2.circle(mask, (int(p[0]), int(p[1])), rad, 255, _stroke(3 - level // 2), cv2.LINE_AA)


def _frame(mask: np.ndarray, rng: np.random.Generator, level: int) -> None:
    """A solid object with holes (a frame with cut-outs), more holes at higher levels."""
    h, w = mask.shape
    center = (w // 2 + int(rng.integers(-w // 8, w // 8 + 1)), h // 2 + int(rng.integers(-h // 8, h // 8 + 1)))
    axes = (int(w * rng.uniform(0.25, 0.4)), int(h * rng.uniform(0.25, 0.4)))
    body = np.zeros_like(mask)
    cv2.ellipse(body, center, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
    holes = np.zeros_like(mask)
    for _ in range(2 + 3 * level):
        hc = (int(center[0] + rng.uniform(-0.7, 0.7) * axes[0]), int(center[1] + rng.uniform(-0.7, 0.7) * axes[1]))
        ha = (int(rng.integers(3, max(4, axes[0] // (2 + level)))),
              int(rng.integers(3, max(4, axes[1] // (2 + level)))))
        cv2.ellipse(holes, hc, ha, float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
    np.maximum(mask, np.minimum(body, 255 - holes), out=mask)


CLASS_PRIMITIVES: dict[str, Callable[[np.ndarray, np.random.Generator, int], None]] = {
    "PowerLine": _wires,
    "Cable": _wires,
    "Fence": _mesh,
    "Scaffold": _scaffold,
    "Tree": _tree,
    "Branch": _branch,
    "Lettering": _lettering,
    "Wheel": _wheel,
    "Necklace": _necklace,
    "Frame": _frame,
}
SECONDARY = (_wires, _mesh, _lettering, _necklace)


def generate_sample(seed: int, set_index: int, index: int, set_name: str, min_side: int,
                    max_side: int) -> SyntheticSample:
    """Generate one sample deterministically from (seed, set, index).

    Returns:
        A :class:`SyntheticSample`; the image is RGB (H, W, 3) uint8 and the mask (H, W) uint8 with soft
        anti-aliased edges.
    """
    rng = np.random.default_rng([seed, set_index, index])
    w = int(rng.integers(min_side, max_side + 1))
    h = int(rng.integers(min_side, max_side + 1))
    level = level_of(set_name, index)
    class_idx = index % len(CLASSES)
    group, class_name = CLASSES[class_idx]
    mask = np.zeros((h, w), dtype=np.uint8)
    CLASS_PRIMITIVES[class_name](mask, rng, level)
    for _ in range(level - 2):  # complex levels add secondary thin structures to the same object
        SECONDARY[int(rng.integers(0, len(SECONDARY)))](mask, rng, 1)
    if mask.max() == 0:  # never ship an empty object
        cv2.circle(mask, (w // 2, h // 2), max(4, min(w, h) // 6), 255, -1, cv2.LINE_AA)

    fg_color = _random_color(rng)
    image = _background(rng, h, w, fg_color, level).astype(np.float32)
    shade = (_smooth_noise(rng, h, w, 6)[..., None] - 0.5) * 60
    fg = np.clip(fg_color + shade, 0, 255)
    alpha = (mask.astype(np.float32) / 255.0)[..., None]
    image = image * (1 - alpha) + fg * alpha
    image += rng.normal(0, 3.0, size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    group_id = GROUPS.index(group) + 1
    name = f"{group_id}#{group}#{class_idx + 1}#{class_name}#{set_index:02d}{index:05d}"
    return SyntheticSample(image=image, mask=mask, name=name, class_name=class_name, level=level)
