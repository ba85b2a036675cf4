"""Benchmark the optimizer step of the training loop: the fused Adam/AdamW kernel against the multi-tensor one.

The training loop clips the global gradient norm and then steps the optimizer; both are timed together, over
the parameters of the model that ``params.yaml`` builds, with random gradients. Both kernels run side by side
in one process, alternating, for each thread count:

    python benchmarks/optimizer_step.py --threads 1,2 --repeats 30

It prints the median milliseconds per step and the ratio multi-tensor / fused (above 1: fused is faster).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_ms_alternating, params_parser  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    return params_parser(__doc__, repeats=30, warmup=5)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from birefnet.config import load_params
    from birefnet.models import build_model
    from birefnet.training.trainer import make_optimizer

    params = load_params(args.params, args.set)
    torch.manual_seed(0)
    models = {kind: build_model(params.model) for kind in ("multi-tensor", "fused")}
    optimizers = {"fused": make_optimizer(models["fused"], params)}
    kind = torch.optim.AdamW if params.train.optimizer == "adamw" else torch.optim.Adam
    optimizers["multi-tensor"] = kind(models["multi-tensor"].parameters(), lr=params.train.lr,
                                      betas=params.train.betas, weight_decay=params.train.weight_decay, foreach=True)
    assert optimizers["fused"].param_groups[0]["fused"], "make_optimizer did not pick the fused kernel"
    n = sum(p.numel() for p in models["fused"].parameters())
    for model in models.values():
        for p in model.parameters():
            p.grad = torch.randn_like(p)
    clip = params.train.grad_clip or 1.0
    print(f"{params.model.encoder}: {n / 1e6:.2f} M parameters, {params.train.optimizer}, clip {clip}")
    print(f"{'threads':>7} {'multi-tensor ms':>16} {'fused ms':>9} {'ratio':>6}")
    parameters = {name: list(model.parameters()) for name, model in models.items()}

    def step(name: str) -> None:
        torch.nn.utils.clip_grad_norm_(parameters[name], clip)
        optimizers[name].step()

    steps = {name: functools.partial(step, name) for name in optimizers}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        medians = median_ms_alternating(steps, args.warmup, args.repeats)
        multi, fused = medians["multi-tensor"], medians["fused"]
        print(f"{threads:>7} {multi:>16.2f} {fused:>9.2f} {multi / fused:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
