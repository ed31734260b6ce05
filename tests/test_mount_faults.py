"""S3 failing under a mount: errnos for the caller, no hang, no lost data, no dead daemon."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount
from faultproxy import FaultProxy

from s3mount.storage import Storage


@pytest.fixture
def proxied(s3_server, bucket: str, tmp_path: Path) -> Iterator[tuple[Mount, FaultProxy]]:
    """A mount whose S3 traffic goes through a fault-injecting proxy."""
    with FaultProxy(s3_server.port) as proxy:
        m = Mount(
            proxy.endpoint,
            bucket,
            tmp_path / "m",
            tmp_path / "cache",
            "--retries",
            "3",
            "--listing-ttl",
            "0.5",
            "--attr-timeout",
            "0.2",
        )
        try:
            yield m.mount(), proxy
        finally:
            proxy.clear()
            m.cleanup()


def test_503_bursts_inside_the_retry_budget_are_invisible(proxied, storage: Storage) -> None:
    m, proxy = proxied
    proxy.fail_next(2, "503")
    (m / "a.txt").write_text("survives two 503s")
    proxy.fail_next(2, "reset")
    (m / "b.txt").write_text("survives two resets")
    assert proxy.pending == 0
    for key, text in (("a.txt", b"survives two 503s"), ("b.txt", b"survives two resets")):
        assert storage.client.get_object(Bucket=m.bucket, Key=key)["Body"].read() == text


def test_read_during_outage_gives_eio_not_a_hang(proxied, storage: Storage) -> None:
    m, proxy = proxied
    storage.client.put_object(Bucket=m.bucket, Key="cold.bin", Body=os.urandom(100_000))
    time.sleep(0.6)
    assert os.path.getsize(m / "cold.bin") == 100_000  # listed while S3 was up
    proxy.down = True
    started = time.monotonic()
    with pytest.raises(OSError) as e, open(m / "cold.bin", "rb") as f:
        f.read()
    assert e.value.errno == errno.EIO
    assert time.monotonic() - started < 30
    proxy.down = False
    assert (m / "cold.bin").read_bytes() == storage.client.get_object(
        Bucket=m.bucket, Key="cold.bin"
    )["Body"].read()


def test_failed_upload_fails_close_and_keeps_the_data(proxied, storage: Storage) -> None:
    m, proxy = proxied
    payload = os.urandom(200_000)
    f = open(m / "precious.bin", "wb")  # noqa: SIM115
    f.write(payload)
    proxy.down = True
    with pytest.raises(OSError) as e:
        f.close()
    assert e.value.errno == errno.EIO
    # The kernel releases the file just after close() returns; the copy is kept then.
    deadline = time.monotonic() + 20
    while not (kept := list((m.cache / "unsaved" / m.bucket).glob("precious.bin.*"))):
        assert time.monotonic() < deadline, "no unsaved copy kept"
        time.sleep(0.1)
    assert len(kept) == 1 and kept[0].read_bytes() == payload
    assert oct(kept[0].stat().st_mode & 0o777) == "0o600"
    # S3 comes back: the daemon is alive, and the kept copy can be put back by hand.
    proxy.down = False
    (m / "after.txt").write_text("the mount still works")
    assert storage.client.get_object(Bucket=m.bucket, Key="after.txt")["Body"].read()


def test_fsync_reports_eio_and_a_later_close_retries(proxied, storage: Storage) -> None:
    m, proxy = proxied
    with open(m / "retry.txt", "wb") as f:
        f.write(b"first try fails")
        proxy.down = True
        with pytest.raises(OSError) as e:
            os.fsync(f.fileno())
        assert e.value.errno == errno.EIO
        proxy.down = False
    body = storage.client.get_object(Bucket=m.bucket, Key="retry.txt")["Body"].read()
    assert body == b"first try fails"
