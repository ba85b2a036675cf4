"""A real two-node Ray cluster on 127.0.0.1 for tests: a head and a worker node as subprocesses.

Both run in their own process group (``start_new_session``) and are stopped by PID / process group: the
test never touches Ray processes it did not start.
"""

from __future__ import annotations

import functools
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    # children that outlived their leader are still in the group
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.3)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _existing_token() -> str | None:
    """The token an earlier in-process Ray wrote (a driver in this process may have cached it)."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def hidden_from(folders: list[Path], command: list[str], *, size: str | None = None) -> list[str]:
    """``command`` run in its own mount namespace where each of ``folders`` is an empty tmpfs.

    The process and everything it starts (a Ray node's raylet, its workers) see an empty folder where the
    caller sees its files: a node "on another machine" that does not have the driver's folder. ``size`` (``"256k"``)
    caps each tmpfs: a disk that fills up.
    """
    options = f"-o size={size} " if size else ""
    mounts = " && ".join(f'mount -t tmpfs {options}birefnet-hidden "{folder}"' for folder in folders)
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", f'{mounts} && exec "$@"', "sh",
            *command]


@functools.cache
def can_hide_folders() -> bool:
    """Whether this machine lets the tests make a mount namespace (root or user namespaces allowed); probed once
    per process (test modules ask at collection)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run(hidden_from([Path(folder)], ["true"]), capture_output=True, timeout=30)
    return probe.returncode == 0


@contextmanager
def two_node_cluster(workdir: Path, cpus_per_node: int = 1, timeout: float = 90.0,
                     hide: list[Path] | None = None) -> Iterator[str]:
    """Start a head and one worker node on 127.0.0.1; yield the address ``127.0.0.1:PORT``.

    Sets ``RAY_AUTH_TOKEN`` for this process too (token auth is on: head, worker and driver share it). Both
    nodes start in ``workdir``; folders in ``hide`` are invisible (empty) to both nodes and every process they
    start (:func:`hidden_from`), as on nodes of another machine.
    """
    workdir.mkdir(parents=True, exist_ok=True)

    def wrap(command: list[str]) -> list[str]:
        return hidden_from([p.resolve() for p in hide], command) if hide else command

    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ)
    env["RAY_AUTH_TOKEN"] = env.get("RAY_AUTH_TOKEN") or _existing_token() or secrets.token_hex(16)
    os.environ["RAY_AUTH_TOKEN"] = env["RAY_AUTH_TOKEN"]
    head_log = open(workdir / "head.log", "wb")  # noqa: SIM115 - closed below
    worker_log = open(workdir / "worker.log", "wb")  # noqa: SIM115
    head = subprocess.Popen(
        wrap([str(bin_dir / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
              f"--num-cpus={cpus_per_node}", "--include-dashboard=false", "--disable-usage-stats", "--block"]),
        env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir)
    worker = None
    address = f"127.0.0.1:{port}"
    try:
        _wait_port(port, timeout, head, workdir / "head.log")
        worker_env = dict(env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")
        worker = subprocess.Popen(
            wrap([sys.executable, str(HERE / "ray_loopback_node.py"), "start", f"--address={address}",
                  f"--num-cpus={cpus_per_node}", "--disable-usage-stats", "--block"]),
            env=worker_env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir)
        _wait_nodes(address, 2, timeout, worker, workdir / "worker.log")
        yield address
    finally:
        if worker is not None:
            _stop(worker)
        _stop(head)
        head_log.close()
        worker_log.close()


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray head exited early ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"ray head did not listen on 127.0.0.1:{port} within {timeout} s")


def _wait_nodes(address: str, count: int, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    code = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray worker node exited early ({proc.returncode}):\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=60)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1.0)
    raise TimeoutError(f"the cluster at {address} did not reach {count} nodes within {timeout} s")
