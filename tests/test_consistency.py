"""Other clients changing the bucket, and S3 too slow to answer: no mix, no hang, no loss."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
from conftest import Mount
from faultproxy import FaultProxy

from s3mount.storage import Storage

MiB = 1024 * 1024


def test_reader_never_mixes_two_versions(mnt: Mount, storage: Storage) -> None:
    old, new = b"o" * (3 * MiB), b"n" * (3 * MiB)
    storage.client.put_object(Bucket=mnt.bucket, Key="v.bin", Body=old)
    time.sleep(1.2)  # past the listing TTL
    with open(mnt / "v.bin", "rb") as f:
        first = f.read(64 * 1024)
        storage.client.put_object(Bucket=mnt.bucket, Key="v.bin", Body=new)
        try:
            rest = f.read()
        except OSError as e:  # the clean answer: the version it read is gone
            assert e.errno == errno.ESTALE
        else:
            assert first + rest == old  # or all of the old version, from what was fetched
    time.sleep(1.2)
    assert (mnt / "v.bin").read_bytes() == new  # a new open sees the new version


def test_write_over_a_remote_change_is_kept_not_lost(mnt: Mount, storage: Storage) -> None:
    storage.client.put_object(Bucket=mnt.bucket, Key="doc.txt", Body=b"original")
    time.sleep(1.2)
    f = open(mnt / "doc.txt", "r+b", buffering=0)  # noqa: SIM115
    f.write(b"OURS----")  # reaches the mount now (unbuffered)
    storage.client.put_object(Bucket=mnt.bucket, Key="doc.txt", Body=b"theirs, written meanwhile")
    with pytest.raises(OSError) as e:
        f.close()
    assert e.value.errno == errno.ESTALE
    body = storage.client.get_object(Bucket=mnt.bucket, Key="doc.txt")["Body"].read()
    assert body == b"theirs, written meanwhile"  # their version is not overwritten
    kept = list((mnt.cache / "unsaved" / mnt.bucket).glob("doc.txt.*.conflict"))
    assert len(kept) == 1 and kept[0].read_bytes() == b"OURS----"
    assert any("conflict" in p for p in mnt.status()["recovered"])


def test_slow_s3_gives_eio_past_the_deadline(s3_server, bucket: str, storage: Storage,
                                             tmp_path: Path) -> None:  # fmt: skip
    storage.client.put_object(Bucket=bucket, Key="slow.bin", Body=os.urandom(10_000))
    with FaultProxy(s3_server.port) as proxy:
        m = Mount(proxy.endpoint, bucket, tmp_path / "m", tmp_path / "cache",
                  "--io-timeout", "2", "--retries", "1")  # fmt: skip
        try:
            m.mount()
            assert os.listdir(m.path) == ["slow.bin"]
            assert os.path.getsize(m / "slow.bin") == 10_000
            proxy.delay = 20  # a latency spike far past the deadline
            started = time.monotonic()
            with pytest.raises(OSError) as e, open(m / "slow.bin", "rb") as f:
                f.read()
            assert e.value.errno == errno.EIO
            assert time.monotonic() - started < 10
            proxy.delay = 0
            deadline = time.monotonic() + 30  # the abandoned request drains, then all is well
            while True:
                try:
                    assert len((m / "slow.bin").read_bytes()) == 10_000
                    break
                except OSError:
                    assert time.monotonic() < deadline
                    time.sleep(0.5)
        finally:
            proxy.clear()
            m.cleanup()
