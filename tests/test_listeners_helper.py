"""The network-exposure helper names processes the same way wherever the checkout lives."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil

from tests.helpers.listeners import _describe


def test_long_absolute_executable_path_is_named_by_its_file_name(tmp_path: Path) -> None:
    # a CI clone sits deeper than a work tree; Ray's gcs_server path there passed 80 characters
    deep = tmp_path.joinpath(*(["deeper-directory-level"] * 6))
    deep.mkdir(parents=True)
    exe = deep / "gcs_server"
    exe.symlink_to("/bin/sleep")
    assert len(str(exe)) > 120
    proc = subprocess.Popen([str(exe), "30"])
    try:
        for _ in range(50):
            if psutil.Process(proc.pid).cmdline():
                break
            time.sleep(0.05)
        assert _describe(psutil.Process(proc.pid)) == "gcs_server"
    finally:
        proc.kill()
        proc.wait()

