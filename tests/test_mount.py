"""The mount, for real: FUSE, a moto server process, and plain syscalls as programs make them."""

from __future__ import annotations

import ctypes
import errno
import filecmp
import mmap
import os
import random
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Mount, append_line, eventually, s3_bytes, s3_keys, sent_between

from s3mount.storage import Storage


def test_create_read_overwrite_append_truncate(mnt: Mount, storage: Storage) -> None:
    p = mnt / "notes.txt"
    p.write_bytes(b"first version\n")
    assert p.read_bytes() == b"first version\n"
    assert s3_bytes(storage, mnt.bucket, "notes.txt") == b"first version\n"

    p.write_bytes(b"second\n")  # O_TRUNC over an existing object
    assert s3_bytes(storage, mnt.bucket, "notes.txt") == b"second\n"

    with open(p, "ab") as f:
        f.write(b"appended\n")
    assert s3_bytes(storage, mnt.bucket, "notes.txt") == b"second\nappended\n"

    os.truncate(p, 3)
    assert p.read_bytes() == b"sec"
    assert s3_bytes(storage, mnt.bucket, "notes.txt") == b"sec"
    os.truncate(p, 6)
    assert s3_bytes(storage, mnt.bucket, "notes.txt") == b"sec\0\0\0"
    assert os.stat(p).st_size == 6


def test_random_write_into_multipart_object(mount_factory, bucket: str, storage: Storage) -> None:
    data = bytearray(os.urandom(18 * 1024 * 1024))
    m = mount_factory(bucket, "--part-size", "5")
    p = m / "big.bin"
    p.write_bytes(data)
    etag = storage.client.head_object(Bucket=bucket, Key="big.bin")["ETag"]
    assert "-" in etag, "expected a multipart upload"

    before = m.status()["bytes_in"]
    with open(p, "r+b") as f:
        f.seek(9 * 1024 * 1024 + 123)
        f.write(b"PATCHED" * 100)
        # Before the upload, only the blocks the write touches came from S3.
        assert m.status()["bytes_in"] - before <= 2 * 1024 * 1024
    data[9 * 1024 * 1024 + 123 : 9 * 1024 * 1024 + 823] = b"PATCHED" * 100
    assert s3_bytes(storage, bucket, "big.bin") == bytes(data)
    assert p.read_bytes() == bytes(data)


