"""Command-line pieces shared by the benchmark scripts that build the model from a params file."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping


def params_parser(doc: str | None, repeats: int, warmup: int) -> argparse.ArgumentParser:
    """A parser with ``--params``, ``--set``, ``--threads``, ``--repeats`` and ``--warmup``; scripts add more."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file the model and training keys come from")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed steps per variant and setting")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed steps first")
    return parser


def median_ms_alternating(steps: Mapping[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Run every variant's step in turn, ``warmup + repeats`` rounds, and return each one's median in ms.

    Alternating step by step puts the variants through the same moments of a noisy machine, so their ratio
    holds even when the absolute times drift.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1000 for name, values in times.items()}
