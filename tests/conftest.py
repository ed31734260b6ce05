"""Shared fixtures: a real moto S3 server process, buckets, and a way to run the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from s3mount.control import STATUS_XATTR, process_running
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


def s3_bytes(storage: Storage, bucket: str, key: str) -> bytes:
    """An object's body, read straight from S3 (not through the mount)."""
    return storage.client.get_object(Bucket=bucket, Key=key)["Body"].read()


def s3_keys(storage: Storage, bucket: str) -> set[str]:
    return {k.key for k in storage.bucket_list_keys(bucket)}


def append_line(path: Path, n: int) -> bytes:
    """Append line ``n`` to a file as a logger does (open O_APPEND, write, close); returns it."""
    line = b"line %d\n" % n
    with open(path, "ab") as f:
        f.write(line)
    return line


def sent_between(before: dict, after: dict) -> dict[str, int]:
    """What a mount sent between two ``Mount.status()`` snapshots: requests by operation
    (those that changed), plus ``bytes_in`` and ``bytes_out``."""
    b = before["requests"]
    sent = {k: v - b.get(k, 0) for k, v in after["requests"].items() if v != b.get(k, 0)}
    sent.update({k: after[k] - before[k] for k in ("bytes_in", "bytes_out")})
    return sent


def eventually(check: Callable[[], object], timeout: float = 10.0) -> None:
    """Retry ``check`` (an assertion) until it passes: S3 sees an unlink moments after it
    returns, as the mount batches deletes in the background."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def wait_gone(pid: int, timeout: float = 30) -> None:
    """Wait until process ``pid`` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_running(pid):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still alive")


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
def aws_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    saved = dict(os.environ)
    for k in [*_DROPPED, *(k for k in os.environ if k.startswith("S3MOUNT_"))]:
        os.environ.pop(k, None)
    os.environ.update(TEST_ENV)
    # The machine's own config files (~/.config/s3mount, /etc/s3mount) stay out of the tests.
    empty = tmp_path_factory.mktemp("config") / "config.toml"
    empty.write_text("")
    os.environ["S3MOUNT_CONFIG"] = str(empty)
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


def new_bucket_name() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def _fresh_bucket(storage: Storage) -> Iterator[str]:
    name = new_bucket_name()
    storage.bucket_create(name)
    yield name
    with contextlib.suppress(Exception):
        storage.bucket_delete(name, force=True)


@pytest.fixture
def bucket(storage: Storage) -> Iterator[str]:
    """A fresh, empty bucket, deleted with its contents afterwards."""
    yield from _fresh_bucket(storage)


@pytest.fixture
def other_bucket(storage: Storage) -> Iterator[str]:
    """A second fresh bucket."""
    yield from _fresh_bucket(storage)


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


class Mount:
    """A real s3mount mount of a bucket, started through the CLI as a user would."""

    def __init__(self, endpoint: str, bucket: str, path: Path, cache: Path, *options: str):
        self.endpoint = endpoint
        self.bucket = bucket
        self.path = path
        self.cache = cache
        self.options = list(options)
        self.pid: int | None = None

    def mount(self) -> Mount:
        with contextlib.suppress(OSError):  # a stale mount answers ENOTCONN here
            self.path.mkdir(parents=True, exist_ok=True)
        r = run_cli(
            "--endpoint-url",
            self.endpoint,
            self.bucket,
            str(self.path),
            "--cache-dir",
            str(self.cache),
            *self.options,
        )
        assert r.returncode == 0, r.stderr
        self.pid = self.status()["pid"]
        return self

    def status(self) -> dict:
        """What ``s3mount status --json`` prints (test_deploy runs the command), read as it
        does from the root's attribute: without a process start per call."""
        return json.loads(os.getxattr(self.path, STATUS_XATTR))

    def requests(self) -> dict[str, int]:
        return self.status()["requests"]

    def unmount(self) -> None:
        r = run_cli("unmount", str(self.path))
        assert r.returncode == 0, r.stderr
        self.pid = None

    def cleanup(self) -> None:
        """Whatever happened: no mount and no daemon left behind."""
        # ismount() is False for a dead mount (ENOTCONN): always ask fusermount3.
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)
            self.pid = None

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name


@pytest.fixture
def mount_factory(s3_server: MotoServer, tmp_path: Path) -> Iterator:
    """mount_factory(bucket, *options) -> Mount (mounted); all are cleaned up at the end."""
    mounts: list[Mount] = []

    def make(bucket: str, *options: str, name: str = "mnt") -> Mount:
        m = Mount(s3_server.endpoint, bucket, tmp_path / name, tmp_path / f"{name}-cache", *options)
        mounts.append(m)
        return m.mount()

    yield make
    for m in mounts:
        m.cleanup()


@pytest.fixture
def mnt(mount_factory, bucket: str) -> Mount:
    """A mount of a fresh bucket with short TTLs."""
    return mount_factory(bucket, "--listing-ttl", "1", "--attr-timeout", "0.5")
