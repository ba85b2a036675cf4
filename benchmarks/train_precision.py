"""Benchmark one CPU training step in fp32 against bf16 autocast, side by side.

A step is ``train_one_epoch`` over one batch: forward (under autocast for bf16), the BiRefNet loss (always
fp32), backward, gradient clipping and the optimizer step. Two copies of the model that ``params.yaml`` builds
(same initial weights, channels_last when the params ask for it) alternate step by step in one process, for
every thread count and image side:

    python benchmarks/train_precision.py --threads 1,2 --sizes 192,256,320 --repeats 15

It prints the median milliseconds per step of each and the ratio fp32 / bf16 (above 1: bf16 is faster). bf16
only pays off on CPUs with native bf16 kernels (AVX512-BF16 or AMX; the script says whether this one has
them); elsewhere it is emulated and slower.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_ms_alternating, params_parser  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = params_parser(__doc__, repeats=15, warmup=3)
    parser.add_argument("--sizes", default="192,256,320", help="comma-separated square image sides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    import torch

    from birefnet.config import load_params
    from birefnet.models import build_model
    from birefnet.training.criterion import build_criterion
    from birefnet.training.engine import native_cpu_bf16, train_one_epoch
    from birefnet.training.schedule import Schedule
    from birefnet.training.trainer import make_optimizer

    params = load_params(args.params, args.set)
    torch.manual_seed(0)
    base = build_model(params.model)
    channels_last = params.train.channels_last
    models = {p: copy.deepcopy(base).to(memory_format=torch.channels_last if channels_last else
                                         torch.contiguous_format) for p in ("fp32", "bf16")}
    optimizers = {p: make_optimizer(m, params) for p, m in models.items()}
    criterion = build_criterion()
    at = Schedule(params.train).at(0)
    batch_size = params.loader.batch_size
    device = torch.device("cpu")
    print(f"{params.model.encoder}, batch {batch_size}, channels_last {channels_last}; "
          f"native bf16 kernels on this CPU: {native_cpu_bf16()}")
    print(f"{'threads':>7} {'size':>5} {'fp32 ms':>8} {'bf16 ms':>8} {'ratio':>6}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for side in (int(s) for s in args.sizes.split(",")):
            gen = torch.Generator().manual_seed(side)
            batch = {"image": torch.randn(batch_size, 3, side, side, generator=gen),
                     "gradient": torch.rand(batch_size, 1, side, side, generator=gen),
                     "mask": (torch.rand(batch_size, 1, side, side, generator=gen) > 0.8).float()}

            def step(precision: str, batch: dict = batch) -> None:
                # one batch through the training loop itself: forward, loss, backward, clipping, optimizer step
                train_one_epoch(models[precision], [batch], optimizers[precision], criterion, device=device,
                                weights=at.weights, supervise=at.stage.supervise, lr=at.lr, precision=precision,
                                grad_clip=params.train.grad_clip or 1.0, channels_last=channels_last)

            medians = median_ms_alternating({p: functools.partial(step, p) for p in models}, args.warmup,
                                            args.repeats)
            fp32, bf16 = medians["fp32"], medians["bf16"]
            print(f"{threads:>7} {side:>5} {fp32:>8.1f} {bf16:>8.1f} {fp32 / bf16:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
