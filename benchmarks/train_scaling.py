"""Training throughput with 1 and 2 Ray Train workers (DDP, gloo on CPU / NCCL on GPU), side by side.

Builds a small synthetic dataset with the real stages in a temporary folder, then trains the same config with
``train.num_workers`` 1 and 2 for a fixed number of steps per worker and prints samples/s (the steady-state
median over epochs, first epoch dropped) and the ratio. On a 2-core machine use one thread per worker, so
one worker has one core and two workers have two.

Usage::

    python benchmarks/train_scaling.py [--size 128] [--encoder resnet18] [--epochs 3] [--steps 8] [--gpu]

On CPU a third row trains one worker with two threads (the embedded default's layout) on the same cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import yaml


def build_workspace(root: Path, size: int, encoder: str, batch: int, steps: int, epochs: int, gpu: bool) -> Path:
    from birefnet.stages import gradients, ingest, shard, synthesize

    repo = Path(__file__).resolve().parents[1]
    doc = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    doc["data"].update(size=[size, size], workers=1)
    doc["data"]["synthetic"].update(counts={"DIS-TR": 64, "DIS-VD": 2, "DIS-TE1": 1, "DIS-TE2": 1, "DIS-TE3": 1,
                                            "DIS-TE4": 1}, min_side=size, max_side=size + 64)
    doc["model"]["encoder"] = encoder
    doc["loader"].update(batch_size=batch, workers=0, epoch_batches=steps)
    doc["train"].update(threads_per_worker=1, val_every=10_000, use_gpu=gpu,
                        stages=[{"name": "main", "epochs": epochs}])
    doc["data"]["val_sets"] = ["DIS-VD"]
    (root / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    old = Path.cwd()
    os.chdir(root)
    try:
        for module in (synthesize, ingest, gradients, shard):
            assert module.main(["--params", "params.yaml", "-q"]) == 0
    finally:
        os.chdir(old)
    return root


def measure(root: Path, workers: int, tag: str, threads: int = 1) -> tuple[float, list[float]]:
    from birefnet.config import load_params
    from birefnet.stages.train import run

    old = Path.cwd()
    os.chdir(root)
    try:
        params = load_params("params.yaml", [f"train.num_workers={workers}", f"train.run_name=scaling-{tag}",
                                             f"train.out=models-{tag}", f"train.threads_per_worker={threads}",
                                             f"train.cpus_per_worker={threads}"])
        summary = run(params)
    finally:
        os.chdir(old)
    rates = [h["train_samples"] * workers / h["train_seconds"] for h in summary["history"]]
    steady = rates[1:] or rates
    return statistics.median(steady), rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="steps per worker per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="birefnet-scaling-") as tmp:
        root = build_workspace(Path(tmp), args.size, args.encoder, args.batch, args.steps, args.epochs, args.gpu)
        one, one_all = measure(root, 1, "w1")
        two, two_all = measure(root, 2, "w2")
        threaded, threaded_all = (None, []) if args.gpu else measure(root, 1, "w1t2", threads=2)
    print(f"\nconfig: {args.encoder} {args.size}x{args.size}, batch {args.batch}/worker, {args.steps} steps/epoch, "
          f"{args.epochs} epochs, 1 thread per worker, {'GPU' if args.gpu else 'CPU'}")
    print(f"{'workers':>8} {'samples/s (median)':>20} {'per epoch':>30}")
    print(f"{1:>8} {one:>20.2f} {', '.join(f'{r:.2f}' for r in one_all):>30}")
    print(f"{2:>8} {two:>20.2f} {', '.join(f'{r:.2f}' for r in two_all):>30}")
    if threaded is not None:
        print(f"{'1 (x2 threads)':>8} {threaded:>20.2f} {', '.join(f'{r:.2f}' for r in threaded_all):>30}")
    print(f"scaling 2 vs 1 workers: {two / one:.2f}x")
    if threaded is not None:
        print(f"2 workers x 1 thread vs 1 worker x 2 threads (same 2 cores): {two / threaded:.2f}x")


if __name__ == "__main__":
    main()
