"""``birefnet`` command line: one subcommand per pipeline stage plus tools.

Every subcommand lives in its own module exposing ``get_args_parser()`` and ``main(argv) -> int``; this
file only dispatches, importing the module lazily so ``birefnet --help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys

from birefnet.offline import apply_offline_env, find_repo, offline_env

# name -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "synthesize": ("birefnet.stages.synthesize", "write the embedded DIS-like dataset (DIS5K layout)"),
    "ingest": ("birefnet.stages.ingest", "validate image/mask pairs, write the manifest and quarantine report"),
    "gradients": ("birefnet.stages.gradients", "precompute outward-reference gradient labels"),
    "shard": ("birefnet.stages.shard", "pack the prepared dataset into WebDataset tar shards"),
    "train": ("birefnet.stages.train", "train BiRefNet with Ray Train (staged schedule, checkpoints)"),
    "evaluate": ("birefnet.stages.evaluate", "score a model or prediction folders with the paper's metrics"),
    "register": ("birefnet.stages.register", "register the model in MLflow behind the promotion gate"),
    "convert-upstream": ("birefnet.commands.convert_upstream",
                         "convert published BiRefNet weights (.pth, HF safetensors)"),
    "predict": ("birefnet.commands.predict", "predict masks and RGBA cut-outs for images at original resolution"),
    "export": ("birefnet.commands.export", "export a model to ONNX and check parity"),
    "promote": ("birefnet.commands.promote", "move the champion alias by hand (with the gate's checks)"),
    "ablate": ("birefnet.ablate", "run the paper's ablation table rows as DVC experiments, write their table"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: birefnet COMMAND [options]",
        "",
        "BiRefNet training pipeline. Stage commands read params.yaml (--params PATH) and accept",
        "repeatable --set key.path=value overrides, validated like the file itself.",
        "",
        "commands:",
    ]
    for name, (_, summary) in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {summary}")
    lines += ["", "Run 'birefnet COMMAND --help' for the options of one command; 'birefnet --version' prints the "
              "version;", "'birefnet env' prints the offline switches (offline.env) every command applies."]
    return "\n".join(lines)


def _print_env(argv: list[str]) -> int:
    """``birefnet env``: the offline switches as a command sees them once :func:`main` has applied them."""
    if argv and argv[0] in ("-h", "--help"):
        print("usage: birefnet env\n\nPrint the offline.env switches (telemetry off, servers on loopback) as every "
              "birefnet command sees them:\nvalues already in the environment win, the rest come from the "
              "repository's offline.env.")
        return 0
    root = find_repo()
    if root is None:
        print("# no offline.env found (not in a checkout): nothing applied")
        return 0
    print(f"# {root / 'offline.env'}")
    for key in offline_env(root):
        print(f"{key}={os.environ.get(key, '(unset)')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``birefnet COMMAND ...`` to the command's module."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from birefnet import __version__

        print(f"birefnet {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    # before any command imports Ray, MLflow or Prefect: `dvc repro` in a plain shell gets the switches too
    apply_offline_env()
    if name == "env":
        return _print_env(rest)
    if name not in COMMANDS:
        print(f"birefnet: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"birefnet: command {name!r} is not available in this version ({module_name} missing)",
                  file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
