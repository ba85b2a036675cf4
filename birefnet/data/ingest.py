"""Ingest: find image/mask pairs, validate every one, and describe the accepted ones in a manifest.

Layouts under the dataset root:

* DIS5K: ``<root>/<set>/im/<name>.<ext>`` and ``<root>/<set>/gt/<name>.<ext>`` for each set;
* generic: ``<root>/im/`` and ``<root>/gt/`` directly; the set is named after the root folder.

Images and masks pair by file stem (any supported extension, case-insensitive). Every problem is a
:class:`BadSample` with the file and the reason; the caller fails or quarantines as params say, and
nothing is dropped without being listed.
"""

from __future__ import annotations

import json
import multiprocessing
import unicodedata
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from birefnet.data.io import IMAGE_EXTENSIONS, ImageReadError, load_image, load_mask
from birefnet.hashing import sha256_file

# forkserver, not fork: a fork of a process that already ran OpenCV or torch thread pools can deadlock.
_POOL_CONTEXT = multiprocessing.get_context("forkserver")


@dataclass(frozen=True)
class BadSample:
    """A rejected file: which set, which file, why."""

    set: str
    file: str
    reason: str


@dataclass(frozen=True)
class Candidate:
    """An image/mask pair to validate."""

    set: str
    split: str
    key: str
    image: str
    mask: str


@dataclass
class IngestResult:
    """Accepted samples (manifest records), rejected files, and what was not considered at all."""

    records: list[dict[str, Any]] = field(default_factory=list)
    bad: list[BadSample] = field(default_factory=list)
    ignored_sets: list[str] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)


def class_name_from_stem(stem: str) -> str | None:
    """DIS5K encodes the class as the fourth ``#`` field: ``1#Accessories#1#Bag#...`` -> ``Bag``."""
    parts = stem.split("#")
    return parts[3] if len(parts) >= 5 and parts[3] else None


def discover_sets(root: Path) -> dict[str, Path]:
    """Map set name -> set folder (holding ``im/`` and ``gt/``)."""
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist or is not a folder (data.root)")
    if (root / "im").is_dir() or (root / "gt").is_dir():
        return {root.resolve().name: root}
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and ((p / "im").is_dir() or (p / "gt").is_dir())}


