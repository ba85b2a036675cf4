"""``birefnet convert-upstream IN OUT.safetensors [--set model.key=value]``: upstream BiRefNet weights to ours.

Converts a published BiRefNet checkpoint (Zheng et al., CAAI AIR 2024; a release ``.pth`` or a Hugging Face
``model.safetensors``) with :func:`birefnet.models.convert.convert_checkpoint`. ``--set`` overrides are parsed
and validated like ``params.yaml``'s ``model`` group (:class:`birefnet.config.ModelParams`), so an invalid one
names its key, the expected value and the given value.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from birefnet.config import ModelParams, ParamsError, apply_overrides, format_validation_error
from birefnet.models.config import ModelConfig


def resolve_params(inferred: Mapping[str, Any], overrides: Sequence[str] = ()) -> ModelConfig:
    """The config of inferred fields plus ``model.key=value`` overrides (values parsed as YAML, validated).

    Raises:
        ParamsError: an override outside ``model.*``, or an invalid value (key, expected and given named).
    """
    for text in overrides:
        if not text.split("=", 1)[0].strip().startswith("model."):
            raise ParamsError(f"override {text!r}: convert-upstream only accepts model.* keys")
    doc = apply_overrides({"model": dict(inferred)}, list(overrides))
    try:
        return ModelParams.model_validate(doc["model"]).to_config()
    except ValidationError as exc:
        raise ParamsError(format_validation_error(exc, "convert-upstream")) from None


def get_args_parser() -> argparse.ArgumentParser:
    """The command's arguments: SOURCE, TARGET and repeatable ``--set model.KEY=VALUE``."""
    parser = argparse.ArgumentParser(
        prog="birefnet convert-upstream",
        description="Convert a published BiRefNet checkpoint (upstream layout: a release .pth or a Hugging Face "
                    "model.safetensors; Swin or PVT-v2 backbone) to a birefnet safetensors file carrying its model "
                    "params. The format is read from the file's content, not its extension.",
    )
    parser.add_argument("source", type=Path, help="upstream checkpoint (.pth loaded with weights_only=True, or "
                                                  "model.safetensors)")
    parser.add_argument("target", type=Path, help="output .safetensors")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="model.KEY=VALUE",
        help="override an inferred model param (repeatable), e.g. --set model.deform_impl=torchvision",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 written, 2 bad arguments (missing source, invalid override), 3 a source file that cannot be
    converted (unreadable, foreign, already ours, or tensors that do not fit the inferred architecture)."""
    from birefnet.models.convert import convert_checkpoint

    args = get_args_parser().parse_args(argv)
    if not args.source.is_file():
        print(f"convert-upstream: {args.source}: no such file", file=sys.stderr)
        return 2
    try:
        config, path = convert_checkpoint(args.source, args.target,
                                          lambda inferred: resolve_params(inferred, args.overrides))
    except ParamsError as exc:
        print(f"convert-upstream: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as exc:
        print(f"convert-upstream: {exc}", file=sys.stderr)
        return 3
    print(f"wrote {path} ({config.encoder}, {config.to_json()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
