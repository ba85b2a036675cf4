"""Predict masks and RGBA cut-outs at original resolution (``birefnet predict``).

Foreground extraction as in BiRefNet (Zheng et al., "Bilateral Reference for High-Resolution Dichotomous
Image Segmentation", CAAI AIR 2024). Inference follows upstream's ``inference.py``: the image is resized to
the model resolution (OpenCV bilinear, as our loader does for training and evaluation), ImageNet-normalised,
the logits go through a sigmoid, the probability map is resized back to the original size with bilinear
``align_corners=True`` and saved x255 truncated to 8 bits. The cut-out is the original RGB with the mask as
alpha.

Python API: :func:`predict_files` (files, folders, globs -> PNGs on disk, bad files reported and skipped),
:func:`predict_images` (in-memory arrays -> masks) and the helpers they are built from.

Usage::

    birefnet predict photos/ extra/*.webp --model models/model.safetensors --out predictions/
    birefnet predict img.jpg --model models:/birefnet@champion --out out/ --size 1024 1024 --device cuda
"""

from __future__ import annotations

import argparse
import glob
import logging
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from birefnet.models.birefnet import BiRefNet

log = logging.getLogger("birefnet.predict")

#: Resolution (width, height) used when neither ``--size`` nor the model file names one: upstream's
#: ``config.size`` and the resolution of the published general checkpoints.
DEFAULT_SIZE = (1024, 1024)
#: Optional safetensors metadata key holding the training resolution as ``"W,H"`` (written via
#: ``save_model(..., extra={SIZE_METADATA_KEY: "1024,1024"})``); read when ``--size`` is not given.
SIZE_METADATA_KEY = "birefnet.data.size"
#: Suffix of the RGBA cut-out next to each mask.
CUTOUT_SUFFIX = "_cutout"


@dataclass(frozen=True)
class PredictionFailure:
    """One input that produced no output, and why."""

    path: str
    reason: str


@dataclass
class PredictReport:
    """What :func:`predict_files` did.

    Attributes:
        masks: mask PNGs written, in input order.
        cutouts: RGBA cut-out PNGs written (empty with ``cutout=False``).
        failures: inputs skipped (unreadable, missing, unwritable), each with its reason.
        size: the model resolution used, (width, height).
    """

    masks: list[Path] = field(default_factory=list)
    cutouts: list[Path] = field(default_factory=list)
    failures: list[PredictionFailure] = field(default_factory=list)
    size: tuple[int, int] = DEFAULT_SIZE

    @property
    def ok(self) -> bool:
        """True when every input produced its outputs."""
        return not self.failures

    def summary(self) -> str:
        """Human-readable summary naming every failed file."""
        total = len(self.masks) + len(self.failures)
        lines = [f"predicted {len(self.masks)} of {total} image(s) at {self.size[0]}x{self.size[1]}"]
        if self.failures:
            lines.append(f"{len(self.failures)} failed:")
            lines += [f"  {f.path}: {f.reason}" for f in self.failures]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- model & inputs


def resolve_model_file(model: str | Path) -> Path:
    """Local ``.safetensors`` path for a file or a ``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``) URI.

    Registered models are downloaded with ``mlflow.artifacts.download_artifacts`` (tracking URI from the
    environment, as every MLflow client) and the first ``.safetensors`` inside is used.

    Raises:
        FileNotFoundError: the file does not exist, or the registered model holds no ``.safetensors``.
    """
    text = str(model)
    if text.startswith("models:/"):
        import mlflow

        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
        found = [local] if local.is_file() and local.suffix == ".safetensors" else sorted(local.rglob("*.safetensors"))
        if not found:
            raise FileNotFoundError(f"{text}: no .safetensors file in the registered model's artifacts ({local})")
        return found[0]
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found")
    return path


