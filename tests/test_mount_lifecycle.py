"""Daemon lifecycle and local failures: signals, a full cache disk, a dead mount."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Mount, run_cli, wait_gone

from s3mount.control import process_running
from s3mount.storage import Storage


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_after_uploading(
    mount_factory, bucket: str, storage: Storage, signum: int
) -> None:
    m: Mount = mount_factory(bucket)
    (m / "before-signal.txt").write_text("saved")
    pid = m.pid
    assert pid
    os.kill(pid, signum)
    wait_gone(pid)
    m.pid = None
    assert not os.path.ismount(m.path)
    body = storage.client.get_object(Bucket=bucket, Key="before-signal.txt")["Body"].read()
    assert body == b"saved"


def test_full_cache_disk_gives_enospc_and_keeps_closed_files(
    s3_server, bucket: str, storage: Storage, tmp_path: Path
) -> None:
    cache = tmp_path / "tiny-cache"
    cache.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(cache)], check=True)
    m = Mount(
        s3_server.endpoint, bucket, tmp_path / "m", cache, "--log-file", str(tmp_path / "log")
    )
    try:
        m.mount()
        (m / "small.txt").write_text("fits")
        with pytest.raises(OSError) as e, open(m / "huge.bin", "wb") as f:
            for _ in range(10):
                f.write(os.urandom(1024 * 1024))
                f.flush()
        assert e.value.errno == errno.ENOSPC
        # what was closed before is safe, and the mount still works
        assert (m / "small.txt").read_text() == "fits"
        body = storage.client.get_object(Bucket=bucket, Key="small.txt")["Body"].read()
        assert body == b"fits"
        m.unmount()
    finally:
        m.cleanup()
        subprocess.run(["umount", "-l", str(cache)], check=False)


def test_stale_mountpoint_is_cleared_by_the_next_mount(mount_factory, bucket: str) -> None:
    m: Mount = mount_factory(bucket)
    (m / "f").write_text("f")
    assert m.pid
    os.kill(m.pid, signal.SIGKILL)
    wait_gone(m.pid)
    m.pid = None
    with pytest.raises(OSError) as e:
        os.listdir(m.path)
    assert e.value.errno == errno.ENOTCONN
    m.mount()  # clears "Transport endpoint is not connected" by itself
    assert os.listdir(m.path) == ["f"]


def test_unmount_of_something_else_is_a_clean_error(tmp_path: Path) -> None:
    r = run_cli("unmount", str(tmp_path))
    assert r.returncode != 0
    assert r.stderr.startswith("s3mount: error:") and "Traceback" not in r.stderr


def test_no_credentials_in_logs_or_process_title_and_safe_defaults(
    s3_server, bucket: str, tmp_path: Path
) -> None:
    m = Mount(s3_server.endpoint, bucket, tmp_path / "m", tmp_path / "cache",
              "--log-level", "DEBUG", "--debug")  # fmt: skip
    try:
        m.mount()
        (m / "f.txt").write_text("x")
        (m / "f.txt").read_text()
        with pytest.raises(OSError):
            (m / "missing").read_text()
        options = next(
            line.split()[3]
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1] == str(m.path)
        )
        assert "default_permissions" in options and "allow_other" not in options
        cmdline = Path(f"/proc/{m.pid}/cmdline").read_bytes()
        m.unmount()
    finally:
        m.cleanup()
    log = (m.cache / "s3mount.log").read_text()
    assert "DEBUG" in log  # the debug level was on
    for secret in (os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]):
        assert secret not in log
        assert secret.encode() not in cmdline
    for path in [m.cache, *m.cache.rglob("*")]:
        st = os.stat(path)
        assert st.st_uid == os.getuid()
        assert st.st_mode & 0o077 == 0, f"{path} is readable by others"


def test_an_exited_process_counts_as_gone_before_it_is_reaped() -> None:
    # What `s3mount unmount` waits for: a daemon that has exited is gone, even while it is a
    # zombie that init (here: this test, its parent) has not reaped yet.
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    try:
        assert process_running(child.pid)
        child.stdin.close()  # it exits; nobody waits for it yet
        deadline = time.monotonic() + 10
        while process_running(child.pid):
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.01)
        with open(f"/proc/{child.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "Z"  # not reaped: a zombie
    finally:
        child.kill()
        child.wait()
    assert not process_running(child.pid)
