"""Which files ``birefnet predict`` reads and writes: inputs expanded, output names planned, outputs written.

Outputs never replace an input, nor each other: names are planned for the whole run first (:func:`plan_outputs`)
and an output that would land on an input file or on another input's output gets a new name, reported in the
log and the summary. ``--out`` equal to a folder holding inputs, or inside a folder given as input, is refused
unless ``--overwrite``. Every PNG written carries a ``Software`` text chunk naming this tool, so a rerun
replaces its own earlier outputs in ``--out`` while any other file there is only replaced with ``--overwrite``.
"""

from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from birefnet.inference.processing import make_cutout

#: Suffix of the RGBA cut-out next to each mask.
CUTOUT_SUFFIX = "_cutout"
#: Value of the ``Software`` PNG text chunk of every output: marks files a rerun may replace.
SOFTWARE_TAG = "birefnet predict"


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


def _glob_root(pattern: str) -> Path:
    """The folder a recursive glob (``photos/**/*.png``) searches: its path up to the first wildcard part."""
    parts = Path(pattern).parts
    static = list(itertools.takewhile(lambda part: not glob.has_magic(part), parts))
    return Path(*static).resolve() if static else Path.cwd().resolve()


def check_output_folder(out: str | Path, inputs: Sequence[str | Path], images: Sequence[tuple[Path, Path]],
                        overwrite: bool = False) -> None:
    """Refuse an output folder that is, or lies inside, an input folder (unless ``overwrite``).

    Input folders are the folders given as inputs and the folders a recursive glob (``**``) searches (``out``
    may be neither one of them nor inside one, where the next run would take the masks as inputs), and the
    folders holding any input image (``out`` may not be one of them).

    Raises:
        PredictInputError: the conflict, naming both folders.
    """
    if overwrite:
        return
    target = Path(out).resolve()
    given = [Path(str(item)).resolve() for item in inputs if Path(str(item)).is_dir()]
    given += [_glob_root(str(item)) for item in inputs if "**" in str(item)]
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


def write_outputs(out: Path, stem: Path, image: np.ndarray, mask: np.ndarray, cutout: bool,
                  refine_foreground: bool = False) -> list[Path]:
    """Write ``<out>/<stem>.png`` (the mask) and, with ``cutout``, ``<out>/<stem>_cutout.png``, both tagged
    :data:`SOFTWARE_TAG`.

    Args:
        out: the output folder.
        stem: the planned output stem, relative to ``out`` (see :func:`plan_outputs`).
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` uint8.
        cutout: also write the RGBA cut-out.
        refine_foreground: the cut-out gets estimated foreground colours (see
            :func:`birefnet.inference.processing.make_cutout`).

    Returns:
        The files written, mask first.
    """
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
