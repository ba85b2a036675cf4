"""Predict masks and RGBA cut-outs at original resolution (``birefnet predict``).

Foreground extraction as in BiRefNet (Zheng et al., "Bilateral Reference for High-Resolution Dichotomous
Image Segmentation", CAAI AIR 2024). Inference follows upstream's ``inference.py``: the image is resized to
the model resolution (OpenCV bilinear, as our loader does for training and evaluation), ImageNet-normalised,
the logits go through a sigmoid, the probability map is resized back to the original size with bilinear
``align_corners=True`` and saved x255 truncated to 8 bits. The cut-out is the original RGB with the mask as
alpha; with ``--refine-foreground`` its colours are the estimated foreground colours instead
(:mod:`birefnet.foreground`, blur fusion as upstream's ``refine_foreground``), so soft edges do not carry the old
background. ``--precision fp16`` runs the forward pass under fp16 autocast, which needs CUDA: on any other device
it is refused (exit 2) rather than silently run in another precision.

Python API: :func:`predict_files` (files, folders, globs -> PNGs on disk, bad files reported and skipped),
:func:`predict_images` (in-memory arrays -> masks) and the helpers they are built from.

Outputs never replace an input, nor each other: names are planned for the whole run first (:func:`plan_outputs`)
and an output that would land on an input file or on another input's output gets a new name, reported in the
log and the summary. ``--out`` equal to a folder holding inputs, or inside a folder given as input, is refused
unless ``--overwrite``. Every PNG written carries a ``Software`` text chunk naming this tool, so a rerun
replaces its own earlier outputs in ``--out`` while any other file there is only replaced with ``--overwrite``.

Exit status: 0 all predicted, 1 some inputs failed (each named), 2 bad arguments (``--size``, a model file or
URI that does not exist, ``--precision fp16`` without CUDA), 3 bad input (output folder conflicts, a damaged
model file, an unreachable tracking server).

Usage::

    birefnet predict photos/ extra/*.webp --model models/model.safetensors --out predictions/
    birefnet predict img.jpg --model models:/birefnet@champion --out out/ --size 1024 1024 --device cuda
    birefnet predict hair.jpg --model models/model.safetensors --out out/ --refine-foreground --precision fp16
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import contextlib

    import torch

    from birefnet.models.birefnet import BiRefNet

log = logging.getLogger("birefnet.predict")

#: Resolution (width, height) used when neither ``--size`` nor the model file names one: upstream's
#: ``config.size`` and the resolution of the published general checkpoints.
DEFAULT_SIZE = (1024, 1024)
#: Optional safetensors metadata key holding the training resolution as ``"W,H"`` (written via
#: ``save_model(..., extra={SIZE_METADATA_KEY: "1024,1024"})``); read when ``--size`` is not given.
SIZE_METADATA_KEY = "birefnet.data.size"
#: ``precision`` values of :func:`predict_images` and ``--precision``; ``fp16`` needs a CUDA device.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Suffix of the RGBA cut-out next to each mask.
CUTOUT_SUFFIX = "_cutout"
#: Value of the ``Software`` PNG text chunk of every output: marks files a rerun may replace.
SOFTWARE_TAG = "birefnet predict"
#: Encoder output stride: model resolutions are multiples of it.
SIZE_MULTIPLE = 32
#: Seconds per attempt, and attempts, of the tracking-server probe before a ``models:/`` download (about 9 s
#: at most in all, against minutes of MLflow's own retries).
TRACKING_PROBE_TIMEOUT_S = 2.0
TRACKING_PROBE_ATTEMPTS = 3


class PredictInputError(RuntimeError):
    """Bad input that stops the whole run before any output is written (exit code 3); the message names it."""


@dataclass(frozen=True)
class OutputRename:
    """An input whose outputs got another name than ``<stem>.png`` so that nothing is overwritten.

    Attributes:
        path: the input file.
        wanted: the output stem it would have had (relative to the output folder).
        used: the output stem it got.
        reason: what the wanted name would have overwritten.
    """

    path: str
    wanted: str
    used: str
    reason: str


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
        renames: inputs whose outputs were renamed so that nothing was overwritten.
    """

    masks: list[Path] = field(default_factory=list)
    cutouts: list[Path] = field(default_factory=list)
    failures: list[PredictionFailure] = field(default_factory=list)
    size: tuple[int, int] = DEFAULT_SIZE
    renames: list[OutputRename] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every input produced its outputs."""
        return not self.failures

    def summary(self) -> str:
        """Human-readable summary naming every failed file and every renamed output."""
        total = len(self.masks) + len(self.failures)
        lines = [f"predicted {len(self.masks)} of {total} image(s) at {self.size[0]}x{self.size[1]}"]
        if self.renames:
            lines.append(f"{len(self.renames)} output name(s) changed so that nothing is overwritten:")
            lines += [f"  {r.path}: {r.wanted}.png -> {r.used}.png ({r.reason})" for r in self.renames]
        if self.failures:
            lines.append(f"{len(self.failures)} failed:")
            lines += [f"  {f.path}: {f.reason}" for f in self.failures]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- model & inputs


def resolve_model_file(model: str | Path) -> Path:
    """Local ``.safetensors`` path for a file or a ``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``) URI.

    Registered models are downloaded with ``mlflow.artifacts.download_artifacts`` (tracking URI from the
    environment, as every MLflow client) and the first ``.safetensors`` inside is used. An ``http(s)`` tracking
    or registry server is probed first, so an unreachable one fails in seconds (not after MLflow's minutes of
    retries), and MLflow's own HTTP retries are bounded for the download.

    Raises:
        FileNotFoundError: the file does not exist, or the registry has no such model, alias or version, or the
            registered model holds no ``.safetensors``.
        TrackingUnavailableError: the tracking (or registry) server does not answer; the message names its URI
            with the credentials masked.
        PredictInputError: the registry answered with another error (e.g. refused credentials).
    """
    text = str(model)
    if text.startswith("models:/"):
        return _download_registered(text)
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found")
    return path


def _download_registered(uri: str) -> Path:
    """Download a ``models:/`` URI after checking its servers answer; see :func:`resolve_model_file`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from birefnet.tracking import bounded_http_retries, check_tracking_server, redact_uri

    tracking_uri = mlflow.get_tracking_uri()
    servers = list(dict.fromkeys([mlflow.get_registry_uri() or tracking_uri, tracking_uri]))
    with bounded_http_retries(max_retries=2, backoff_factor=1, timeout_s=60):
        for server in servers:
            check_tracking_server(server, attempts=TRACKING_PROBE_ATTEMPTS, timeout_s=TRACKING_PROBE_TIMEOUT_S)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        except MlflowException as exc:
            message = _mask_secrets(str(exc), servers)[:500]
            where = f"the registry at {redact_uri(servers[0])}"
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
                raise FileNotFoundError(f"{uri}: not found in {where}: {message}") from None
            raise PredictInputError(f"{uri}: {where} failed ({exc.error_code}): {message}") from None
    found = [local] if local.is_file() and local.suffix == ".safetensors" else sorted(local.rglob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"{uri}: no .safetensors file in the registered model's artifacts ({local})")
    return found[0]


