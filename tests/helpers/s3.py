"""A local S3-compatible server for the tests: moto's standalone server on 127.0.0.1, started and stopped by PID.

moto's server is what s3fs's and DVC's own test suites run against. It keeps buckets in memory, needs no
credentials of its own (any key pair is accepted) and answers the S3 REST API on one port, so boto3, s3fs (via
aiobotocore), DVC's s3 remote, MLflow's S3 artifact repository and pyarrow's S3 filesystem (Ray Train storage)
all talk to it through an endpoint URL.

Usage::

    with start_s3_server(log=tmp / "moto.log") as server:
        server.make_bucket("birefnet")
        fs = server.filesystem()
"""

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
from typing import Any

START_TIMEOUT_S = 60.0
#: credentials and region every client in the tests uses (moto accepts any values)
S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
#: variables that would point clients at a real account or another endpoint
FOREIGN_VARS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(log: Path | None, lines: int = 30) -> str:
    if log is None or not log.is_file():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class S3Server:
    """A moto server this process started (in its own session), and how clients reach it.

    Attributes:
        proc: the server process.
        endpoint_url: ``http://127.0.0.1:PORT``.
        log: the server's stdout/stderr.
        startup_s: seconds until it answered.
    """

    proc: subprocess.Popen
    endpoint_url: str
    log: Path | None = None
    startup_s: float = 0.0
    env: dict[str, str] = field(default_factory=lambda: dict(S3_ENV))

    @property
    def port(self) -> int:
        return int(self.endpoint_url.rsplit(":", 1)[1])

    def client_env(self) -> dict[str, str]:
        """Environment for a client process: credentials, region and the endpoint (boto3 >= 1.28 and MLflow read
        ``AWS_ENDPOINT_URL_S3`` / ``MLFLOW_S3_ENDPOINT_URL``)."""
        return {**self.env, "AWS_ENDPOINT_URL_S3": self.endpoint_url, "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url}

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs keyword arguments for this server."""
        return {"key": self.env["AWS_ACCESS_KEY_ID"], "secret": self.env["AWS_SECRET_ACCESS_KEY"],
                "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.env["AWS_DEFAULT_REGION"]}}

    def filesystem(self) -> Any:
        """A fresh (uncached) ``s3fs.S3FileSystem`` on this server."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())

    def client(self) -> Any:
        """A boto3 S3 client on this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (idempotent); return ``s3://name``."""
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in ``bucket`` under ``prefix`` (sorted)."""
        paginator = self.client().get_paginator("list_objects_v2")
        keys = [obj["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
                for obj in page.get("Contents", [])]
        return sorted(keys)

    def reset(self) -> None:
        """Drop every bucket and object (moto's reset API)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the process group this helper created (by the server's PID), then SIGKILL if it lingers."""
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_s3_server(log: Path | None = None, timeout_s: float = START_TIMEOUT_S) -> S3Server:
    """Start ``python -m moto.server -H 127.0.0.1 -p PORT`` and wait until it lists buckets.

    Raises:
        RuntimeError: the server exited or did not answer within ``timeout_s``; the message has its log's tail.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_VARS}
    env.update(S3_ENV)
    out = log.open("wb") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    if log is not None:
        out.close()
    server = S3Server(proc=proc, endpoint_url=f"http://127.0.0.1:{port}", log=log)
    start = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}:\n{_tail(log)}")
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"moto server on port {port} did not answer within {timeout_s:.0f} s:\n"
                                   f"{_tail(log)}")
            try:
                with urllib.request.urlopen(server.endpoint_url + "/", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
    except BaseException:
        server.stop()
        raise
    server.startup_s = time.monotonic() - start
    return server