def model_resolution(path: str | Path, size: Sequence[int] | None = None) -> tuple[int, int]:
    """The (width, height) to run at: ``size`` if given, else the file's ``SIZE_METADATA_KEY``, else 1024x1024.

    Raises:
        ValueError: a side is not a positive multiple of 32.
    """
    if size is None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            value = (handle.metadata() or {}).get(SIZE_METADATA_KEY)
        size = tuple(int(v) for v in value.split(",")) if value else DEFAULT_SIZE
    return check_size(size)


def check_size(size: Sequence[int]) -> tuple[int, int]:
    """Validate a (width, height) model resolution (the decoder's patch grid needs multiples of 32)."""
    if len(size) != 2 or any(int(s) <= 0 or int(s) % 32 for s in size):
        raise ValueError(f"size must be two positive multiples of 32 (width height), given {list(size)}")
    return int(size[0]), int(size[1])


def collect_inputs(inputs: Sequence[str | Path], recursive: bool = False) -> tuple[
        list[tuple[Path, Path]], list[PredictionFailure]]:
    """Expand files, folders and glob patterns into images to predict.

    A folder contributes its files with an image extension (``birefnet.data.io.IMAGE_EXTENSIONS``, any case),
    sub-folders too with ``recursive``; a glob (``*``, ``?``, ``[``) contributes what it matches (``**`` with
    ``recursive``). A named file is always tried, whatever its extension. Duplicates are dropped.

    Returns:
        ``(images, failures)``: each image as ``(path, output stem)`` where the stem is relative to the output
        folder (sub-folders of a recursive folder input are mirrored; clashing names get the source
        extension appended, then a counter), and the inputs that matched nothing.
    """
    from birefnet.data.io import IMAGE_EXTENSIONS

    found: list[tuple[Path, Path]] = []  # (file, stem relative to the output folder)
    failures: list[PredictionFailure] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                failures.append(PredictionFailure(text, "folder holds no image files"))
            found += [(p, p.relative_to(path).with_suffix("")) for p in files]
        elif path.is_file():
            found.append((path, Path(path.stem)))
        elif glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=recursive) if Path(p).is_file())
            if not matches:
                failures.append(PredictionFailure(text, "pattern matched no file"))
            found += [(p, Path(p.stem)) for p in matches]
        else:
            failures.append(PredictionFailure(text, "file not found"))
    images: list[tuple[Path, Path]] = []
    seen_files: set[Path] = set()
    seen_stems: set[str] = set()
    for file, stem in found:
        key = file.resolve()
        if key in seen_files:
            continue
        seen_files.add(key)
        candidate = stem
        if _stem_key(candidate) in seen_stems:
            candidate = stem.with_name(f"{stem.name}_{file.suffix.lstrip('.').lower()}")
        counter = 2
        while _stem_key(candidate) in seen_stems:
            candidate = stem.with_name(f"{stem.name}_{counter}")
            counter += 1
        seen_stems.add(_stem_key(candidate))
        images.append((file, candidate))
    return images, failures


def _stem_key(stem: Path) -> str:
    # Case-insensitive file systems would make "A.png" overwrite "a.png".
    return stem.as_posix().lower()


# ------------------------------------------------------------------------------------------ pure transforms


