"""Real MLflow servers on 127.0.0.1 for the registry tests: start with a bounded health wait, stop by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HEALTH_TIMEOUT_S = 60.0
#: Client-side variables a server must not inherit from the test process.
CLIENT_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> float:
    """Poll ``url`` until it answers 200 (or ``proc`` exits); return the seconds waited.

    Raises:
        RuntimeError: the process exited or ``timeout_s`` passed; the message has the log's tail.
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s:\n{_tail(log)}")


def _tail(log: Path | None, lines: int = 40) -> str:
    if log is None or not log.is_file():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Server:
    """A process this test session started (its own process group), with its URL and log."""

    proc: subprocess.Popen
    url: str
    log: Path
    backend: str = ""
    #: the full backend store URI (with credentials): tests that lock on the same database need it
    backend_uri: str = ""
    startup_s: float = 0.0
    env: dict[str, str] = field(default_factory=dict)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the process group we created (its PID), then SIGKILL it if it lingers."""
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def start_process(args: list[str], url: str, health_path: str, log: Path, env: dict[str, str] | None = None,
                  cwd: Path | None = None, timeout_s: float = HEALTH_TIMEOUT_S) -> Server:
    """Start ``args`` in a new session (so stopping it takes its workers along) and wait for ``url + health``."""
    full_env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARS}
    full_env.update(env or {})
    # console scripts MLflow starts itself (``mlflow models serve`` execs uvicorn) come from this environment
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in full_env.get("PATH", "").split(os.pathsep):
        full_env["PATH"] = bin_dir + os.pathsep + full_env.get("PATH", "")
    full_env.setdefault("OMP_NUM_THREADS", "1")
    fh = log.open("wb")
    proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=full_env, cwd=cwd, start_new_session=True)
    fh.close()
    server = Server(proc=proc, url=url, log=log, env=full_env)
    try:
        server.startup_s = wait_http(url + health_path, timeout_s, proc, log)
    except BaseException:
        server.stop()
        raise
    return server


def start_mlflow_server(backend_uri: str, root: Path, env: dict[str, str] | None = None,
                        extra: list[str] | None = None) -> Server:
    """``mlflow server`` on 127.0.0.1 with ``--workers 1`` and proxied artifacts under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    args = [mlflow_bin, "server", "--backend-store-uri", backend_uri,
            "--artifacts-destination", str((root / "artifacts").resolve()),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *(extra or [])]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    server = start_process(args, f"http://127.0.0.1:{port}", "/health", root / "server.log", env=env, cwd=root)
    server.backend = backend_uri.split(":", 1)[0]
    server.backend_uri = backend_uri
    return server
