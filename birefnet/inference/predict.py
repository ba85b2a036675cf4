"""Predict masks and RGBA cut-outs at original resolution: the library behind ``birefnet predict``.

Foreground extraction as in BiRefNet (Zheng et al., "Bilateral Reference for High-Resolution Dichotomous
Image Segmentation", CAAI AIR 2024), with upstream's pre- and post-processing
(:mod:`birefnet.inference.processing`). The cut-out is the original RGB with the mask as alpha; with
``refine_foreground`` its colours are the estimated foreground colours instead
(:mod:`birefnet.inference.foreground`, blur fusion as upstream's ``refine_foreground``), so soft edges do not
carry the old background. ``precision="fp16"`` runs the forward pass under fp16 autocast, which needs CUDA: on
any other device it is refused rather than silently run in another precision.

Python API: :func:`predict_files` (files, folders, globs -> PNGs on disk, bad files reported and skipped; the
file names are planned by :mod:`birefnet.inference.files`), :func:`predict_images` (in-memory arrays -> masks),
:func:`load_predictor` (a model file or ``models:/`` URI -> model and resolution) and the helpers they are built
from. The command line is :mod:`birefnet.commands.predict`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from birefnet.inference.files import (
    OutputRename,
    PredictInputError,
    PredictionFailure,
    check_existing_outputs,
    check_output_folder,
    collect_inputs,
    plan_outputs,
    write_outputs,
)
from birefnet.inference.processing import SIZE_MULTIPLE, check_size, min_model_side, postprocess, preprocess
from birefnet.precision import PRECISIONS

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

    Registered models are downloaded by :func:`birefnet.tracking.download_registered_model` (tracking and registry
    URIs from the environment, as every MLflow client) and the first ``.safetensors`` inside is used. An
    ``http(s)`` tracking or registry server is probed first, so an unreachable one fails in seconds (not after
    MLflow's minutes of retries), and MLflow's own HTTP retries are bounded for the download.

    Raises:
        FileNotFoundError: the file does not exist, or the registry has no such model, alias or version, or the
            registered model holds no ``.safetensors``.
        TrackingUnavailableError: the tracking (or registry) server does not answer; the message names its URI
            with the credentials masked.
        PredictInputError: the registry answered with another error (e.g. refused credentials).
    """
    text = str(model)
    if text.startswith("models:/"):
        from birefnet.tracking import RegistryRequestError, download_registered_model

        try:
            return download_registered_model(text)
        except RegistryRequestError as exc:
            raise PredictInputError(str(exc)) from None
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found")
    return path


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


# ------------------------------------------------------------------------------------------ in-memory images


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
    """The forward pass's autocast: fp16 on CUDA for ``fp16``, else :func:`birefnet.precision.autocast_for` (bf16
    for ``bf16``, and for ``auto`` on CUDA; none for ``fp32``). Call :func:`check_precision` first."""
    import torch

    from birefnet.precision import autocast_for

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
                    written = write_outputs(out, stem, image, mask, cutout, refine_foreground)
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