def preprocess(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Resize to the model resolution and ImageNet-normalise.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        size: model resolution (width, height).

    Returns:
        ``(3, size[1], size[0])`` float32.
    """
    import cv2
    import torch

    from birefnet.data.gradients import IMAGENET_MEAN, IMAGENET_STD

    if image.shape[1] != size[0] or image.shape[0] != size[1]:
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32) * 255.0
    scale = 1.0 / (np.asarray(IMAGENET_STD, dtype=np.float32) * 255.0)
    normalised = (image.astype(np.float32) - mean) * scale
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


def postprocess(logits: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Logits at model resolution -> 8-bit masks at each original size (upstream's order and rounding).

    Args:
        logits: ``(B, 1, h, w)``.
        sizes: per sample, the original (height, width).

    Returns:
        B arrays ``(H_i, W_i)`` uint8: sigmoid, bilinear ``align_corners=True`` resize, x255 truncated.
    """
    import torch
    import torch.nn.functional as F

    probs = torch.sigmoid(logits.float())
    masks = []
    for prob, (height, width) in zip(probs, sizes, strict=True):
        prob = prob[None]
        if tuple(prob.shape[-2:]) != (height, width):
            prob = F.interpolate(prob, size=(height, width), mode="bilinear", align_corners=True)
        masks.append((prob[0, 0].clamp_(0, 1) * 255).to(torch.uint8).cpu().numpy())
    return masks


def make_cutout(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGBA cut-out: the image's colours with the mask as alpha.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` uint8.

    Returns:
        ``(H, W, 4)`` uint8.
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    return np.concatenate((image, mask[..., None]), axis=2)


def predict_images(model: BiRefNet, images: Sequence[np.ndarray], size: tuple[int, int],
                   device: str | torch.device = "cpu", precision: str = "auto") -> list[np.ndarray]:
    """Masks for in-memory images, one forward pass for all of them (batch them yourself).

    Args:
        model: a BiRefNet in eval mode on ``device``.
        images: ``(H_i, W_i, 3)`` uint8 RGB arrays of any sizes.
        size: model resolution (width, height), multiples of 32.
        device: where to run.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 elsewhere), ``fp32`` or ``bf16``.

    Returns:
        ``(H_i, W_i)`` uint8 masks, one per image.
    """
    import torch

    from birefnet.training.engine import autocast_for

    if not images:
        return []
    device = torch.device(device)
    batch = torch.stack([preprocess(image, size) for image in images]).to(device)
    with torch.inference_mode(), autocast_for(device, precision):
        logits = model(batch).logits
    return postprocess(logits, [image.shape[:2] for image in images])


# --------------------------------------------------------------------------------------------- file driver


def load_predictor(model: str | Path, device: str | torch.device = "cpu", size: Sequence[int] | None = None
                   ) -> tuple[BiRefNet, tuple[int, int]]:
    """Load a model file or ``models:/`` URI and pick its resolution (see :func:`model_resolution`)."""
    from birefnet.models.io import load_model

    path = resolve_model_file(model)
    return load_model(path, device=device), model_resolution(path, size)


def predict_files(inputs: Sequence[str | Path], model: str | Path | BiRefNet, out: str | Path, *,
                  size: Sequence[int] | None = None, batch_size: int = 1, device: str | torch.device = "cpu",
                  precision: str = "auto", cutout: bool = True, recursive: bool = False, progress: bool = True,
                  workers: int = 2) -> PredictReport:
    """Predict every image under ``inputs`` and write ``<out>/<stem>.png`` (+ ``<stem>_cutout.png``).

    A file that cannot be read or written is recorded in the report and skipped; the others go on.

    Args:
        inputs: files, folders and glob patterns (see :func:`collect_inputs`).
        model: a ``.safetensors`` file, a ``models:/NAME@ALIAS`` URI, or a loaded BiRefNet (on ``device``).
        out: output folder (created).
        size: model resolution (width, height); None = the model file's, else 1024x1024.
        batch_size: images per forward pass.
        device: ``cpu``, ``cuda``...
        precision: ``auto`` (bf16 on CUDA), ``fp32`` or ``bf16``.
        cutout: also write RGBA cut-outs.
        recursive: descend into sub-folders (mirrored under ``out``) and let ``**`` match in globs.
        progress: show a tqdm bar.
        workers: threads decoding the next batch while the current one runs.

    Returns:
        The :class:`PredictReport`.
    """
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, given {batch_size}")
    if isinstance(model, torch.nn.Module):
        net, resolution = model, check_size(size or DEFAULT_SIZE)
    else:
        net, resolution = load_predictor(model, device=device, size=size)
    net.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, failures = collect_inputs(inputs, recursive=recursive)
    report = PredictReport(failures=list(failures), size=resolution)
    log.info("%d image(s) to predict at %dx%d on %s", len(images), *resolution, device)
    with tqdm(total=len(images), desc="predict", unit="img", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for loaded in _prefetched_batches(images, batch_size, pool):
            good = [(path, stem, image) for path, stem, image in loaded if not isinstance(image, PredictionFailure)]
            report.failures += [image for _, _, image in loaded if isinstance(image, PredictionFailure)]
            masks = predict_images(net, [image for _, _, image in good], resolution, device, precision)
            for (path, stem, image), mask in zip(good, masks, strict=True):
                try:
                    written = _write_outputs(out, stem, image, mask, cutout)
                except OSError as exc:
                    report.failures.append(PredictionFailure(str(path), f"cannot write output: {exc}"))
                    continue
                report.masks.append(written[0])
                report.cutouts += written[1:]
            bar.update(len(loaded))
    return report


def _load(path: Path) -> np.ndarray | PredictionFailure:
    from birefnet.data.io import ImageReadError, load_image

    try:
        return load_image(path)
    except ImageReadError as exc:
        return PredictionFailure(str(path), exc.reason)
    except (OSError, ValueError, MemoryError) as exc:  # anything else one bad file can raise while decoding
        return PredictionFailure(str(path), f"{type(exc).__name__}: {exc}")


def _prefetched_batches(images: Sequence[tuple[Path, Path]], batch_size: int, pool: ThreadPoolExecutor
                        ) -> Iterator[list[tuple[Path, Path, np.ndarray | PredictionFailure]]]:
    """Decode batch i+1 in ``pool`` while batch i is predicted; at most two batches in memory."""
    chunks = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]

    def submit(chunk: Sequence[tuple[Path, Path]]) -> list[tuple[Path, Path, Future]]:
        return [(path, stem, pool.submit(_load, path)) for path, stem in chunk]

    pending = submit(chunks[0]) if chunks else []
    for index in range(len(chunks)):
        current = pending
        pending = submit(chunks[index + 1]) if index + 1 < len(chunks) else []
        yield [(path, stem, future.result()) for path, stem, future in current]


def _write_outputs(out: Path, stem: Path, image: np.ndarray, mask: np.ndarray, cutout: bool) -> list[Path]:
    from PIL import Image

    target = out / stem.parent
    target.mkdir(parents=True, exist_ok=True)
    mask_path = target / f"{stem.name}.png"
    Image.fromarray(mask).save(mask_path)
    if not cutout:
        return [mask_path]
    cutout_path = target / f"{stem.name}{CUTOUT_SUFFIX}.png"
    Image.fromarray(make_cutout(image, mask)).save(cutout_path)
    return [mask_path, cutout_path]


# ------------------------------------------------------------------------------------------------------ CLI


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of ``birefnet predict``."""
    parser = argparse.ArgumentParser(
        prog="birefnet predict",
        description="Predict 8-bit masks at each image's original size (<out>/<stem>.png) and RGBA cut-outs "
                    "(<out>/<stem>_cutout.png). Unreadable files are reported by name and skipped; the exit "
                    "status is 1 when any input failed.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--model", required=True, help="model .safetensors file or models:/NAME@ALIAS")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--size", nargs=2, type=int, metavar=("W", "H"), default=None,
                        help="model resolution (multiples of 32); default: the model file's, else 1024 1024")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto = bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--no-cutout", dest="cutout", action="store_false", help="write masks only")
    parser.add_argument("-r", "--recursive", action="store_true",
                        help="descend into sub-folders (mirrored in --out) and let ** match in globs")
    parser.add_argument("--workers", type=int, default=2, help="image decoding threads (default 2)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``birefnet predict``; 0 when every input was predicted, 1 when any failed, 2 on a usage error."""
    import torch

    from birefnet.stages.common import setup_logging

    args = get_args_parser().parse_args(argv)
    setup_logging(args.quiet)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        report = predict_files(args.inputs, args.model, args.out, size=args.size, batch_size=args.batch_size,
                               device=device, precision=args.precision, cutout=args.cutout,
                               recursive=args.recursive, progress=args.progress, workers=args.workers)
    except (FileNotFoundError, ValueError) as exc:
        print(f"birefnet predict: {exc}", file=sys.stderr)
        return 2
    print(report.summary(), file=sys.stderr if report.failures else sys.stdout)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
