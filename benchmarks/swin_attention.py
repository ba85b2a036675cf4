r"""Swin window attention: ``F.scaled_dot_product_attention`` (the default) against the stated softmax path.

Times the Swin encoder's forward+backward (``--mode train``) or forward without autograd (``--mode infer``) on
one image, the two paths alternating step by step in one process (medians and the ratio stated/SDPA), then
measures each path's peak memory in a fresh subprocess: on CUDA ``torch.cuda.max_memory_allocated``, on CPU the
growth of the process's peak resident set over the step (``ru_maxrss`` after the step minus before it, model and
input already built).

In training the attention mask carries the learnable relative-position bias, so it needs a gradient: PyTorch's
fused CPU kernel does not take one and SDPA runs its reference maths there (on CUDA the memory-efficient kernel
does). Without autograd the fused CPU kernel runs.

    python benchmarks/swin_attention.py --encoder swin_v1_t --sizes 512,1024 --threads 1,2 --mode train
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_ms_alternating  # noqa: E402

PATHS = {"sdpa": True, "stated": False}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="swin_v1_t", help="swin_v1_t|s|b|l")
    parser.add_argument("--sizes", default="512,1024", help="comma-separated square input sizes")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--mode", default="train", choices=["train", "infer"],
                        help="forward+backward, or forward under torch.inference_mode")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--memory-child", nargs=2, metavar=("PATH", "SIZE"), help=argparse.SUPPRESS)
    return parser


def build(encoder: str, device: str, size: int):  # noqa: ANN201 - torch objects
    import torch

    from birefnet.models.encoders import SwinEncoder

    torch.manual_seed(0)
    model = SwinEncoder(encoder).to(device).train()
    image = torch.randn(1, 3, size, size, device=device)
    return model, image


def step(model, image, mode: str = "train") -> None:  # noqa: ANN001
    import torch

    if mode == "infer":
        with torch.inference_mode():
            model(image)
    else:
        model.zero_grad(set_to_none=True)
        features = model(image)
        torch.stack([f.float().mean() for f in features]).sum().backward()
    if image.is_cuda:
        torch.cuda.synchronize()


def peak_memory_child(args: argparse.Namespace) -> None:
    """Print the peak memory (MiB) of one step of one path, measured in this fresh process."""
    import torch

    path, size = args.memory_child[0], int(args.memory_child[1])
    torch.set_num_threads(1)
    model, image = build(args.encoder, args.device, size)
    model.set_fused_attention(PATHS[path])
    if args.mode == "infer":
        model.eval()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(model, image, args.mode)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step(model, image, args.mode)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"peak_mib": peak / 2**20}))


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.memory_child:
        peak_memory_child(args)
        return 0
    import torch

    sizes = [int(s) for s in args.sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")] if args.device == "cpu" else [0]
    what = "forward+backward" if args.mode == "train" else "forward (inference mode)"
    print(f"{args.encoder} encoder {what}, batch 1, {args.device}; median of {args.repeats} "
          f"(after {args.warmup}), paths alternating")
    print("| size | threads | SDPA ms | stated ms | stated/SDPA | SDPA peak MiB | stated peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for size in sizes:
        memory = {}
        for path in PATHS:
            out = subprocess.run([sys.executable, __file__, "--encoder", args.encoder, "--device", args.device,
                                  "--mode", args.mode, "--memory-child", path, str(size)],
                                 capture_output=True, text=True, check=True)
            memory[path] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
        model, image = build(args.encoder, args.device, size)
        if args.mode == "infer":
            model.eval()
        for count in threads:
            if count:
                torch.set_num_threads(count)

            def run(fused: bool, model=model, image=image) -> None:  # noqa: ANN001 - bound per size
                model.set_fused_attention(fused)
                step(model, image, args.mode)

            times = median_ms_alternating({p: (lambda f=f: run(f)) for p, f in PATHS.items()}, args.warmup,
                                          args.repeats)
            print(f"| {size} | {count or '-'} | {times['sdpa']:.0f} | {times['stated']:.0f} | "
                  f"{times['stated'] / times['sdpa']:.2f}x | {memory['sdpa']:.0f} | {memory['stated']:.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
