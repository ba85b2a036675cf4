"""Shared command-line plumbing for stage modules: ``--params``/``--set`` and exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from birefnet.config import Params, ParamsError, load_params

EXIT_BAD_PARAMS = 2
EXIT_BAD_INPUT = 3

log = logging.getLogger("birefnet")


class StageInputError(RuntimeError):
    """Bad input data (a file, a key, a value): the message names it. Exit code 3."""


def add_params_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--params PATH`` and repeatable ``--set key.path=value`` to a stage parser."""
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params file to read (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one parameter, validated like the file (repeatable), "
                             "e.g. --set data.size=[512,512]")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress bars")
    return parser


def setup_logging(quiet: bool = False) -> None:
    """Configure console logging once, from an entry point (never at import)."""
    level = logging.WARNING if quiet else logging.INFO
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("birefnet").setLevel(level)


def load_or_exit(args: argparse.Namespace) -> Params | int:
    """Load params for a stage; on error print the message and return the exit code instead."""
    try:
        return load_params(args.params, args.overrides)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_PARAMS


def run_stage(name: str, func, args: argparse.Namespace,  # noqa: ANN001
              input_errors: tuple[type[Exception], ...] = ()) -> int:
    """Load params, then call ``func(params, args)``; map known errors to exit codes with clear messages.

    :class:`StageInputError`, and the library errors a command names in ``input_errors`` (e.g. the registry's
    ``RegistryError``), exit with ``EXIT_BAD_INPUT``; :class:`ParamsError` with ``EXIT_BAD_PARAMS``.
    """
    setup_logging(getattr(args, "quiet", False))
    params = load_or_exit(args)
    if isinstance(params, int):
        return params
    try:
        func(params, args)
    except (StageInputError, *input_errors) as exc:
        print(f"error: {name}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_PARAMS
    return 0


MANIFEST_FIELDS = ("set", "key", "image", "mask")


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Records of an ingest manifest (``<data.prepared>/manifest.jsonl``), one per line.

    A publication of the ingest outputs that a killed run left half done is finished first
    (:func:`birefnet.publish.finish_pending`), so the manifest read is always one a whole ingest run wrote.

    Raises:
        StageInputError: missing file, or a line that is not a JSON object with the required fields.
    """
    from birefnet.publish import PublishError, finish_pending

    path = Path(path)
    try:
        finish_pending(path.parent)
    except PublishError as exc:
        raise StageInputError(str(exc)) from None
    if not path.is_file():
        raise StageInputError(f"{path}: manifest not found (run `birefnet ingest` first; a failed ingest removes "
                              "the previous manifest)")
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StageInputError(f"{path}:{number}: not JSON ({exc})") from None
            missing = [k for k in MANIFEST_FIELDS if k not in record] if isinstance(record, dict) \
                else list(MANIFEST_FIELDS)
            if missing:
                raise StageInputError(f"{path}:{number}: missing field(s) {missing}")
            records.append(record)
    return records
