"""``birefnet predict``: masks and RGBA cut-outs at original resolution (library: :mod:`birefnet.inference.predict`).

Outputs never replace an input, nor each other: a clashing name is changed and reported. ``--out`` equal to a
folder holding inputs, or inside a folder given as input, is refused unless ``--overwrite``; so is replacing files
in ``--out`` that an earlier run of this tool did not write. ``--precision fp16`` runs the forward pass under fp16
autocast, which needs CUDA: on any other device it is refused (exit 2) rather than silently run in another
precision.

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
import sys
from collections.abc import Sequence
from pathlib import Path

from birefnet.precision import PRECISIONS


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
    from birefnet.inference.predict import PredictInputError, predict_files, resolve_model_file
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
