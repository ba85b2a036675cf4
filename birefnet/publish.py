"""All-or-nothing publication of a stage's outputs (files or folders), with a commit journal.

A stage writes every output under a temporary name beside its final path (same folder, so the same
filesystem), then :meth:`OutputSet.commit` publishes them:

1. every staged output is flushed to disk;
2. the journal ``<journal_dir>/.<stage>.publish.json`` (the list of outputs) is written and renamed into
   place: this is the commit point. Before it, the previous outputs are untouched; after it, the new set is
   complete on disk and only has to be renamed in;
3. the previous outputs are moved aside, the last output (the one readers treat as the summary, e.g.
   ``train.json``) first, so a new model never sits beside an old summary;
4. the new outputs are renamed into place, the summary last; the old ones and the journal are removed.

A process killed in steps 3-4 leaves some outputs missing (never old beside new) and the journal behind;
:func:`finish_pending` (called by the stage when it starts again, and by readers of the outputs) finishes
the renames. A process killed before the commit point leaves only temporary names, removed on the next run.

Test hook: ``BIREFNET_TEST_CRASH_AT=<stage>:<point>`` makes the process exit with status 137 at that point
(``staged``, ``committed``, ``aside<N>``, ``swap<N>``; N counts from 1), as a killed stage would. The registry
uses the same hook with stage ``register`` (:func:`birefnet.registry.gate.fault_point`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger("birefnet.publish")

CRASH_ENV = "BIREFNET_TEST_CRASH_AT"
JOURNAL_PATTERN = ".{stage}.publish.json"
NEW_SUFFIX = "-new"
OLD_SUFFIX = "-old"


class PublishError(RuntimeError):
    """A journal that cannot be read or applied; the message names it."""


def crash_point(stage: str, point: str) -> None:
    """Exit at once with status 137 when ``BIREFNET_TEST_CRASH_AT`` is ``<stage>:<point>`` (test hook).

    ``os._exit`` skips every ``finally`` and ``atexit`` handler, as a SIGKILL would.
    """
    if os.environ.get(CRASH_ENV) == f"{stage}:{point}":
        os._exit(137)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename order still holds
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    files: Iterator[Path] = path.rglob("*") if path.is_dir() else iter([path])
    for file in files:
        if file.is_file() and not file.is_symlink():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    if path.is_dir():
        for folder in [path, *(p for p in path.rglob("*") if p.is_dir())]:
            _fsync_dir(folder)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def staged_path(target: Path, stage: str) -> Path:
    """The temporary name a new version of ``target`` is written under (hidden, in the same folder)."""
    return target.with_name(f".{target.name}.{stage}{NEW_SUFFIX}")


def aside_path(target: Path, stage: str) -> Path:
    """The temporary name the previous version of ``target`` is moved to while the new one is renamed in."""
    return target.with_name(f".{target.name}.{stage}{OLD_SUFFIX}")


def journal_path(journal_dir: Path, stage: str) -> Path:
    """The commit journal of ``stage`` in ``journal_dir``."""
    return Path(journal_dir) / JOURNAL_PATTERN.format(stage=stage)


def _apply(journal: Path) -> list[Path]:
    """Finish a committed publication (idempotent); return the outputs now in place."""
    try:
        doc = json.loads(journal.read_text(encoding="utf-8"))
        stage = str(doc["stage"])
        targets = [journal.parent / rel for rel in doc["targets"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PublishError(f"{journal}: unreadable publish journal ({exc}); remove it and rerun the stage") from None
    # Move the previous outputs aside, the summary (last target) first. A target whose staged version is gone
    # was already renamed in by an earlier, interrupted pass: it is new and stays.
    for number, target in enumerate(reversed(targets), 1):
        new, old = staged_path(target, stage), aside_path(target, stage)
        if new.exists() and (target.exists() or target.is_symlink()):
            _remove(old)
            os.replace(target, old)
        crash_point(stage, f"aside{number}")
    for number, target in enumerate(targets, 1):
        new = staged_path(target, stage)
        if new.exists():
            os.replace(new, target)
            _fsync_dir(target.parent)
        elif not target.exists():
            raise PublishError(f"{journal}: neither {target} nor its staged version {new} exists; the outputs of "
                               f"stage {stage} are incomplete: rerun it")
        crash_point(stage, f"swap{number}")
    for target in targets:
        _remove(aside_path(target, stage))
    journal.unlink()
    _fsync_dir(journal.parent)
    return targets


def finish_pending(folder: str | Path) -> list[Path]:
    """Finish every committed but interrupted publication whose journal is in ``folder``.

    Readers call this before they read a stage's outputs: after a crash past the commit point, the new outputs
    are complete on disk under their temporary names and are renamed in here.

    Returns:
        The outputs put in place (empty when nothing was pending).

    Raises:
        PublishError: a journal that cannot be read, or that names outputs which are gone.
    """
    folder = Path(folder)
    done: list[Path] = []
    if not folder.is_dir():
        return done
    for journal in sorted(folder.glob(JOURNAL_PATTERN.format(stage="*"))):
        log.warning("finishing the interrupted publication recorded in %s", journal)
        done += _apply(journal)
    return done


class OutputSet:
    """The outputs of one stage run, published all together or not at all.

    Usage::

        with OutputSet("train", [model, history, summary]) as outputs:
            shutil.copyfile(best, outputs.staged(model))
            outputs.staged(summary).write_text(...)
        # all three are in place here; on an exception nothing changed and the temporaries are gone

    Args:
        stage: the stage name (temporary names, journal, crash hook).
        targets: the final paths, files or folders, in publication order: readers' entry point (the summary
            that describes the others) last.
        journal_dir: where the commit journal goes (default: the last target's folder).
    """

    def __init__(self, stage: str, targets: Sequence[str | Path], journal_dir: str | Path | None = None) -> None:
        if not targets:
            raise ValueError("an output set needs at least one target")
        self.stage = stage
        self.targets = [Path(t) for t in targets]
        self.journal_dir = Path(journal_dir) if journal_dir is not None else self.targets[-1].parent
        self.journal = journal_path(self.journal_dir, stage)
        self.committed = False

    def staged(self, target: str | Path) -> Path:
        """Where to write the new version of ``target`` (a file or a folder, created by the caller)."""
        target = Path(target)
        if target not in self.targets:
            raise KeyError(f"{target} is not an output of stage {self.stage} ({[str(t) for t in self.targets]})")
        return staged_path(target, self.stage)

    def __enter__(self) -> OutputSet:
        if self.journal.exists():
            log.warning("stage %s: finishing the publication a killed run left in %s", self.stage, self.journal)
            _apply(self.journal)
        self.discard()
        for target in self.targets:
            target.parent.mkdir(parents=True, exist_ok=True)
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        elif not self.committed:
            self.discard()

    def discard(self) -> None:
        """Remove the staged (uncommitted) versions."""
        for target in self.targets:
            _remove(staged_path(target, self.stage))

    def commit(self) -> None:
        """Publish every staged output (see the module docstring for the steps and their guarantees).

        Raises:
            PublishError: an output was not staged.
        """
        missing = [str(t) for t in self.targets if not staged_path(t, self.stage).exists()]
        if missing:
            self.discard()
            raise PublishError(f"stage {self.stage}: outputs {missing} were not written; nothing was published")
        for target in self.targets:
            _fsync_tree(staged_path(target, self.stage))
            _fsync_dir(target.parent)
        crash_point(self.stage, "staged")
        rel = [os.path.relpath(t, self.journal_dir) for t in self.targets]
        _write_atomic(self.journal, json.dumps({"stage": self.stage, "targets": rel}, indent=1) + "\n")
        self.committed = True
        crash_point(self.stage, "committed")
        _apply(self.journal)


def retract(stage: str, targets: Sequence[str | Path], journal_dir: str | Path | None = None) -> list[Path]:
    """Remove a stage's previous outputs (after a failed run, so no later stage reads stale ones).

    The readers' entry point (the last target) goes first; a pending journal and any temporaries go too.

    Args:
        stage: the stage name.
        targets: the final paths, in publication order (as given to :class:`OutputSet`).
        journal_dir: where the stage's journal lives (default: the last target's folder).

    Returns:
        The outputs that existed and were removed.
    """
    paths = [Path(t) for t in targets]
    journal = journal_path(Path(journal_dir) if journal_dir is not None else paths[-1].parent, stage)
    removed: list[Path] = []
    for target in reversed(paths):
        if target.exists() or target.is_symlink():
            _remove(target)
            removed.append(target)
    journal.unlink(missing_ok=True)
    for target in paths:
        _remove(staged_path(target, stage))
        _remove(aside_path(target, stage))
    if paths:
        _fsync_dir(paths[-1].parent)
    return removed
