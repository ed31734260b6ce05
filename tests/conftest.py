"""Shared fixtures: a real moto S3 server process, buckets, and a way to run the CLI."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from s3mount.storage import ConnectionSettings, Storage

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run the long soak tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


class MotoServer:
    """A moto server in its own process, on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# Credentials for moto; the real environment's AWS settings must not leak into the tests.
TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_DROPPED = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "S3MOUNT_BUCKET",
)


@pytest.fixture(scope="session", autouse=True)
def aws_env() -> Iterator[None]:
    saved = dict(os.environ)
    for k in _DROPPED:
        os.environ.pop(k, None)
    os.environ.update(TEST_ENV)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def s3_server(aws_env: None) -> Iterator[MotoServer]:
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def storage(s3_server: MotoServer) -> Storage:
    return Storage(ConnectionSettings(endpoint_url=s3_server.endpoint))


@pytest.fixture
def bucket(storage: Storage) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:12]}"
    storage.bucket_create(name)
    yield name
    with contextlib.suppress(Exception):
        storage.bucket_delete(name, force=True)


def run_cli(
    *args: str,
    endpoint: str | None = None,
    input: bytes | None = None,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m s3mount`` as a user would, and capture what it prints."""
    cmd = [sys.executable, "-m", "s3mount"]
    if endpoint:
        cmd += ["--endpoint-url", endpoint]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        cmd + list(args),
        capture_output=True,
        text=input is None,
        input=input,
        timeout=timeout,
        env=full_env,
    )
