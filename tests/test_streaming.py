"""Streaming upload: a big file written from its start goes to S3 in parts while the program
writes, and close() completes it.  Real mounts (5 MiB parts), real syscalls."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Mount, eventually, s3_bytes

from s3mount.storage import Storage

MiB = 1024 * 1024


def open_uploads(storage: Storage, bucket: str) -> list[dict]:
    return storage.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


@pytest.fixture
def smnt(mount_factory, bucket: str) -> Mount:
    return mount_factory(bucket, "--part-size", "5")


# The writer is a process of its own: a fork of the test process (to run `s3mount status`)
# while it held the file open would close a copy of its descriptor, which flushes the file.
WRITER = """
import os, sys
data = open(sys.argv[1], "rb").read()
fd = os.open(sys.argv[2], os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
for line in sys.stdin:
    op, *args = line.split()
    if op == "write":  # write OFF END: data[OFF:END], in 1 MiB pieces
        off, end = int(args[0]), int(args[1])
        for i in range(off, end, 1 << 20):
            os.pwrite(fd, data[i : min(end, i + (1 << 20))], i)
    elif op == "patch":  # patch OFF TEXT
        os.pwrite(fd, args[1].encode(), int(args[0]))
    elif op == "truncate":
        os.ftruncate(fd, int(args[0]))
    elif op == "close":
        os.close(fd)
    print("ok", flush=True)
"""


class Writer:
    """A program writing ``path``, one command at a time."""

    def __init__(self, tmp_path: Path, path: Path, data: bytes):
        src = tmp_path / f"{path.name}.src"
        src.write_bytes(data)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(src), str(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def do(self, command: str) -> None:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "ok\n", f"writer failed at {command!r}"

    def close(self) -> None:
        self.do("close")
        assert self.proc.stdin
        self.proc.stdin.close()
        assert self.proc.wait(30) == 0


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Callable[[Path, bytes], Writer]]:
    """writer(path, data) -> a Writer of ``path`` (killed at the end if still running)."""
    made: list[Writer] = []

    def make(path: Path, data: bytes) -> Writer:
        made.append(Writer(tmp_path, path, data))
        return made[-1]

    yield make
    for w in made:
        w.proc.kill()
        w.proc.wait()


def at_least(m: Mount, request: str, n: int) -> Callable[[], None]:
    def check() -> None:
        assert m.requests().get(request, 0) >= n

    return check


def test_parts_are_uploaded_while_the_program_writes(
    smnt: Mount, storage: Storage, writer: Callable[[Path, bytes], Writer]
) -> None:
    data = os.urandom(23 * MiB)  # four full 5 MiB parts and a 3 MiB tail
    w = writer(smnt / "big.bin", data)
    w.do(f"write 0 {16 * MiB}")
    eventually(at_least(smnt, "UploadPart", 3), timeout=30)  # the file is still open
    sizes = {k.key: k.size for k in storage.bucket_list_keys(smnt.bucket)}
    assert sizes.get("big.bin", 0) == 0, sizes  # created empty; the parts are not it yet
    w.do(f"write {16 * MiB} {23 * MiB}")
    w.close()
    assert s3_bytes(storage, smnt.bucket, "big.bin") == data
    etag = storage.client.head_object(Bucket=smnt.bucket, Key="big.bin")["ETag"]
    assert etag.endswith('-5"'), etag
    requests = smnt.requests()
    assert requests.get("UploadPart") == 5, requests  # no part went twice
    assert requests.get("CompleteMultipartUpload") == 1, requests
    assert not open_uploads(storage, smnt.bucket)
    assert (smnt / "big.bin").read_bytes() == data


def test_a_write_into_a_sent_part_sends_it_again(
    smnt: Mount, storage: Storage, writer: Callable[[Path, bytes], Writer]
) -> None:
    data = bytearray(os.urandom(12 * MiB))
    w = writer(smnt / "patched.bin", bytes(data))
    w.do(f"write 0 {12 * MiB}")
    eventually(at_least(smnt, "UploadPart", 2), timeout=30)
    w.do(f"patch {MiB + 7} {'PATCH' * 1000}")  # inside part 1, already in S3
    w.close()
    data[MiB + 7 : MiB + 7 + 5000] = b"PATCH" * 1000
    assert s3_bytes(storage, smnt.bucket, "patched.bin") == bytes(data)
    assert smnt.requests().get("UploadPart") == 4  # parts 1 and 2, part 1 again, the tail
    assert not open_uploads(storage, smnt.bucket)


def test_truncating_below_the_sent_parts_uploads_the_file_whole(
    smnt: Mount, storage: Storage, writer: Callable[[Path, bytes], Writer]
) -> None:
    data = os.urandom(12 * MiB)
    w = writer(smnt / "cut.bin", data)
    w.do(f"write 0 {12 * MiB}")
    eventually(at_least(smnt, "UploadPart", 2), timeout=30)
    w.do(f"truncate {3 * MiB}")
    w.do(f"patch {3 * MiB} tail")
    w.close()
    assert s3_bytes(storage, smnt.bucket, "cut.bin") == data[: 3 * MiB] + b"tail"
    assert not open_uploads(storage, smnt.bucket)


def test_unlink_or_rename_while_streaming_leaves_no_upload_behind(
    smnt: Mount, storage: Storage, writer: Callable[[Path, bytes], Writer]
) -> None:
    data = os.urandom(11 * MiB)
    gone = writer(smnt / "gone.bin", data)
    moved = writer(smnt / "moved.bin", data)
    gone.do(f"write 0 {11 * MiB}")
    moved.do(f"write 0 {11 * MiB}")
    eventually(at_least(smnt, "UploadPart", 4), timeout=30)
    os.unlink(smnt / "gone.bin")
    os.rename(smnt / "moved.bin", smnt / "renamed.bin")
    for w in (gone, moved):
        w.do(f"patch {11 * MiB} more")
        w.close()
    keys = {k.key for k in storage.bucket_list_keys(smnt.bucket)}
    assert keys == {"renamed.bin"}, keys
    assert s3_bytes(storage, smnt.bucket, "renamed.bin") == data + b"more"
    assert not open_uploads(storage, smnt.bucket)


def test_mtime_is_when_the_writing_began_unless_the_program_sets_it(
    smnt: Mount, storage: Storage, writer: Callable[[Path, bytes], Writer], tmp_path: Path
) -> None:
    # A streamed object carries the headers its upload began with: its mtime is the time the
    # first part was full (docs/semantics.md).  Times a program sets (cp -p, touch -d) win.
    data = os.urandom(11 * MiB)
    w = writer(smnt / "plain.bin", data)
    began = time.time()
    w.do(f"write 0 {6 * MiB}")
    eventually(at_least(smnt, "UploadPart", 1), timeout=30)
    time.sleep(2.5)
    w.do(f"write {6 * MiB} {11 * MiB}")
    w.close()
    mtime = os.stat(smnt / "plain.bin").st_mtime
    assert began - 1 < mtime < began + 2, (began, mtime)

    src = tmp_path / "src.bin"
    src.write_bytes(data)
    os.utime(src, (1_500_000_000, 1_500_000_000))
    os.chmod(src, 0o640)
    r = subprocess.run(["cp", "-p", src, smnt / "kept.bin"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    smnt.unmount()
    smnt.mount()
    for name in ("plain.bin", "kept.bin"):
        assert s3_bytes(storage, smnt.bucket, name) == data
    st = os.stat(smnt / "kept.bin")
    assert (int(st.st_mtime), st.st_mode & 0o777) == (1_500_000_000, 0o640)
    assert abs(os.stat(smnt / "plain.bin").st_mtime - mtime) < 1e-3
