"""Benchmark inference seconds per image: PyTorch (both deformable-conv kernels) vs onnxruntime, side by side.

One process, one model (random weights unless ``--model`` is given), the same input for every backend:

    python benchmarks/predict.py --encoder swin_v1_t --size 1024 --threads 1 --repeats 3

Backends: ``torch-torchvision`` and ``torch-sampling`` (``BiRefNet.set_deform_impl``), ``onnxruntime`` (the
graph ``birefnet export onnx`` writes: sampling kernel, dynamic batch, fixed H/W) and, with
``--dynamic-hw``, ``onnxruntime-dynamic`` (dynamic H/W too). Times are the model's forward pass on a
``(1, 3, H, W)`` input (pre/post-processing is the same numpy/torch code for every backend), medians over
``--repeats`` after ``--warmup`` untimed runs; the ratio column divides by the first backend's median.
``--device cuda`` times PyTorch on the GPU (bf16 autocast with ``--dtype bf16``) and onnxruntime with the
CUDA execution provider when it is installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BACKENDS = ("torch-torchvision", "torch-sampling", "onnxruntime", "onnxruntime-dynamic")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="swin_v1_l", help="ModelParams.encoder (random weights)")
    parser.add_argument("--model", default=None, help="a .safetensors model instead of --encoder")
    parser.add_argument("--size", type=int, default=1024, help="square side (multiple of 32)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch and onnxruntime")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per backend")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--backends", default="torch-torchvision,torch-sampling,onnxruntime",
                        help=f"comma-separated subset of {','.join(BACKENDS)}")
    parser.add_argument("--dynamic-hw", action="store_true", help="also time onnxruntime-dynamic")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="PyTorch autocast dtype")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    return parser


def time_runs(run: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``run`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: backend, median s/image, min, ratio to the first row."""
    base = rows[0]["median_s"] if rows else float("nan")
    lines = ["| backend | median s/image | min s | runs | ratio |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['backend']} | {row['median_s']:.3f} | {row['min_s']:.3f} | {row['runs']} | "
                     f"{row['median_s'] / base:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    import torch

    from birefnet.config import ModelParams
    from birefnet.inference.export import export_onnx
    from birefnet.models import build_model, load_model
    from birefnet.precision import autocast_for

    torch.set_num_threads(args.threads)
    backends = [b for b in args.backends.split(",") if b]
    if args.dynamic_hw and "onnxruntime-dynamic" not in backends:
        backends.append("onnxruntime-dynamic")
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        print(f"unknown backends {sorted(unknown)}; choose from {BACKENDS}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if args.model:
        model = load_model(args.model)
        label = Path(args.model).name
    else:
        model = build_model(ModelParams(encoder=args.encoder)).eval()
        label = f"{args.encoder} (random weights)"
    device = torch.device(args.device)
    image = torch.randn(1, 3, args.size, args.size)
    rows: list[dict[str, Any]] = []
    print(f"# {label}, {args.size}x{args.size}, {args.device}, threads={args.threads}, torch {torch.__version__}",
          flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            if backend.startswith("torch-"):
                model.set_deform_impl(backend.removeprefix("torch-"))  # type: ignore[arg-type]
                model.to(device)
                x = image.to(device)

                def run(x: torch.Tensor = x) -> None:
                    with torch.inference_mode(), autocast_for(device, "bf16" if args.dtype == "bf16" else "fp32"):
                        model(x).logits.float().cpu()
                extra: dict[str, Any] = {}
            else:
                import onnxruntime as ort

                model.cpu()
                dynamic = backend == "onnxruntime-dynamic"
                path = Path(tmp) / f"{backend}.onnx"
                start = time.perf_counter()
                export_onnx(model, path, (args.size, args.size), dynamic_hw=dynamic)
                options = ort.SessionOptions()
                options.intra_op_num_threads = args.threads
                options.inter_op_num_threads = 1
                providers = ["CPUExecutionProvider"]
                if args.device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
                    providers.insert(0, "CUDAExecutionProvider")
                session = ort.InferenceSession(str(path), options, providers=providers)
                extra = {"export_and_load_s": round(time.perf_counter() - start, 1), "providers": providers}
                feed = {"image": image.numpy()}

                def run(session: Any = session, feed: dict[str, Any] = feed) -> None:
                    session.run(None, feed)
            times = time_runs(run, args.repeats, args.warmup)
            row = {"backend": backend, "median_s": statistics.median(times), "min_s": min(times),
                   "runs": len(times), "times_s": times, **extra}
            rows.append(row)
            print(f"{backend}: median {row['median_s']:.3f} s {extra or ''}", flush=True)
    print()
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
