"""Command-line pieces shared by the benchmark scripts that build the model from a params file."""

from __future__ import annotations

import argparse


def params_parser(doc: str | None, repeats: int, warmup: int) -> argparse.ArgumentParser:
    """A parser with ``--params``, ``--set``, ``--threads``, ``--repeats`` and ``--warmup``; scripts add more."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file the model and training keys come from")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed steps per variant and setting")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed steps first")
    return parser
