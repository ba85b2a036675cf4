"""``birefnet export onnx``: write ONNX and check it against PyTorch (library: :mod:`birefnet.inference.export`).

Exit status: 0 written (and every parity check passed), 1 a parity check failed, 2 bad arguments (a model file or
URI that does not exist, a size that is not two multiples of 32).

Usage::

    birefnet export onnx --model models/model.safetensors --out model.onnx --size 1024 1024 [--dynamic-hw]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from birefnet.inference.export import DEFAULT_OPSET, PROB_TOLERANCE


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of ``birefnet export``."""
    parser = argparse.ArgumentParser(prog="birefnet export", description="Export a model for deployment.")
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    onnx_parser = formats.add_parser(
        "onnx", help="ONNX with a dynamic batch, checked against PyTorch with onnxruntime",
        description="Export to ONNX (input 'image' (B,3,H,W) ImageNet-normalised RGB, output 'logits' "
                    "(B,1,H,W)) with the sampling deformable-convolution kernel, then compare onnxruntime with "
                    f"PyTorch on random inputs: max |sigmoid difference| must be <= {PROB_TOLERANCE:g}. "
                    "Exits 1 when a check fails.",
    )
    onnx_parser.add_argument("--model", required=True, help="model .safetensors file or models:/NAME@ALIAS")
    onnx_parser.add_argument("--out", required=True, type=Path, help="output .onnx file")
    onnx_parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    onnx_parser.add_argument("--size", nargs=2, type=int, metavar=("W", "H"), default=None,
                             help="export resolution; default: the model file's, else 1024 1024")
    onnx_parser.add_argument("--dynamic-hw", action="store_true",
                             help="dynamic height and width too (checked at a second size)")
    onnx_parser.add_argument("--tolerance", type=float, default=PROB_TOLERANCE,
                             help=f"parity bound on max |sigmoid difference| (default {PROB_TOLERANCE:g})")
    onnx_parser.add_argument("--no-check", dest="check", action="store_false", help="skip the parity check")
    onnx_parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``birefnet export onnx``; 0 on success, 1 when a parity check fails, 2 on a usage error."""
    from birefnet.inference.export import export_and_check
    from birefnet.inference.predict import model_resolution, resolve_model_file
    from birefnet.models.io import load_model
    from birefnet.stages.common import setup_logging

    args = get_args_parser().parse_args(argv)
    setup_logging(args.quiet)
    try:
        path = resolve_model_file(args.model)
        size = model_resolution(path, args.size)
    except (FileNotFoundError, ValueError) as exc:
        print(f"birefnet export: {exc}", file=sys.stderr)
        return 2
    model = load_model(path, device="cpu")
    report = export_and_check(model, args.out, size, opset=args.opset, dynamic_hw=args.dynamic_hw,
                              check=args.check, tolerance=args.tolerance)
    axes = "batch, height, width" if args.dynamic_hw else "batch"
    print(f"wrote {report.path} (opset {report.opset}, {size[0]}x{size[1]}, dynamic {axes}) "
          f"in {report.seconds:.1f} s")
    for check in report.checks:
        print(check.describe())
    if not report.ok:
        print("birefnet export: parity check failed; the ONNX file does not match PyTorch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
