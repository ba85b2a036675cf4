"""The sitecustomize hooks every Ray process loads (offline.env puts infra/ray/pyhooks on PYTHONPATH)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HOOKS = Path(__file__).resolve().parents[2] / "infra" / "ray" / "pyhooks"


def run_with_hooks(code: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(HOOKS), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_cloud_metadata_probe_is_replaced() -> None:
    result = run_with_hooks(
        "import ray._common.usage.usage_lib as u; print(u.get_cloud_from_metadata_requests())"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "unknown"


def test_state_api_warning_of_the_placement_group_cleaner_is_logged_once() -> None:
    code = (
        "import logging\n"
        "from ray.train.v2._internal.execution.controller import placement_group_cleaner as m\n"
        "for _ in range(5):\n"
        "    m.logger.warning('Failed to query Ray Train Controller actor state. "
        "State API may be temporarily unavailable. Continuing to monitor.')\n"
        "m.logger.warning('another warning')\n"
    )
    result = run_with_hooks(code)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert sum("State API may be temporarily unavailable" in line for line in lines) == 1
    assert lines[-1].endswith("another warning")
