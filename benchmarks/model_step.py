r"""Benchmark BiRefNet forward and forward+backward time and peak memory per image.

Each configuration runs in a fresh subprocess (clean peak-memory accounting), with random weights:

    python benchmarks/model_step.py --encoder swin_v1_t --sizes 512,1024 --threads 2 --impls torchvision,sampling

On CUDA, ``--device cuda --dtype bf16 --channels-last --compile`` select the GPU options (``--channels-last``
applies on CPU too); the Swin encoder's window attention goes through ``F.scaled_dot_product_attention`` on
CUDA and without autograd, the stated softmax when training on a CPU (``SdpaWindowAttention``;
``benchmarks/swin_attention.py`` compares both).
The table reports medians over ``--repeats`` timed steps (after ``--warmup``) and, per size and mode, the
ratio of every implementation's time to the first one listed in ``--impls``. A configuration that fails (out of
memory, no CUDA device) shows its error in its row, and the script then exits with status 1.

An implementation name may carry ``:plain``: the model then runs every layer as stated, without the exact
rewrites that compute kernels from the weights (``BiRefNet.set_computed_kernels``: composed inward-reference
embeddings, per-branch ASPP projections, the final head folded ahead of the upsampling; same parameters and
outputs), e.g. the default model:

    python benchmarks/model_step.py --encoder resnet10t --sizes 320 --batch 2 --modes train --channels-last \
        --impls sampling:plain,sampling --set multiscale_input=none --set attention=none --set drop_path_rate=0
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default after its help."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--encoder", default="swin_v1_t", help="ModelParams.encoder")
    parser.add_argument("--sizes", default="512,1024", help="comma-separated square sides or HxW")
    parser.add_argument("--batch", type=int, default=1, help="images per step (>= 2 for BatchNorm in training)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--impls", default="torchvision,sampling",
                        help="deformable conv implementations to compare; NAME:plain runs every layer as stated "
                             "(no composed embeddings, no per-branch ASPP projection, no folded final head)")
    parser.add_argument("--modes", default="eval,train", help="eval (forward, no grad) and/or train (fwd+loss+bwd)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels_last memory format for the model and inputs (CPU or CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="other ModelParams fields, e.g. --set attention=aspp",
    )
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    return parser


def parse_size(text: str) -> tuple[int, int]:
    if "x" in text:
        height, width = text.lower().split("x")
        return int(height), int(width)
    return int(text), int(text)


def measure(config: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration (inside a subprocess) and return its timings and peak memory."""
    import torch
    import yaml

    from birefnet.config import ModelParams
    from birefnet.losses import BiRefNetLoss
    from birefnet.models import build_model

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    device = torch.device(config["device"])
    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in config["overrides"])}
    deform_impl, _, variant = config["impl"].partition(":")
    if variant not in ("", "plain"):
        raise ValueError(f"unknown implementation variant {variant!r} in {config['impl']!r} (known: plain)")
    params = ModelParams(encoder=config["encoder"], deform_impl=deform_impl, **overrides)
    model = build_model(params).to(device)
    if variant == "plain":
        model.set_computed_kernels(False)
    memory_format = torch.channels_last if config["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    runner = torch.compile(model) if config["compile"] else model
    criterion = BiRefNetLoss()
    height, width = config["size"]
    batch = config["batch"]
    image = torch.randn(batch, 3, height, width, device=device).to(memory_format=memory_format)
    target = (torch.rand(batch, 1, height, width, device=device) > 0.5).float()
    dtype = torch.bfloat16 if config["dtype"] == "bf16" else torch.float32

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if config["mode"] == "eval":
                with torch.no_grad():
                    runner(image)
                return
            total, _ = criterion(runner(image), target)
        total.backward()
        model.zero_grad(set_to_none=True)

    model.train(config["mode"] == "train")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(config["warmup"]):
        step()
    sync()
    times = []
    for _ in range(config["repeats"]):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # growth of the process peak RSS over the built model (KiB on Linux)
        peak_mb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline, 0) / 1024
    return {
        **{k: config[k] for k in ("encoder", "impl", "mode", "dtype", "batch", "threads", "device")},
        "size": f"{height}x{width}",
        "seconds_per_image": statistics.median(times) / batch,
        "all_seconds": times,
        "peak_mb": peak_mb,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def _child(config: dict[str, Any], queue: mp.Queue) -> None:
    try:
        queue.put(measure(config))
    except Exception as exc:  # reported in the table
        queue.put({**config, "error": f"{type(exc).__name__}: {exc}"})


def run_isolated(config: dict[str, Any]) -> dict[str, Any]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(config, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def format_table(rows: Sequence[dict[str, Any]], impls: Sequence[str]) -> str:
    reference: dict[tuple[str, str], float] = {}
    for row in rows:
        if row.get("impl") == impls[0] and "error" not in row:
            reference[(row["size"], row["mode"])] = row["seconds_per_image"]
    versus = "vs " + impls[0]
    header = f"{'encoder':<12} {'size':>9} {'mode':<6} {'impl':<18} {'s/img (median)':>15} {'peak MB':>9} {versus:>16}"
    lines = [header, "-" * len(header)]
    for row in rows:
        if "error" in row:
            lines.append(
                f"{row['encoder']:<12} {str(row['size']):>9} {row['mode']:<6} {row['impl']:<18} {row['error']}"
            )
            continue
        base = reference.get((row["size"], row["mode"]))
        ratio = f"{base / row['seconds_per_image']:.2f}x faster" if base else "-"
        lines.append(
            f"{row['encoder']:<12} {row['size']:>9} {row['mode']:<6} {row['impl']:<18} "
            f"{row['seconds_per_image']:>15.3f} {row['peak_mb']:>9.0f} {ratio:>16}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    impls = [s for s in args.impls.split(",") if s]
    rows = []
    for size in (parse_size(s) for s in args.sizes.split(",") if s):
        for mode in (m for m in args.modes.split(",") if m):
            for impl in impls:
                config = {
                    "encoder": args.encoder,
                    "size": size,
                    "batch": args.batch,
                    "threads": args.threads,
                    "repeats": args.repeats,
                    "warmup": args.warmup,
                    "impl": impl,
                    "mode": mode,
                    "device": args.device,
                    "dtype": args.dtype,
                    "channels_last": args.channels_last,
                    "compile": args.compile,
                    "overrides": args.overrides,
                }
                row = run_isolated(config)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "all_seconds"}), file=sys.stderr, flush=True)
    print(format_table(rows, impls))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)
    failed = sum("error" in row for row in rows)
    if failed:
        print(f"model_step: {failed} of {len(rows)} configurations failed (the error is in their row)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