def _mask_secrets(text: str, uris: Sequence[str]) -> str:
    """``text`` with every URI of ``uris`` redacted, and their passwords masked wherever else they appear."""
    from urllib.parse import urlsplit

    from birefnet.tracking import redact_uri

    for uri in uris:
        text = text.replace(uri, redact_uri(uri))
        password = urlsplit(uri).password
        if password:
            text = text.replace(password, "***")
    return text


def model_resolution(path: str | Path, size: Sequence[int] | None = None) -> tuple[int, int]:
    """The (width, height) to run at: ``size`` if given, else the file's ``SIZE_METADATA_KEY``, else 1024x1024.

    Raises:
        ValueError: a side is not a positive multiple of 32.
        ModelFileError: the file is unreadable, or its ``SIZE_METADATA_KEY`` is not ``"W,H"``.
    """
    if size is None:
        from birefnet.models.io import ModelFileError, read_metadata

        value = read_metadata(path).get(SIZE_METADATA_KEY)
        if not value:
            return check_size(DEFAULT_SIZE)
        try:
            size = tuple(int(v) for v in value.split(","))
            return check_size(size)
        except ValueError as exc:
            raise ModelFileError(f"{path}: metadata {SIZE_METADATA_KEY!r} is {value!r}; expected 'W,H' with two "
                                 f"positive multiples of {SIZE_MULTIPLE} ({exc})") from None
    return check_size(size)


