"""Buckets written by s3fs-fuse and rclone look the same under s3mount, and the reverse."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from conftest import Mount

needs_s3fs = pytest.mark.skipif(shutil.which("s3fs") is None, reason="s3fs-fuse not installed")
needs_rclone = pytest.mark.skipif(shutil.which("rclone") is None, reason="rclone not installed")

T1 = "2001-02-03 04:05:06.123456789"
T1_NS = 981173106_123456789


def peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AWS_CA_BUNDLE", None)  # rclone fails with it set; neither needs it for http
    return env


@contextlib.contextmanager
def s3fs_mounted(endpoint: str, bucket: str, where: Path) -> Iterator[Path]:
    """The bucket mounted by s3fs-fuse (Debian's build has no xattr support)."""
    passwd = where.with_suffix(".passwd")
    passwd.write_text(f"{os.environ['AWS_ACCESS_KEY_ID']}:{os.environ['AWS_SECRET_ACCESS_KEY']}")
    passwd.chmod(0o600)
    where.mkdir()
    subprocess.run(
        ["s3fs", bucket, str(where), "-o", f"passwd_file={passwd}", "-o", f"url={endpoint}",
         "-o", "use_path_request_style", "-o", "stat_cache_expire=1"],
        check=True, env=peer_env(),
    )  # fmt: skip
    try:
        yield where
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(where)], capture_output=True)


@pytest.fixture
def s3fs_mount(s3_server, bucket: str, tmp_path: Path) -> Iterator[Path]:
    with s3fs_mounted(s3_server.endpoint, bucket, tmp_path / "s3fs") as mnt:
        yield mnt


def stat_of(p: Path) -> tuple[int, int, int, int]:
    st = os.lstat(p)
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns


@needs_s3fs
def test_s3fs_written_bucket_under_s3mount(s3fs_mount: Path, mount_factory, bucket: str) -> None:
    (s3fs_mount / "f").write_text("from s3fs")
    os.chmod(s3fs_mount / "f", 0o604)
    os.chown(s3fs_mount / "f", 42, 43)
    os.utime(s3fs_mount / "f", ns=(T1_NS // 10**9 * 10**9,) * 2)  # s3fs keeps seconds
    (s3fs_mount / "d").mkdir()
    os.chmod(s3fs_mount / "d", 0o750)
    os.symlink("f", s3fs_mount / "link")
    expected = {n: stat_of(s3fs_mount / n) for n in ("f", "d", "link")}

    m: Mount = mount_factory(bucket)
    for name, st in expected.items():
        assert stat_of(m / name) == st, name
    assert os.readlink(m / "link") == "f"
    assert (m / "f").read_text() == "from s3fs"


@needs_s3fs
def test_s3mount_written_bucket_under_s3fs(
    mount_factory, bucket: str, s3_server, storage, tmp_path: Path
) -> None:
    m: Mount = mount_factory(bucket)
    (m / "f").write_text("from s3mount")
    os.chmod(m / "f", 0o640)
    os.chown(m / "f", 1234, 5678)
    subprocess.run(["touch", "-d", T1, str(m / "f")], check=True)
    (m / "d").mkdir()
    os.chmod(m / "d", 0o700)
    os.symlink("f", m / "link")
    os.setxattr(m / "f", "user.color", b"red")
    expected = {n: stat_of(m / n) for n in ("f", "d", "link")}
    assert expected["f"][3] == T1_NS
    m.unmount()
    # s3fs's xattr header: URL-encoded JSON, values in base64 (Debian's s3fs cannot read it)
    head = storage.client.head_object(Bucket=bucket, Key="f")["Metadata"]
    assert unquote(head["xattr"]) == '{"user.color":"cmVk"}'

    with s3fs_mounted(s3_server.endpoint, bucket, tmp_path / "s3fs-after") as mnt:
        for name, (mode, uid, gid, mtime_ns) in expected.items():
            got = stat_of(mnt / name)
            assert got[:3] == (mode, uid, gid), name
            if name == "f":  # s3fs shows whole seconds... or the nanoseconds we stored
                assert got[3] // 10**9 == mtime_ns // 10**9
        assert os.readlink(mnt / "link") == "f"
        assert (mnt / "f").read_text() == "from s3mount"


@needs_rclone
def test_rclone_mtimes_both_ways(mount_factory, bucket: str, s3_server, tmp_path: Path) -> None:
    env = peer_env() | {
        "RCLONE_CONFIG_T_TYPE": "s3",
        "RCLONE_CONFIG_T_PROVIDER": "Other",
        "RCLONE_CONFIG_T_ENDPOINT": s3_server.endpoint,
        "RCLONE_CONFIG_T_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
        "RCLONE_CONFIG_T_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
        "RCLONE_CONFIG_T_FORCE_PATH_STYLE": "true",
    }
    local = tmp_path / "r.txt"
    local.write_text("from rclone")
    os.utime(local, ns=(T1_NS, T1_NS))
    subprocess.run(["rclone", "copyto", str(local), f"T:{bucket}/r.txt"], check=True, env=env)

    m: Mount = mount_factory(bucket)
    st = os.stat(m / "r.txt")
    # rclone writes a fractional mtime; it keeps nanoseconds or rounds to microseconds
    assert abs(st.st_mtime_ns - T1_NS) < 1000
    assert (m / "r.txt").read_text() == "from rclone"

    (m / "s.txt").write_text("from s3mount")
    subprocess.run(["touch", "-d", T1, str(m / "s.txt")], check=True)
    time.sleep(0.1)
    out = subprocess.run(
        ["rclone", "lsl", f"T:{bucket}/s.txt"], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert "2001-02-03 04:05:06.12345" in out, out