def _list_folder(folder: Path, set_name: str, kind: str, bad: list[BadSample],
                 ignored: list[str]) -> dict[str, Path]:
    """Stem -> file for one ``im/`` or ``gt/`` folder; duplicates and unsupported files become bad samples."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        bad.append(BadSample(set_name, str(folder), f"{kind} folder is missing"))
        return found
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            ignored.append(str(path))
            continue
        if path.is_dir():
            ignored.append(str(path))
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            bad.append(BadSample(set_name, str(path),
                                 f"unsupported file extension {path.suffix!r} in {kind}/; expected one of "
                                 f"{', '.join(IMAGE_EXTENSIONS)}"))
            continue
        stem = unicodedata.normalize("NFC", path.stem)
        if stem in found:
            bad.append(BadSample(set_name, str(path),
                                 f"duplicate stem {stem!r} in {kind}/ (also {found[stem].name}); cannot pair"))
            continue
        found[stem] = path
    return found


def find_candidates(root: Path, split_of: dict[str, str]) -> tuple[list[Candidate], IngestResult]:
    """Pair images and masks in every listed set.

    Args:
        root: dataset root.
        split_of: set name -> split ("train", "val", "test") for every set the params list.

    Raises:
        FileNotFoundError: the root is missing, or a listed set is not under it.
    """
    result = IngestResult()
    sets = discover_sets(root)
    missing = [s for s in split_of if s not in sets]
    if missing:
        raise FileNotFoundError(
            f"sets {missing} are listed in data.train_sets/val_sets/test_sets but not found under {root} "
            f"(found: {sorted(sets) or 'none'}; each set needs im/ and gt/ folders)")
    result.ignored_sets = sorted(s for s in sets if s not in split_of)
    candidates: list[Candidate] = []
    for set_name, split in split_of.items():
        folder = sets[set_name]
        images = _list_folder(folder / "im", set_name, "im", result.bad, result.ignored_files)
        masks = _list_folder(folder / "gt", set_name, "gt", result.bad, result.ignored_files)
        for stem in sorted(set(images) | set(masks)):
            if stem not in masks:
                result.bad.append(BadSample(set_name, str(images[stem]),
                                            f"orphan image: no mask with stem {stem!r} in {folder / 'gt'}"))
            elif stem not in images:
                result.bad.append(BadSample(set_name, str(masks[stem]),
                                            f"orphan mask: no image with stem {stem!r} in {folder / 'im'}"))
            else:
                candidates.append(Candidate(set_name, split, stem, str(images[stem]), str(masks[stem])))
    return candidates, result


def validate_candidate(cand: Candidate, max_pixels: int) -> dict[str, Any] | BadSample:
    """Decode both files fully and check them; return a manifest record or the reason for rejection."""
    try:
        image = load_image(cand.image, max_pixels)
    except ImageReadError as exc:
        return BadSample(cand.set, cand.image, exc.reason)
    try:
        mask = load_mask(cand.mask, max_pixels)
    except ImageReadError as exc:
        return BadSample(cand.set, cand.mask, exc.reason)
    ih, iw = image.shape[:2]
    mh, mw = mask.shape[:2]
    if (ih, iw) != (mh, mw):
        return BadSample(cand.set, cand.mask,
                         f"mask size {mw}x{mh} differs from image size {iw}x{ih} ({Path(cand.image).name})")
    return {
        "set": cand.set,
        "split": cand.split,
        "key": cand.key,
        "image": cand.image,
        "mask": cand.mask,
        "width": iw,
        "height": ih,
        "class_name": class_name_from_stem(cand.key),
        "class_id": -1,
        "image_sha256": sha256_file(cand.image),
        "mask_sha256": sha256_file(cand.mask),
    }


def _validate_job(job: tuple[Candidate, int]) -> dict[str, Any] | BadSample:
    return validate_candidate(*job)


def validate_all(candidates: list[Candidate], max_pixels: int, workers: int,
                 progress: Iterable[Any] | None = None) -> list[dict[str, Any] | BadSample]:
    """Validate candidates (in ``workers`` processes when > 1), in input order."""
    jobs = [(c, max_pixels) for c in candidates]
    if workers > 1 and len(jobs) > 8:
        with ProcessPoolExecutor(max_workers=workers, mp_context=_POOL_CONTEXT) as pool:
            results = []
            for r in pool.map(_validate_job, jobs, chunksize=8):
                results.append(r)
                if progress is not None:
                    progress.update()  # type: ignore[attr-defined]
            return results
    results = []
    for job in jobs:
        results.append(_validate_job(job))
        if progress is not None:
            progress.update()  # type: ignore[attr-defined]
    return results


def assign_class_ids(records: list[dict[str, Any]]) -> list[str]:
    """Class ids = index in the sorted class names of the training split (as upstream's sorted DIS5K-TR list).

    Samples of other splits whose class is not a training class keep id -1.
    """
    classes = sorted({r["class_name"] for r in records if r["split"] == "train" and r["class_name"]})
    index = {name: i for i, name in enumerate(classes)}
    for r in records:
        r["class_id"] = index.get(r["class_name"], -1) if r["class_name"] else -1
    return classes


OUTPUT_NAMES = ("classes.json", "quarantine.json", "manifest.jsonl")
"""The stage's outputs in ``data.prepared``, in publication order: the manifest (readers' entry point) last."""


def output_paths(out_dir: Path) -> list[Path]:
    """The ingest outputs under ``out_dir``, in publication order (see :data:`OUTPUT_NAMES`)."""
    return [Path(out_dir) / name for name in OUTPUT_NAMES]


def write_outputs(out_dir: Path, result: IngestResult, root: Path) -> None:
    """Write ``manifest.jsonl``, ``classes.json`` and ``quarantine.json`` into ``out_dir``, all three or none.

    They are staged under temporary names and published together (:class:`birefnet.publish.OutputSet`), so a
    killed run leaves either the previous three files or the new three, never a new manifest beside an old
    class list.
    """
    from birefnet.publish import OutputSet

    counts: dict[str, dict[str, int]] = {}
    for r in result.records:
        counts.setdefault(r["set"], {"accepted": 0, "rejected": 0})["accepted"] += 1
    for b in result.bad:
        counts.setdefault(b.set, {"accepted": 0, "rejected": 0})["rejected"] += 1
    report = {
        "root": str(root),
        "accepted": len(result.records),
        "rejected": len(result.bad),
        "per_set": counts,
        "entries": [asdict(b) for b in result.bad],
        "ignored_sets": result.ignored_sets,
        "ignored_files": result.ignored_files,
    }
    texts = {
        "manifest.jsonl": "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in result.records),
        "classes.json": json.dumps(result.classes, ensure_ascii=False, indent=1) + "\n",
        "quarantine.json": json.dumps(report, ensure_ascii=False, indent=1) + "\n",
    }
    targets = output_paths(out_dir)
    with OutputSet("ingest", targets) as outputs:
        for target in targets:
            outputs.staged(target).write_text(texts[target.name], encoding="utf-8")