def check_size(size: Sequence[int], min_side: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """Validate a (width, height) model resolution (the decoder's patch grid needs multiples of 32).

    Args:
        size: (width, height).
        min_side: smallest side the model can run at (see :func:`min_model_side`).

    Raises:
        ValueError: not two positive multiples of 32, or a side under ``min_side``.
    """
    if len(size) != 2 or any(int(s) <= 0 or int(s) % SIZE_MULTIPLE for s in size):
        raise ValueError(f"size must be two positive multiples of {SIZE_MULTIPLE} (width height), given {list(size)}")
    if min(int(s) for s in size) < min_side:
        raise ValueError(f"size {int(size[0])}x{int(size[1])} is too small for this model: each side must be at "
                         f"least {min_side} (and a multiple of {SIZE_MULTIPLE})")
    return int(size[0]), int(size[1])


def min_model_side(model: torch.nn.Module) -> int:
    """Smallest side (pixels) ``model`` can run at.

    The encoder reduces the input 32 times; with ``multiscale_input`` ``cat`` or ``add`` it also reads the
    half-size image, whose deepest map would be under one pixel at side 32 (convolutions then fail inside the
    encoder), so such models need 64. Checked for convnext, ResNet, PVT v2 and Swin encoders.
    """
    multiscale = getattr(model, "multiscale_input", "none")
    return 2 * SIZE_MULTIPLE if multiscale in ("cat", "add") else SIZE_MULTIPLE


def collect_inputs(inputs: Sequence[str | Path], recursive: bool = False) -> tuple[
        list[tuple[Path, Path]], list[PredictionFailure]]:
    """Expand files, folders and glob patterns into images to predict.

    A folder contributes its files with an image extension (``birefnet.data.io.IMAGE_EXTENSIONS``, any case),
    sub-folders too with ``recursive``; a glob (``*``, ``?``, ``[``) contributes what it matches (``**`` with
    ``recursive``). A named file is always tried, whatever its extension. Duplicates are dropped.

    Returns:
        ``(images, failures)``: each image as ``(path, natural output stem)`` where the stem is relative to the
        output folder (sub-folders of a recursive folder input are mirrored), and the inputs that matched
        nothing. Stems may clash; :func:`plan_outputs` makes the final names unique.
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
    seen_files: set[str] = set()
    for file, stem in found:
        key = _path_key(file)
        if key not in seen_files:
            seen_files.add(key)
            images.append((file, stem))
    return images, failures


def _path_key(path: Path) -> str:
    """Identity of a file for clash checks: resolved, and case-folded (on a case-insensitive file system
    ``A.png`` and ``a.png`` are one file, so treat them as one everywhere)."""
    return os.path.normcase(str(path.resolve())).casefold()


def output_names(stem: Path, cutout: bool) -> list[Path]:
    """Output files of one input, relative to the output folder: ``<stem>.png`` and ``<stem>_cutout.png``."""
    names = [stem.with_name(f"{stem.name}.png")]
    if cutout:
        names.append(stem.with_name(f"{stem.name}{CUTOUT_SUFFIX}.png"))
    return names


def plan_outputs(images: Sequence[tuple[Path, Path]], out: str | Path, cutout: bool = True
                 ) -> tuple[list[tuple[Path, Path]], list[OutputRename]]:
    """Final output stems for a run, such that no output is an input file or another input's output.

    Every input keeps its natural stem when none of its outputs (mask, cut-out) lands on an input file or on
    an output already planned; the others get ``<stem>_<extension>`` (then ``_2``, ``_3``...), the first free
    name. Comparisons are case-insensitive.

    Args:
        images: ``(path, natural stem)`` pairs from :func:`collect_inputs`.
        out: the output folder.
        cutout: whether cut-outs are written (their names count too).

    Returns:
        ``(plan, renames)``: ``(path, stem)`` in input order, and one :class:`OutputRename` per changed name.
    """
    out = Path(out)
    inputs = {_path_key(path): path for path, _ in images}
    owners: dict[str, Path] = {}  # output key -> input that owns it

    def clash(stem: Path) -> str | None:
        for name in output_names(stem, cutout):
            key = _path_key(out / name)
            if key in inputs:
                return f"would overwrite the input {inputs[key]}"
            if key in owners:
                return f"{out / name} is already the output of {owners[key]}"
        return None

    def claim(path: Path, stem: Path) -> None:
        for name in output_names(stem, cutout):
            owners[_path_key(out / name)] = path

    final: dict[int, Path] = {}
    deferred: list[tuple[int, str]] = []
    for index, (path, stem) in enumerate(images):
        reason = clash(stem)
        if reason is None:
            claim(path, stem)
            final[index] = stem
        else:
            deferred.append((index, reason))
    renames: list[OutputRename] = []
    for index, reason in deferred:
        path, stem = images[index]
        base = f"{stem.name}_{path.suffix.lstrip('.').lower() or 'image'}"
        candidate, counter = stem.with_name(base), 2
        while clash(candidate) is not None:
            candidate, counter = stem.with_name(f"{base}_{counter}"), counter + 1
        claim(path, candidate)
        final[index] = candidate
        renames.append(OutputRename(str(path), stem.as_posix(), candidate.as_posix(), reason))
    return [(path, final[index]) for index, (path, _) in enumerate(images)], renames


def check_output_folder(out: str | Path, inputs: Sequence[str | Path], images: Sequence[tuple[Path, Path]],
                        overwrite: bool = False) -> None:
    """Refuse an output folder that is, or lies inside, an input folder (unless ``overwrite``).

    Input folders are the folders given as inputs (``out`` may be neither one of them nor inside one) and the
    folders holding any input image (``out`` may not be one of them).

    Raises:
        PredictInputError: the conflict, naming both folders.
    """
    if overwrite:
        return
    target = Path(out).resolve()
    given = [Path(str(item)).resolve() for item in inputs if Path(str(item)).is_dir()]
    for folder in given:
        if target == folder or folder in target.parents:
            relation = "is" if target == folder else "is inside"
            raise PredictInputError(
                f"--out {out} {relation} the input folder {folder}: masks would be written among the images (and "
                "taken as inputs by the next run). Choose another --out, or pass --overwrite (inputs are never "
                "replaced even then: a clashing output gets another name)")
    holders = {path.resolve().parent: path for path, _ in images}
    if target in holders:
        raise PredictInputError(
            f"--out {out} is the folder holding the input {holders[target]}: masks would be written among the "
            "images. Choose another --out, or pass --overwrite (inputs are never replaced even then: a clashing "
            "output gets another name)")


def check_existing_outputs(plan: Sequence[tuple[Path, Path]], out: str | Path, cutout: bool,
                           overwrite: bool = False) -> None:
    """Refuse to replace files in ``out`` that an earlier ``birefnet predict`` did not write (unless ``overwrite``).

    Raises:
        PredictInputError: the files (the first 5 named) and how to proceed.
    """
    if overwrite:
        return
    out = Path(out)
    foreign = [out / name for _, stem in plan for name in output_names(stem, cutout)
               if (out / name).exists() and not _written_by_us(out / name)]
    if foreign:
        shown = ", ".join(str(p) for p in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise PredictInputError(
            f"--out {out} already holds {len(foreign)} file(s) that birefnet predict did not write and this run "
            f"would replace: {shown}. Choose an empty --out, move them, or pass --overwrite")


def _written_by_us(path: Path) -> bool:
    """True for a PNG whose ``Software`` text chunk is :data:`SOFTWARE_TAG` (an earlier run's output)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == SOFTWARE_TAG
    except (OSError, UnidentifiedImageError, ValueError):
        return False


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


def make_cutout(image: np.ndarray, mask: np.ndarray, refine_foreground: bool = False) -> np.ndarray:
    """RGBA cut-out: the image's colours (or their estimated foreground colours) with the mask as alpha.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` uint8.
        refine_foreground: replace the colours by :func:`birefnet.foreground.estimate_foreground` under the mask,
            removing the background's tint from soft edges (pixels with alpha 255 keep their colour).

    Returns:
        ``(H, W, 4)`` uint8.
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    if refine_foreground:
        from birefnet.foreground import estimate_foreground

        image = estimate_foreground(image, mask)
    return np.concatenate((image, mask[..., None]), axis=2)


def check_precision(precision: str, device: str | torch.device) -> None:
    """Refuse a precision the device cannot run.

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`, or is ``fp16`` on a device other than CUDA
            (fp16 autocast is CUDA-only here; the CPU runs fp32 or bf16).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; given {precision!r}")
    device_type = str(device).split(":", 1)[0]
    if precision == "fp16" and device_type != "cuda":
        raise ValueError(f"precision fp16 needs a CUDA device (fp16 autocast is CUDA-only); the device is "
                         f"{device_type}: use --precision fp32 or bf16 there, or --device cuda")


def inference_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    """The forward pass's autocast: fp16 on CUDA for ``fp16``, else as training's ``autocast_for`` (bf16 for
    ``bf16``, and for ``auto`` on CUDA; none for ``fp32``). Call :func:`check_precision` first."""
    import torch

    from birefnet.training.engine import autocast_for

    if precision == "fp16":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return autocast_for(device, precision)


def predict_images(model: BiRefNet, images: Sequence[np.ndarray], size: tuple[int, int],
                   device: str | torch.device = "cpu", precision: str = "auto") -> list[np.ndarray]:
    """Masks for in-memory images, one forward pass for all of them (batch them yourself).

    Args:
        model: a BiRefNet in eval mode on ``device``.
        images: ``(H_i, W_i, 3)`` uint8 RGB arrays of any sizes.
        size: model resolution (width, height), multiples of 32.
        device: where to run.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 elsewhere), ``fp32``, ``bf16`` or ``fp16`` (fp16
            autocast, CUDA only).

    Returns:
        ``(H_i, W_i)`` uint8 masks, one per image.

    Raises:
        ValueError: see :func:`check_precision`.
    """
    import torch

    check_precision(precision, device)
    if not images:
        return []
    device = torch.device(device)
    batch = torch.stack([preprocess(image, size) for image in images]).to(device)
    with torch.inference_mode(), inference_autocast(device, precision):
        logits = model(batch).logits
    return postprocess(logits, [image.shape[:2] for image in images])


# --------------------------------------------------------------------------------------------- file driver


def load_predictor(model: str | Path, device: str | torch.device = "cpu", size: Sequence[int] | None = None
                   ) -> tuple[BiRefNet, tuple[int, int]]:
    """Load a model file or ``models:/`` URI and pick its resolution (see :func:`model_resolution`).

    Raises:
        ValueError: the resolution is not a multiple of 32 or is too small for the model (names the file).
        ModelFileError: the file is damaged (truncated, foreign); see :func:`birefnet.models.io.load_model`.
    """
    from birefnet.models.io import load_model

    path = resolve_model_file(model)
    net = load_model(path, device=device)
    resolution = model_resolution(path, size)
    try:
        check_size(resolution, min_model_side(net))
    except ValueError as exc:
        raise ValueError(f"model {path}: {exc}") from None
    return net, resolution


def predict_files(inputs: Sequence[str | Path], model: str | Path | BiRefNet, out: str | Path, *,
                  size: Sequence[int] | None = None, batch_size: int = 1, device: str | torch.device = "cpu",
                  precision: str = "auto", cutout: bool = True, recursive: bool = False, progress: bool = True,
                  workers: int = 2, overwrite: bool = False, refine_foreground: bool = False) -> PredictReport:
    """Predict every image under ``inputs`` and write ``<out>/<stem>.png`` (+ ``<stem>_cutout.png``).

    A file that cannot be read or written is recorded in the report and skipped; the others go on. Outputs
    never replace an input or each other (clashing names are changed and reported, see :func:`plan_outputs`).

    Args:
        inputs: files, folders and glob patterns (see :func:`collect_inputs`).
        model: a ``.safetensors`` file, a ``models:/NAME@ALIAS`` URI, or a loaded BiRefNet (on ``device``).
        out: output folder (created).
        size: model resolution (width, height); None = the model file's, else 1024x1024.
        batch_size: images per forward pass.
        device: ``cpu``, ``cuda``...
        precision: ``auto`` (bf16 on CUDA), ``fp32``, ``bf16`` or ``fp16`` (CUDA only; refused elsewhere).
        cutout: also write RGBA cut-outs.
        recursive: descend into sub-folders (mirrored under ``out``) and let ``**`` match in globs.
        progress: show a tqdm bar.
        workers: threads decoding the next batch while the current one runs.
        overwrite: allow ``out`` inside an input folder, and replacing files in ``out`` that an earlier run of
            this tool did not write. Inputs are never replaced.
        refine_foreground: cut-outs get estimated foreground colours (see :func:`make_cutout`); needs ``cutout``.

    Returns:
        The :class:`PredictReport`.

    Raises:
        ValueError: bad ``batch_size`` or ``size`` (too small for the model, not multiples of 32), ``fp16`` off
            CUDA (see :func:`check_precision`), ``refine_foreground`` without ``cutout``.
        PredictInputError: ``out`` conflicts with the inputs or holds files of another origin (see
            ``overwrite``); nothing was written.
        ModelFileError: a damaged model file.
        TrackingUnavailableError: a ``models:/`` URI whose server does not answer.
    """
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, given {batch_size}")
    check_precision(precision, device)
    if refine_foreground and not cutout:
        raise ValueError("refine_foreground changes the cut-outs' colours; it needs cut-outs (drop --no-cutout)")
    out = Path(out)
    images, failures = collect_inputs(inputs, recursive=recursive)
    check_output_folder(out, inputs, images, overwrite)
    images, renames = plan_outputs(images, out, cutout)
    check_existing_outputs(images, out, cutout, overwrite)
    if isinstance(model, torch.nn.Module):
        net, resolution = model, check_size(size or DEFAULT_SIZE, min_model_side(model))
    else:
        net, resolution = load_predictor(model, device=device, size=size)
    net.eval()
    out.mkdir(parents=True, exist_ok=True)
    report = PredictReport(failures=list(failures), size=resolution, renames=renames)
    for rename in renames:
        log.warning("%s: output %s.png renamed to %s.png (%s)", rename.path, rename.wanted, rename.used, rename.reason)
    log.info("%d image(s) to predict at %dx%d on %s", len(images), *resolution, device)
    with tqdm(total=len(images), desc="predict", unit="img", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for loaded in _prefetched_batches(images, batch_size, pool):
            good = [(path, stem, image) for path, stem, image in loaded if not isinstance(image, PredictionFailure)]
            report.failures += [image for _, _, image in loaded if isinstance(image, PredictionFailure)]
            masks = predict_images(net, [image for _, _, image in good], resolution, device, precision)
            for (path, stem, image), mask in zip(good, masks, strict=True):
                try:
                    written = _write_outputs(out, stem, image, mask, cutout, refine_foreground)
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


def _write_outputs(out: Path, stem: Path, image: np.ndarray, mask: np.ndarray, cutout: bool,
                   refine_foreground: bool = False) -> list[Path]:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", SOFTWARE_TAG)
    mask_path, *cutout_path = [out / name for name in output_names(stem, cutout)]
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(mask_path, pnginfo=info)
    if cutout_path:
        Image.fromarray(make_cutout(image, mask, refine_foreground)).save(cutout_path[0], pnginfo=info)
    return [mask_path, *cutout_path]


# ------------------------------------------------------------------------------------------------------ CLI


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of ``birefnet predict``."""
    parser = argparse.ArgumentParser(
        prog="birefnet predict",
        description="Predict 8-bit masks at each image's original size (<out>/<stem>.png) and RGBA cut-outs "
                    "(<out>/<stem>_cutout.png). Outputs never replace an input or each other: a clashing name "
                    "gets the input's extension appended (reported). Unreadable files are reported by name and "
                    "skipped. Exit status: 0 all predicted, 1 some inputs failed, 2 bad arguments, 3 bad input "
                    "(--out conflicts, damaged model file, unreachable tracking server).",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--model", required=True, help="model .safetensors file or models:/NAME@ALIAS")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--size", nargs=2, type=int, metavar=("W", "H"), default=None,
                        help="model resolution (multiples of 32); default: the model file's, else 1024 1024")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto = bf16 autocast on CUDA, fp32 on CPU; fp16 = fp16 autocast, CUDA only (for GPUs "
                             "without bf16; refused on the CPU, exit 2)")
    parser.add_argument("--no-cutout", dest="cutout", action="store_false", help="write masks only")
    parser.add_argument("--refine-foreground", action="store_true",
                        help="cut-outs get estimated foreground colours (blur fusion), so soft edges such as hair "
                             "lose the original background's tint")
    parser.add_argument("-r", "--recursive", action="store_true",
                        help="descend into sub-folders (mirrored in --out) and let ** match in globs")
    parser.add_argument("--workers", type=int, default=2, help="image decoding threads (default 2)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow --out inside an input folder and replacing files there that birefnet predict "
                             "did not write (inputs are never replaced)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``birefnet predict``: 0 every input predicted, 1 any failed, 2 bad arguments, 3 bad input."""
    from birefnet.errors import ModelFileError
    from birefnet.stages.common import EXIT_BAD_INPUT, EXIT_BAD_PARAMS, setup_logging
    from birefnet.tracking import TrackingUnavailableError

    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.refine_foreground and not args.cutout:
        parser.error("--refine-foreground changes the cut-outs' colours; it cannot be combined with --no-cutout")
    setup_logging(args.quiet)
    try:
        # A registered model first, before torch and the model code load: an unreachable server fails in seconds.
        model = resolve_model_file(args.model) if str(args.model).startswith("models:/") else args.model
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        report = predict_files(args.inputs, model, args.out, size=args.size, batch_size=args.batch_size,
                               device=device, precision=args.precision, cutout=args.cutout,
                               recursive=args.recursive, progress=args.progress, workers=args.workers,
                               overwrite=args.overwrite, refine_foreground=args.refine_foreground)
    except (ModelFileError, PredictInputError, TrackingUnavailableError) as exc:
        print(f"birefnet predict: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FileNotFoundError, ValueError) as exc:
        print(f"birefnet predict: {exc}", file=sys.stderr)
        return EXIT_BAD_PARAMS
    print(report.summary(), file=sys.stderr if report.failures else sys.stdout)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