def test_cp_tree_and_diff(mnt: Mount, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(5):
        d = src / f"d{i}" / "sub"
        d.mkdir(parents=True)
        (d / "file.txt").write_text(f"content {i}\n" * (i * 100 + 1))
        (src / f"d{i}" / "empty").write_bytes(b"")
    (src / "top.bin").write_bytes(os.urandom(300_000))
    subprocess.run(["cp", "-r", str(src), str(mnt / "tree")], check=True)
    out = tmp_path / "back"
    subprocess.run(["cp", "-r", str(mnt / "tree"), str(out)], check=True)
    r = subprocess.run(["diff", "-r", str(src), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_rename_file_and_directory(mnt: Mount, storage: Storage) -> None:
    (mnt / "a.txt").write_text("A")
    os.rename(mnt / "a.txt", mnt / "b.txt")
    assert not (mnt / "a.txt").exists()
    assert (mnt / "b.txt").read_text() == "A"

    (mnt / "dir" / "sub").mkdir(parents=True)
    (mnt / "dir" / "one").write_text("1")
    (mnt / "dir" / "sub" / "two").write_text("2")
    os.rename(mnt / "dir", mnt / "moved")
    assert sorted(os.listdir(mnt / "moved")) == ["one", "sub"]
    assert (mnt / "moved" / "sub" / "two").read_text() == "2"
    assert not (mnt / "dir").exists()
    keys = s3_keys(storage, mnt.bucket)
    assert {"moved/one", "moved/sub/two"} <= keys
    assert not any(k.startswith("dir/") for k in keys)

    # rename over an existing file replaces it
    (mnt / "c.txt").write_text("C")
    os.replace(mnt / "b.txt", mnt / "c.txt")
    assert (mnt / "c.txt").read_text() == "A"


def test_rename_noreplace_and_exchange(mnt: Mount) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    (mnt / "x").write_text("x")
    (mnt / "y").write_text("y")
    AT_FDCWD, RENAME_NOREPLACE, RENAME_EXCHANGE = -100, 1, 2
    for flag, expected in ((RENAME_NOREPLACE, errno.EEXIST), (RENAME_EXCHANGE, errno.EINVAL)):
        rc = libc.renameat2(AT_FDCWD, bytes(mnt / "x"), AT_FDCWD, bytes(mnt / "y"), flag)
        assert rc == -1 and ctypes.get_errno() == expected
    assert (mnt / "x").read_text() == "x" and (mnt / "y").read_text() == "y"


def test_mkdir_rmdir_enotempty(mnt: Mount, storage: Storage) -> None:
    os.mkdir(mnt / "d")
    assert "d/" in s3_keys(storage, mnt.bucket)
    (mnt / "d" / "f").write_text("f")
    with pytest.raises(OSError) as e:
        os.rmdir(mnt / "d")
    assert e.value.errno == errno.ENOTEMPTY
    os.unlink(mnt / "d" / "f")
    os.rmdir(mnt / "d")
    assert not (mnt / "d").exists()
    assert s3_keys(storage, mnt.bucket) == set()
    with pytest.raises(FileExistsError):
        os.mkdir(mnt)


def test_unlink_while_open(mnt: Mount, storage: Storage) -> None:
    p = mnt / "tmpfile"
    p.write_bytes(b"keep reading me")
    with open(p, "rb") as f:
        os.unlink(p)
        assert not p.exists()
        assert f.read() == b"keep reading me"
        assert os.fstat(f.fileno()).st_size == 15

    def deleted() -> None:
        assert "tmpfile" not in s3_keys(storage, mnt.bucket)

    eventually(deleted)

    with open(mnt / "w", "wb") as f:  # written after unlink: never uploaded
        f.write(b"a")
        os.unlink(mnt / "w")
        f.write(b"b")
    assert "w" not in s3_keys(storage, mnt.bucket)


def test_unsupported_operations_give_clean_errnos(mnt: Mount) -> None:
    (mnt / "f").write_text("f")
    with pytest.raises(OSError) as e:
        os.link(mnt / "f", mnt / "hard")
    assert e.value.errno == errno.EPERM
    with pytest.raises(OSError) as e:
        os.mkfifo(mnt / "fifo")
    assert e.value.errno == errno.EPERM
    assert os.statvfs(mnt).f_namemax == 255
    # the mount survives all of that
    assert (mnt / "f").read_text() == "f"


def test_objects_put_behind_the_mount_appear_after_ttl(mnt: Mount, storage: Storage) -> None:
    assert os.listdir(mnt.path) == []
    storage.client.put_object(Bucket=mnt.bucket, Key="outside/new.txt", Body=b"hi")
    deadline = time.monotonic() + 10
    while "outside" not in os.listdir(mnt.path):
        assert time.monotonic() < deadline, "object never appeared"
        time.sleep(0.2)
    assert (mnt / "outside" / "new.txt").read_bytes() == b"hi"


def test_ls_l_of_1200_objects_heads_once_then_lists_only(
    mount_factory, bucket: str, storage: Storage
) -> None:
    # 1,200 objects a plain S3 client wrote (no POSIX metadata: two LIST pages), and 150
    # that s3fs-fuse wrote (mode and owner in x-amz-meta-* headers).
    def put(i: int) -> None:
        if i < 1200:
            storage.client.put_object(Bucket=bucket, Key=f"many/f{i:05d}", Body=b"x" * (i % 7))
        else:
            storage.client.put_object(Bucket=bucket, Key=f"rich/f{i:05d}", Body=b"r",
                                      Metadata={"mode": str(0o100600), "uid": "1234"})  # fmt: skip

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(1350)))

    def ls_l(m: Mount, d: str, n: int) -> tuple[dict[str, int], list[str]]:
        before = m.requests()
        out = subprocess.run(["ls", "-ln", str(m / d)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()[1:]  # after "total"
        assert len(lines) == n
        after = m.requests()
        return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}, lines

    # A fresh mount with an empty cache.  A listing has no POSIX metadata: a few HEADs find
    # that the plain directory's objects carry none, and the rest show the mount's defaults.
    m = mount_factory(bucket, "--listing-ttl", "60")
    first, lines = ls_l(m, "many", 1200)
    assert first.get("HeadObject", 0) <= 5 and "GetObject" not in first, first
    assert all(line.startswith("-rw-r--r--") for line in lines)
    # The s3fs-fuse directory: each object HEADed once (in parallel), its mode shown.
    first, lines = ls_l(m, "rich", 150)
    assert 150 <= first.get("HeadObject", 0) <= 151, first  # the entries (and a marker)
    assert all(line.startswith("-rw------- 1 1234 ") for line in lines), lines[:3]
    # Mounted again with the cache kept: the listings only (the cache kept the metadata of
    # rich's objects, and that many was found plain while it held these very files).
    m.unmount()
    m.mount()
    again, _ = ls_l(m, "rich", 150)
    assert again.get("HeadObject", 0) == 0, again
    again, _ = ls_l(m, "many", 1200)
    assert again.get("HeadObject", 0) == 0, again
    assert again.get("ListObjectsV2", 0) <= 3, again
    # One object more: not the files the sample judged, so the next mount samples again.
    storage.client.put_object(Bucket=bucket, Key="many/new", Body=b"n")
    m.unmount()
    m.mount()
    again, lines = ls_l(m, "many", 1201)
    assert 1 <= again.get("HeadObject", 0) <= 5, again
    assert all(line.startswith("-rw-r--r--") for line in lines)


def test_a_walk_samples_each_directory_before_the_program_gets_there(
    mount_factory, bucket: str, storage: Storage
) -> None:
    # Four directories of a plain client's objects, and one whose objects carry a mode.
    for d in ("a", "b", "c", "d"):
        for i in range(3):
            storage.client.put_object(Bucket=bucket, Key=f"tree/{d}/f{i}", Body=b"x")
    for i in range(3):
        storage.client.put_object(Bucket=bucket, Key=f"tree/rich/f{i}", Body=b"r",
                                  Metadata={"mode": str(0o100600)})  # fmt: skip
    m = mount_factory(bucket, "--listing-ttl", "60")
    before = m.requests().get("HeadObject", 0)
    # A readdir with subdirectories starts a walk.  The lookup and the readdir sample the
    # root and tree: one HEAD each (a marker that is not there: plain directories).
    assert len(os.listdir(m / "tree")) == 5

    # Without the program looking into them, each directory gets its sample HEAD (one,
    # below a plain directory).
    def sampled() -> None:
        assert m.requests().get("HeadObject", 0) - before >= 2 + 5

    eventually(sampled)
    before = m.requests()
    out = subprocess.run(["ls", "-lR", str(m / "tree")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    after = m.requests()
    # Only the rich directory's other two objects still need their HEADs.
    assert after.get("HeadObject", 0) - before.get("HeadObject", 0) <= 2
    assert after.get("ListObjectsV2", 0) == before.get("ListObjectsV2", 0)
    assert stat.S_IMODE(os.stat(m / "tree/rich/f0").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(m / "tree/a/f0").st_mode) == 0o644


def test_a_walk_samples_only_the_trees_a_program_goes_through(
    mount_factory, bucket: str, storage: Storage
) -> None:
    # Lookups in two top-level directories start a walk of the whole bucket: it lists every
    # directory, but no program is going through them, so none gets its sample HEAD until
    # a readdir of their tree says one is.
    for d in range(20):
        for name in ("f", "g"):
            storage.client.put_object(Bucket=bucket, Key=f"many/sub/d{d:02d}/{name}", Body=b"x")
    storage.client.put_object(Bucket=bucket, Key="many/x", Body=b"x")
    storage.client.put_object(Bucket=bucket, Key="one/x", Body=b"x")
    m = mount_factory(bucket, "--listing-ttl", "60")
    os.stat(m / "one" / "x")
    before = m.requests()
    os.stat(m / "many" / "x")  # a second top-level directory: a walk of it all
    time.sleep(0.5)  # the walk's page comes meanwhile
    lists = m.requests().get("ListObjectsV2", 0)
    assert sorted(os.listdir(m / "many" / "sub" / "d07")) == ["f", "g"]  # listed by the walk
    time.sleep(1)
    after = m.requests()
    assert after.get("ListObjectsV2", 0) == lists, after
    # The samples of many (for the stat) and of d07 (for its readdir: one HEAD, as sub is
    # plain: its entries are directories without a marker): 19 fewer than when every
    # walked directory was sampled.
    assert after.get("HeadObject", 0) - before.get("HeadObject", 0) <= 2, after

    assert len(os.listdir(m / "many" / "sub")) == 20  # ls -R sub: now it is sampled ahead

    # One HEAD for each of the other 19 directories (sub is plain).
    def sampled() -> None:
        assert m.requests().get("HeadObject", 0) - after.get("HeadObject", 0) == 19

    eventually(sampled)
    time.sleep(0.5)
    sampled()


def test_a_walk_asks_no_metadata_of_directories_without_a_marker(
    mount_factory, bucket: str, storage: Storage
) -> None:
    # Directories that exist only as key prefixes have no object to HEAD: a flat listing
    # shows which ones have a marker, and only those (and the files) are sampled.
    for i in range(3):
        for j in range(3):
            for k in range(2):
                storage.client.put_object(Bucket=bucket, Key=f"imp/a{i}/b{j}/f{k}", Body=b"x")
    storage.client.put_object(Bucket=bucket, Key="imp/a0/m/", Body=b"",
                              Metadata={"mode": str(0o40700)})  # fmt: skip
    m = mount_factory(bucket, "--listing-ttl", "60")
    os.stat(m / "imp")
    before = m.requests().get("HeadObject", 0)
    out = subprocess.run(["find", str(m / "imp")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 1 + 3 + 9 + 18 + 1

    # imp's sample (one subdirectory's marker: none; one HEAD below the plain root), a0's
    # (its only unknown entry, the marker of m), and one file of each of the nine leaf
    # directories.  Before, a1 and a2 cost a HEAD each, and a0's single sample HEAD could
    # pick a directory without a marker over m, and show m with the defaults.
    def sampled() -> None:
        assert m.requests().get("HeadObject", 0) - before == 1 + 1 + 9

    eventually(sampled)
    time.sleep(0.5)  # no more come
    assert m.requests().get("HeadObject", 0) - before == 1 + 1 + 9
    assert stat.S_IMODE(os.stat(m / "imp/a0/m").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(m / "imp/a1").st_mode) == 0o755


def test_first_byte_before_whole_object(mnt: Mount, storage: Storage) -> None:
    size = 50 * 1024 * 1024
    storage.client.put_object(Bucket=mnt.bucket, Key="big50", Body=os.urandom(size))
    time.sleep(1.2)  # listing TTL
    before = mnt.status()["bytes_in"]
    with open(mnt / "big50", "rb") as f:
        first = f.read(4096)
        fetched = mnt.status()["bytes_in"] - before
    assert len(first) == 4096
    assert fetched < size // 4, f"{fetched} bytes fetched for the first 4 KiB"


def test_metadata_changes_that_change_nothing_send_no_request(mnt: Mount) -> None:
    # tar and cp -a chown what they just made to the owner it already has.
    p = mnt / "owned.txt"
    p.write_text("x")
    os.chown(p, 1000, 1000)
    os.chmod(p, 0o640)
    before = mnt.requests()
    os.chown(p, 1000, 1000)
    os.chmod(p, 0o640)
    os.chown(p, -1, -1)
    assert mnt.requests().get("CopyObject", 0) == before.get("CopyObject", 0)
    os.chown(p, 1001, -1)  # a real change: one copy in place
    assert mnt.requests().get("CopyObject", 0) == before.get("CopyObject", 0) + 1
    assert os.stat(p).st_uid == 1001


def test_extended_attributes(mnt: Mount, storage: Storage) -> None:
    p = mnt / "tagged.txt"
    p.write_text("x")
    os.setxattr(p, "user.color", b"red")
    assert os.getxattr(p, "user.color") == b"red"
    assert os.listxattr(p) == ["user.color"]
    assert "xattr" in storage.client.head_object(Bucket=mnt.bucket, Key="tagged.txt")["Metadata"]
    etag = storage.client.head_object(Bucket=mnt.bucket, Key="tagged.txt")["ETag"]
    assert os.getxattr(p, "s3.etag").decode() == etag.strip('"')
    os.removexattr(p, "user.color")
    with pytest.raises(OSError) as missing:
        os.getxattr(p, "user.color")
    assert missing.value.errno == errno.ENODATA
    # Other namespaces are not supported, which ls -l remembers for the whole mount
    # instead of asking for each file's SELinux label and ACLs.
    for name in ("security.selinux", "system.posix_acl_access", "trusted.x"):
        with pytest.raises(OSError) as unsupported:
            os.getxattr(p, name)
        assert unsupported.value.errno == errno.EOPNOTSUPP, name
    with pytest.raises(OSError) as refused:
        os.setxattr(p, "trusted.x", b"1")
    assert refused.value.errno == errno.EOPNOTSUPP
    for i in range(3):
        (mnt / f"plain{i}").write_text("y")
    trace = subprocess.run(
        ["strace", "-e", "trace=getxattr,lgetxattr", "ls", "-l", str(mnt.path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "tagged.txt" in trace.stdout
    assert trace.stderr.count("EOPNOTSUPP") <= 2, trace.stderr  # once per kind, not per file


def test_kernel_readahead_is_raised_to_1_mib(mnt: Mount) -> None:
    # The daemon raises the kernel's readahead on its mount (as root) from 128 KiB to 1 MiB.
    dev = os.stat(mnt.path).st_dev
    ra = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    assert ra.read_text().strip() == "1024"


def test_random_reads_fetch_the_whole_file_in_the_background(mnt: Mount, storage: Storage) -> None:
    # Random 4 KiB reads each wait for one 1 MiB block; once those after a jump backward
    # have fetched 1/32 of the file, the rest comes in the background and later reads need
    # no request.
    size = 40 * 1024 * 1024
    data = os.urandom(size)
    storage.client.put_object(Bucket=mnt.bucket, Key="rand.bin", Body=data)
    time.sleep(1.2)  # listing TTL
    rng = random.Random(7)
    offsets = [rng.randrange(0, size - 4096) for _ in range(300)]
    before = mnt.status()["bytes_in"]
    fd = os.open(mnt / "rand.bin", os.O_RDONLY)
    try:
        for o in (30 * 1024 * 1024, 20 * 1024 * 1024 + 5, 10 * 1024 * 1024 + 7):  # jumps back
            assert os.pread(fd, 4096, o) == data[o : o + 4096]

        def all_fetched() -> None:
            assert mnt.status()["bytes_in"] - before >= size

        eventually(all_fetched, timeout=30)
        gets = mnt.requests()["GetObject"]
        for o in offsets:
            assert os.pread(fd, 4096, o) == data[o : o + 4096]
        assert mnt.requests()["GetObject"] == gets
    finally:
        os.close(fd)
    assert mnt.status()["bytes_in"] - before < size + 4 * 1024 * 1024  # each block once


def test_reads_skipping_forward_do_not_fetch_the_whole_file(mnt: Mount, storage: Storage) -> None:
    # A re-read that finds most pages in the kernel's cache reaches the daemon only for the
    # holes, always further on: that is not a random pattern.
    size = 40 * 1024 * 1024
    data = os.urandom(size)
    storage.client.put_object(Bucket=mnt.bucket, Key="skip.bin", Body=data)
    time.sleep(1.2)  # listing TTL
    before = mnt.status()["bytes_in"]
    with open(mnt / "skip.bin", "rb", buffering=0) as f:
        for o in range(0, size, 5 * 1024 * 1024):
            f.seek(o)
            assert f.read(4096) == data[o : o + 4096]
        time.sleep(1)
    assert mnt.status()["bytes_in"] - before < 16 * 1024 * 1024


def test_closed_files_data_is_kept_for_the_next_open(mnt: Mount, storage: Storage) -> None:
    # After the last close the file's fetched blocks stay on disk (--cache-size), so a re-read
    # after the kernel dropped its pages sends no GET; a new version of the object is fetched.
    size = 8 * 1024 * 1024
    data = os.urandom(size)
    storage.client.put_object(Bucket=mnt.bucket, Key="kept.bin", Body=data)
    time.sleep(1.2)  # listing TTL

    def read_dropping_kernel_pages() -> bytes:
        with open(mnt / "kept.bin", "rb") as f:
            got = f.read()
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return got

    assert read_dropping_kernel_pages() == data
    gets = mnt.requests()["GetObject"]
    assert read_dropping_kernel_pages() == data
    assert read_dropping_kernel_pages() == data
    assert mnt.requests()["GetObject"] == gets
    assert mnt.status()["cache"]["kept_hits"] >= 2
    assert mnt.status()["kept_bytes"] >= size

    # A new version behind the mount: once the listing expires, its data comes from S3.
    changed = os.urandom(size)
    storage.client.put_object(Bucket=mnt.bucket, Key="kept.bin", Body=changed)
    time.sleep(1.2)
    assert read_dropping_kernel_pages() == changed
    assert mnt.requests()["GetObject"] > gets


def test_cache_size_0_keeps_nothing(mount_factory, bucket: str, storage: Storage) -> None:
    m = mount_factory(bucket, "--cache-size", "0")
    storage.client.put_object(Bucket=bucket, Key="f.bin", Body=b"x" * 3_000_000)
    for _ in range(2):
        with open(m / "f.bin", "rb") as f:
            assert f.read() == b"x" * 3_000_000
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert m.requests()["GetObject"] == 2
    assert not [n for n in os.listdir(m.cache / "open") if n.startswith("kept-")]


def test_a_streamed_read_stays_off_the_disk_and_a_write_into_it_lands(
    mount_factory, bucket: str, storage: Storage
) -> None:
    # Without a disk cache, what a sequential read fetches is served from memory and never
    # written to the local file; a write in the middle of it still reads back and uploads.
    m = mount_factory(bucket, "--cache-size", "0")
    size = 40 * 1024 * 1024
    data = os.urandom(size)
    storage.client.put_object(Bucket=bucket, Key="s.bin", Body=data)

    def on_disk() -> int:
        return sum(e.stat().st_blocks * 512 for e in os.scandir(m.cache / "open"))

    fd = os.open(m / "s.bin", os.O_RDWR)
    try:
        got = b"".join(os.pread(fd, 1 << 20, off) for off in range(0, 20 << 20, 1 << 20))
        assert got == data[: 20 << 20]
        assert on_disk() < 1 << 20
        at = (24 << 20) - 3  # in what the readahead has fetched by now
        assert os.pwrite(fd, b"written", at) == 7
        want = data[:at] + b"written" + data[at + 7 :]
        rest = b"".join(os.pread(fd, 1 << 20, off) for off in range(20 << 20, size, 1 << 20))
        assert rest == want[20 << 20 :]
    finally:
        os.close(fd)
    assert s3_bytes(storage, bucket, "s.bin") == want


def page_cache_bytes(fd: int) -> int | None:
    """How much of the file behind ``fd`` the kernel's page cache holds: cachestat(2), which
    needs Linux 6.5 (None before)."""
    out = ctypes.create_string_buffer(40)  # struct cachestat: five u64, nr_cache first
    whole = ctypes.create_string_buffer(16)  # struct cachestat_range {0, 0}: the whole file
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(451, fd, whole, out, 0) != 0:  # 451: cachestat on x86-64 and arm64
        if ctypes.get_errno() == errno.ENOSYS:
            return None
        raise OSError(ctypes.get_errno(), "cachestat")
    return int.from_bytes(out.raw[:8], "little") * mmap.PAGESIZE


def test_a_file_written_out_is_not_cached_twice_and_readers_stay_coherent(
    mnt: Mount, storage: Storage
) -> None:
    # A write-only open (cp, tar, rsync, dd) bypasses the kernel's page cache: the bytes are
    # in the daemon's temp file already.  A read-write open writes through the page cache.
    size = 8 << 20
    data = os.urandom(size)
    for name, mode, cached in (("out.bin", "wb", 0), ("rw.bin", "w+b", size)):
        with open(mnt / name, mode) as f:
            f.write(data)
            f.flush()
            assert page_cache_bytes(f.fileno()) in (None, cached)
        assert s3_bytes(storage, mnt.bucket, name) == data
        assert (mnt / name).read_bytes() == data

    # tail -f: a reader opened while the writer works sees every append and every overwrite.
    w = os.open(mnt / "log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    r = os.open(mnt / "log", os.O_RDONLY)
    try:
        os.write(w, b"one\n")
        assert os.read(r, 100) == b"one\n"
        os.write(w, b"two\n")
        assert os.read(r, 100) == b"two\n"
        os.pwrite(w, b"ONE\n", 0)
        assert os.pread(r, 100, 0) == b"ONE\ntwo\n"
    finally:
        os.close(w)
        os.close(r)
    # A writer that opens while a reader holds cached pages writes through the page cache.
    r = os.open(mnt / "log", os.O_RDONLY)
    try:
        assert os.pread(r, 100, 0) == b"ONE\ntwo\n"
        w = os.open(mnt / "log", os.O_WRONLY)
        try:
            os.pwrite(w, b"uno\n", 0)
            assert os.pread(r, 100, 0) == b"uno\ntwo\n"
        finally:
            os.close(w)
    finally:
        os.close(r)
    assert s3_bytes(storage, mnt.bucket, "log") == b"uno\ntwo\n"


def test_unmount_uploads_and_remount_sees_everything(
    mount_factory, bucket: str, storage: Storage
) -> None:
    m = mount_factory(bucket)
    payload = os.urandom(3_000_000)
    f = open(m / "late.bin", "wb")  # noqa: SIM115
    f.write(payload)
    f.close()
    (m / "dir").mkdir()
    (m / "dir" / "x").write_text("x")
    m.unmount()
    assert not os.path.ismount(m.path)
    assert s3_bytes(storage, bucket, "late.bin") == payload
    m.mount()
    assert sorted(os.listdir(m.path)) == ["dir", "late.bin"]
    assert (m / "late.bin").read_bytes() == payload
    assert filecmp.cmp(m / "dir" / "x", m / "dir" / "x")


def test_read_only_mount(mount_factory, bucket: str, storage: Storage) -> None:
    storage.client.put_object(Bucket=bucket, Key="r.txt", Body=b"r")
    m = mount_factory(bucket, "-o", "ro")
    assert (m / "r.txt").read_bytes() == b"r"
    for action in (
        lambda: (m / "w.txt").write_text("w"),
        lambda: os.mkdir(m / "d"),
        lambda: os.unlink(m / "r.txt"),
    ):
        with pytest.raises(OSError) as e:
            action()
        assert e.value.errno == errno.EROFS


def test_prefix_mount(mount_factory, bucket: str, storage: Storage) -> None:
    storage.client.put_object(Bucket=bucket, Key="outside.txt", Body=b"o")
    storage.client.put_object(Bucket=bucket, Key="sub/tree/in.txt", Body=b"i")
    m = mount_factory(f"{bucket}:sub/tree")
    assert os.listdir(m.path) == ["in.txt"]
    (m / "new.txt").write_text("n")
    assert "sub/tree/new.txt" in s3_keys(storage, bucket)


def test_mount_errors_are_one_line(s3_server, tmp_path: Path) -> None:
    from conftest import run_cli

    (tmp_path / "m").mkdir()
    r = run_cli("--endpoint-url", s3_server.endpoint, "no-such-bucket-here", str(tmp_path / "m"))
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    assert not os.path.ismount(tmp_path / "m")
    r = run_cli("--endpoint-url", s3_server.endpoint, "bucket", str(tmp_path / "missing-dir"))
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_drop_cache_after_changes_behind_the_mount(
    mount_factory, bucket: str, storage: Storage
) -> None:
    from conftest import run_cli

    m = mount_factory(bucket, "--listing-ttl", "3600", "--attr-timeout", "0.1")
    (m / "d").mkdir()
    (m / "d" / "f").write_text("old")
    assert os.listdir(m / "d") == ["f"]
    storage.client.put_object(Bucket=bucket, Key="d/new", Body=b"n")
    storage.client.put_object(
        Bucket=bucket, Key="d/f", Body=b"changed", Metadata={"mode": str(0o100600)}
    )
    time.sleep(0.2)
    assert os.listdir(m / "d") == ["f"]  # the hour-long listing TTL hides both changes
    r = run_cli("drop-cache", str(m / "d"))
    assert r.returncode == 0, r.stderr
    time.sleep(0.2)  # the kernel's own attribute cache
    assert sorted(os.listdir(m / "d")) == ["f", "new"]
    assert (m / "d" / "f").read_text() == "changed"
    assert os.stat(m / "d" / "f").st_mode & 0o777 == 0o600
    r = run_cli("drop-cache", "/tmp")
    assert r.returncode != 0 and "not on an s3mount mount" in r.stderr


def test_rm_rf_sends_batched_deletes_and_keeps_order_with_new_writes(
    mnt: Mount, storage: Storage
) -> None:
    # rm -rf unlinks file after file; the mount answers each at once and sends the deletes
    # in batches (DeleteObjects) behind it, so S3 sees far fewer requests than files.
    n = 300
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: storage.client.put_object(Bucket=mnt.bucket, Key=f"d/f{i:03d}"),
                      range(n)))  # fmt: skip
    assert len(os.listdir(mnt / "d")) == n
    before = mnt.requests()
    subprocess.run(["rm", "-rf", str(mnt / "d")], check=True, timeout=120)
    sent = {k: v - before.get(k, 0) for k, v in mnt.requests().items()}
    deletes = sent.get("DeleteObject", 0) + sent.get("DeleteObjects", 0)
    assert 0 < deletes < n // 3, sent
    assert not (mnt / "d").exists()
    assert s3_keys(storage, mnt.bucket) == set()  # rmdir waited for the deletes below it

    # A file written again right after its unlink is not deleted by the late delete.
    p = mnt / "again"
    for i in range(20):
        p.write_bytes(b"v%d" % i)
        os.unlink(p)
    p.write_bytes(b"last")
    mnt.unmount()
    assert s3_keys(storage, mnt.bucket) == {"again"}
    assert s3_bytes(storage, mnt.bucket, "again") == b"last"


def test_find_and_ls_R_of_a_tree_list_it_flat(mount_factory, bucket: str, storage: Storage) -> None:
    # find and ls -R visit directory after directory.  Listing each one (a LIST per
    # directory) would cost a round trip each; instead the first listing that shows
    # subdirectories starts one flat listing of the subtree, and every directory's
    # listing comes from its pages.
    keys = [f"tree/d{d:02d}/f{i:02d}" for d in range(30) for i in range(10)]
    keys += [f"tree/d00/deep/er/f{i}" for i in range(3)] + ["tree/d07/", "tree/top"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: storage.client.put_object(Bucket=bucket, Key=k), keys))
    m = mount_factory(bucket, "--listing-ttl", "60")
    before = m.requests()
    out = subprocess.run(["find", str(m / "tree")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    found = {p[len(os.fspath(m)) + 1 :] for p in out.stdout.splitlines()}
    expected = {k.rstrip("/") for k in keys}
    for k in keys:  # and every directory on the way
        parts = k.rstrip("/").split("/")
        expected |= {"/".join(parts[:i]) for i in range(1, len(parts))}
    assert found == expected
    sent = {k: v - before.get(k, 0) for k, v in m.requests().items()}
    assert sent.get("ListObjectsV2", 0) <= 4, sent  # root, tree, the flat listing of tree
    # ls -lR afterwards: everything from the caches.
    before = m.requests()
    out = subprocess.run(["ls", "-lR", str(m / "tree")], capture_output=True, timeout=120)
    assert out.returncode == 0
    sent = {k: v - before.get(k, 0) for k, v in m.requests().items() if v != before.get(k, 0)}
    assert sent.get("ListObjectsV2", 0) == 0, sent


def test_append_to_a_big_object_sends_only_the_tail(mnt: Mount, storage: Storage) -> None:
    # The unchanged head is copied in S3 (UploadPartCopy): neither downloaded nor uploaded.
    head = os.urandom(12 * 1024 * 1024 + 333)
    storage.client.put_object(Bucket=mnt.bucket, Key="big.log", Body=head)
    time.sleep(1.2)  # listing TTL
    before = mnt.status()
    want = head
    for i in range(2):
        want += append_line(mnt / "big.log", i)
        assert s3_bytes(storage, mnt.bucket, "big.log") == want
    after = mnt.status()
    sent = sent_between(before, after)
    assert sent.get("UploadPartCopy") == 2, sent
    assert sent["bytes_in"] <= 2 * 1024 * 1024  # the last block, once
    assert sent["bytes_out"] < 1024 * 1024
    # The mount reads the new version whole: the head's blocks it never fetched come from S3.
    with open(mnt / "big.log", "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert f.read() == want

    # A change inside the head is uploaded whole, as before.
    with open(mnt / "big.log", "r+b") as f:
        f.seek(1000)
        f.write(b"X")
    want = want[:1000] + b"X" + want[1001:]
    assert s3_bytes(storage, mnt.bucket, "big.log") == want
    assert mnt.requests().get("UploadPartCopy", 0) == after["requests"].get("UploadPartCopy", 0)
