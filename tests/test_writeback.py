"""Write-back mode and crash safety: whatever close() accepted ends up in S3."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, append_line, run_cli, s3_bytes, s3_keys, sent_between, wait_gone
from faultproxy import FaultProxy


def kill_daemon(m: Mount) -> None:
    assert m.pid
    os.kill(m.pid, signal.SIGKILL)
    wait_gone(m.pid, timeout=10)
    m.pid = None


def wait_for(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def proxied_wb(s3_server, bucket: str, tmp_path: Path) -> Iterator[tuple[Mount, FaultProxy]]:
    with FaultProxy(s3_server.port) as proxy:
        m = Mount(proxy.endpoint, bucket, tmp_path / "m", tmp_path / "cache",
                  "--write-back", "0", "--retries", "2")  # fmt: skip
        try:
            yield m.mount(), proxy
        finally:
            proxy.clear()
            m.cleanup()


def test_close_returns_before_upload_and_sync_waits(mount_factory, bucket, storage) -> None:
    m: Mount = mount_factory(bucket, "--write-back", "3600")
    payload = os.urandom(300_000)
    (m / "late.bin").write_bytes(payload)
    (m / "dir").mkdir()
    (m / "dir" / "small.txt").write_text("small")
    # journaled, not uploaded: readers and listings already see the new data
    assert s3_keys(storage, bucket) == set()
    assert (m / "late.bin").read_bytes() == payload
    assert sorted(os.listdir(m.path)) == ["dir", "late.bin"]
    st = m.status()
    assert st["pending_uploads"] == 3 and st["pending_bytes"] == 300_005  # and dir's marker
    r = run_cli("sync", str(m.path))
    assert r.returncode == 0, r.stderr
    assert s3_bytes(storage, bucket, "late.bin") == payload
    assert s3_bytes(storage, bucket, "dir/small.txt") == b"small"
    assert s3_bytes(storage, bucket, "dir/") == b""
    assert m.status()["pending_uploads"] == 0


def test_unmount_waits_for_pending_uploads(mount_factory, bucket, storage) -> None:
    m: Mount = mount_factory(bucket, "--write-back", "3600")
    for i in range(20):
        (m / f"f{i}").write_text(f"file {i}")
    m.unmount()
    assert s3_keys(storage, bucket) == {f"f{i}" for i in range(20)}


def test_unmount_no_wait_keeps_the_journal_for_the_next_mount(mount_factory, bucket,
                                                               storage) -> None:  # fmt: skip
    m: Mount = mount_factory(bucket, "--write-back", "3600")
    (m / "kept.txt").write_text("kept for later")
    r = run_cli("unmount", "--no-wait", str(m.path))
    assert r.returncode == 0, r.stderr
    m.pid = None
    assert "kept.txt" not in s3_keys(storage, bucket)
    m.options = ["--write-back", "0"]
    m.mount()
    wait_for(lambda: "kept.txt" in s3_keys(storage, bucket))
    assert s3_bytes(storage, bucket, "kept.txt") == b"kept for later"


def test_after_a_reboot_only_fsynced_files_are_uploaded(mount_factory, bucket, storage) -> None:
    # close() journals without fsync (a crash of the daemon keeps the data: the kernel has
    # it); fsync() makes the journal entry survive a power loss too.  After a reboot, an
    # entry that was never fsync'd may point to incomplete data: it is kept in unsaved/,
    # never uploaded over the object.
    m: Mount = mount_factory(bucket, "--write-back", "3600")
    (m / "closed.txt").write_text("closed only")
    with open(m / "synced.txt", "w") as f:
        f.write("fsync'd")
        f.flush()
        os.fsync(f.fileno())
    kill_daemon(m)
    db = sqlite3.connect(m.cache / "journal.sqlite")
    rows = dict(db.execute("SELECT key, boot FROM pending").fetchall())
    assert rows["synced.txt"] is None and rows["closed.txt"], rows
    db.execute("UPDATE pending SET boot = 'an-earlier-boot' WHERE boot IS NOT NULL")
    db.commit()
    db.close()
    m.options = ["--write-back", "0"]
    m.mount()
    run_cli("sync", str(m.path))
    assert s3_bytes(storage, bucket, "synced.txt") == b"fsync'd"
    assert "closed.txt" not in s3_keys(storage, bucket)
    (kept,) = m.status()["recovered"]
    assert kept.endswith(".unverified") and "closed.txt" in kept
    assert Path(kept).read_text() == "closed only"


def test_kill_9_then_remount_uploads_everything(mount_factory, bucket, storage) -> None:
    m: Mount = mount_factory(bucket, "--write-back", "3600")
    files = {f"d/f{i}.bin": os.urandom(1000 + i) for i in range(30)}
    (m / "d").mkdir()
    for name, data in files.items():
        (m / name).write_bytes(data)
    kill_daemon(m)
    assert not any(k.startswith("d/f") for k in s3_keys(storage, bucket))
    m.options = ["--write-back", "0"]
    m.mount()  # clears the dead mount, finds the journal
    run_cli("sync", str(m.path))
    for name, data in files.items():
        assert s3_bytes(storage, bucket, name) == data


def test_power_loss_copy_of_the_cache_directory(mount_factory, bucket, storage,
                                                tmp_path: Path) -> None:  # fmt: skip
    m: Mount = mount_factory(bucket, "--write-back", "3600")
    (m / "a.txt").write_text("survives a power loss")
    kill_daemon(m)
    # "the disk as it was": a copy of the cache directory taken right after the kill
    snapshot = tmp_path / "cache-snapshot"
    shutil.copytree(m.cache, snapshot)
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], capture_output=True)
    shutil.rmtree(m.cache)
    m.cache = snapshot
    m.options = ["--write-back", "0"]
    m.mount()
    run_cli("sync", str(m.path))
    assert s3_bytes(storage, bucket, "a.txt") == b"survives a power loss"


def test_file_open_for_writing_at_the_crash_is_kept_not_uploaded(
    mount_factory, bucket, storage
) -> None:
    storage.client.put_object(Bucket=bucket, Key="doc.txt", Body=b"the version in S3")
    m: Mount = mount_factory(bucket)
    writer = subprocess.Popen(
        ["python3", "-c",
         "import sys,time; f=open(sys.argv[1],'r+b'); f.write(b'HALF-WRITTEN'); f.flush();"
         " print('ok', flush=True); time.sleep(60)", str(m / "doc.txt")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ok"
        kill_daemon(m)
    finally:
        writer.kill()
        writer.wait()
    m.mount()
    assert s3_bytes(storage, bucket, "doc.txt") == b"the version in S3"  # not silently replaced
    recovered = m.status()["recovered"]
    assert len(recovered) == 1 and "doc.txt" in recovered[0]
    assert Path(recovered[0]).read_bytes().startswith(b"HALF-WRITTEN")
    assert oct(Path(recovered[0]).stat().st_mode & 0o777) == "0o600"


def test_outage_queues_writes_and_uploads_after(proxied_wb, storage) -> None:
    m, proxy = proxied_wb
    (m / "before.txt").write_text("before")
    run_cli("sync", str(m.path))
    proxy.down = True
    for i in range(5):
        (m / f"during{i}.txt").write_text(f"written during the outage {i}")  # close succeeds
    time.sleep(2)
    st = m.status()
    assert st["pending_uploads"] == 5 and st["upload_failures"] >= 1
    proxy.down = False
    r = run_cli("sync", str(m.path))
    assert r.returncode == 0, r.stderr
    for i in range(5):
        written = s3_bytes(storage, m.bucket, f"during{i}.txt")
        assert written == f"written during the outage {i}".encode()


def test_reads_and_lookups_do_not_wait_behind_uploads(proxied_wb, storage) -> None:
    """Uploads stuck in S3 hold every write-back worker; the programs' reads, listings and
    new files go on, on threads of their own."""
    m, proxy = proxied_wb
    old = os.urandom(300_000)
    storage.client.put_object(Bucket=m.bucket, Key="old/data.bin", Body=old)
    proxy.hold("PUT")
    for i in range(40):
        (m / f"new{i}.txt").write_text(f"new {i}")  # journaled; their uploads hang in S3
    wait_for(lambda: proxy.held >= 16)  # every upload worker (--threads 16) is waiting
    results: list[object] = []

    def program() -> None:
        try:
            results.append(sorted(os.listdir(m / "old")))
            results.append((m / "old" / "data.bin").read_bytes() == old)
            (m / "new-after.txt").write_text("one more")
            results.append(proxy.held)
        except BaseException as exc:  # noqa: BLE001 - reported below
            results.append(exc)

    t = threading.Thread(target=program, daemon=True)
    t.start()
    t.join(60)
    proxy.release()
    assert len(results) == 3 and not isinstance(results[-1], BaseException), results
    listing, same, held = results
    assert listing == ["data.bin"] and same
    assert held >= 16  # the uploads were still held while the program ran
    r = run_cli("sync", str(m.path))
    assert r.returncode == 0, r.stderr
    for i in range(40):
        assert s3_bytes(storage, m.bucket, f"new{i}.txt") == f"new {i}".encode()
    assert s3_bytes(storage, m.bucket, "new-after.txt") == b"one more"


def test_rewrites_upload_only_the_last_version(mount_factory, bucket, storage) -> None:
    m: Mount = mount_factory(bucket, "--write-back", "3600")
    for i in range(10):
        (m / "log.txt").write_text(f"version {i}")
    assert m.status()["pending_uploads"] == 1
    before = m.requests().get("PutObject", 0)
    run_cli("sync", str(m.path))
    assert m.requests().get("PutObject", 0) - before == 1
    assert s3_bytes(storage, bucket, "log.txt") == b"version 9"


def test_appends_after_the_upload_reuse_the_local_data(mount_factory, bucket, storage) -> None:
    """A log appended by open/write/close: once a version is uploaded, the next append
    starts from the local copy of it, not from a download of the whole object."""
    m: Mount = mount_factory(bucket, "--write-back", "0")
    head = os.urandom(3 * 1024 * 1024 + 5)
    (m / "app.log").write_bytes(head)
    run_cli("sync", str(m.path))
    before = m.requests().get("GetObject", 0)
    for i in range(3):
        append_line(m / "app.log", i)
        r = run_cli("sync", str(m.path))
        assert r.returncode == 0, r.stderr
    want = head + b"line 0\nline 1\nline 2\n"
    assert s3_bytes(storage, bucket, "app.log") == want
    assert (m / "app.log").read_bytes() == want
    assert m.requests().get("GetObject", 0) == before
    assert m.status()["cache"]["kept_hits"] >= 3


def test_appends_to_a_big_object_upload_only_the_tail(mount_factory, bucket, storage) -> None:
    """The journal needs the whole file, so the first append downloads it once; every upload
    then copies the unchanged head in S3 (UploadPartCopy) and sends only what is new: from a
    version still in the journal and from one already uploaded."""
    m: Mount = mount_factory(bucket, "--write-back", "3600")
    head = os.urandom(12 * 1024 * 1024 + 333)
    storage.client.put_object(Bucket=bucket, Key="big.log", Body=head)
    time.sleep(1.2)  # listing TTL
    before = m.status()
    want = head
    for i in range(4):
        want += append_line(m / "big.log", i)
        if i % 2:  # two appends per upload: the second opens the journaled version
            assert run_cli("sync", str(m.path)).returncode == 0
            assert s3_bytes(storage, bucket, "big.log") == want
    sent = sent_between(before, m.status())
    assert sent.get("UploadPartCopy") == 2, sent
    assert sent["bytes_in"] < len(head) + 2 * 1024 * 1024
    assert sent["bytes_out"] < 1024 * 1024
    assert (m / "big.log").read_bytes() == want


def test_rename_and_unlink_of_journaled_files(mount_factory, bucket, storage) -> None:
    m: Mount = mount_factory(bucket, "--write-back", "3600")
    (m / "a.txt").write_text("A")
    os.rename(m / "a.txt", m / "b.txt")
    (m / "gone.txt").write_text("never uploaded")
    os.unlink(m / "gone.txt")
    run_cli("sync", str(m.path))
    assert s3_keys(storage, bucket) == {"b.txt"}
    assert s3_bytes(storage, bucket, "b.txt") == b"A"


def test_symlinks_are_journaled_and_their_owner_and_times_cost_no_request(
    mount_factory, bucket, storage
) -> None:
    # tar makes a link, then lchown and utimensat on it: in write-back mode the three are one
    # journal row and, later, one PUT that carries the final headers.
    m: Mount = mount_factory(bucket, "--write-back", "3600")
    link = m / "zone" / "link"
    link.parent.mkdir()
    os.symlink("../Europe/Paris", link)
    os.chown(link, 1234, 5678, follow_symlinks=False)
    os.utime(link, ns=(1_600_000_000 * 10**9,) * 2, follow_symlinks=False)
    assert os.readlink(link) == "../Europe/Paris"
    assert "zone/link" not in s3_keys(storage, bucket)
    before = m.requests()
    assert run_cli("sync", str(m.path)).returncode == 0
    after = m.requests()
    assert after.get("PutObject", 0) - before.get("PutObject", 0) == 2  # zone/ and the link
    assert after.get("CopyObject", 0) == before.get("CopyObject", 0)
    assert s3_bytes(storage, bucket, "zone/link") == b"../Europe/Paris"
    m.unmount()
    m.mount()
    st = os.lstat(link)
    assert stat.S_ISLNK(st.st_mode)
    assert (st.st_uid, st.st_gid, st.st_mtime) == (1234, 5678, 1_600_000_000)
    assert os.readlink(link) == "../Europe/Paris"


def test_directories_are_journaled_and_their_metadata_costs_no_request(
    mount_factory, bucket, storage
) -> None:
    # mkdir, then chmod and utimens on the directory (tar, cp -a, rsync): one journal row
    # and, later, one PUT of the marker with the final headers.  A directory removed before
    # its upload costs no request at all.
    m: Mount = mount_factory(bucket, "--write-back", "3600")
    d = m / "d"
    d.mkdir()
    os.chmod(d, 0o700)
    os.utime(d, ns=(1_600_000_000 * 10**9,) * 2)
    (d / "sub").mkdir()
    (d / "sub").rmdir()
    (m / "gone").mkdir()
    (m / "gone").rmdir()
    assert s3_keys(storage, bucket) == set()
    os.setxattr(m.path, "user.s3mount.invalidate", b"1")  # listings come from S3 again
    assert os.listdir(m.path) == ["d"] and os.listdir(d) == []
    st = os.stat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    with pytest.raises(FileNotFoundError):
        os.stat(m / "gone")
    before = m.requests()
    assert run_cli("sync", str(m.path)).returncode == 0
    after = m.requests()
    sent = {op: n - before.get(op, 0) for op, n in after.items() if n != before.get(op, 0)}
    assert sent == {"PutObject": 1}
    assert s3_keys(storage, bucket) == {"d/"}
    m.unmount()
    m.mount()
    st = os.stat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_mtime == 1_600_000_000
    e = m / "e"
    e.mkdir()
    assert run_cli("sync", str(m.path)).returncode == 0
    os.chmod(e, 0o711)  # journaled again: S3 has the marker the row will replace
    e.rmdir()  # so the marker must be deleted
    d.rmdir()
    assert run_cli("sync", str(m.path)).returncode == 0
    assert s3_keys(storage, bucket) == set()


def test_ten_thousand_journal_entries_start_in_seconds(mount_factory, bucket, storage,
                                                       tmp_path: Path) -> None:  # fmt: skip
    m: Mount = mount_factory(bucket, "--write-back", "3600")
    (m / "seed.txt").write_text("x")
    r = run_cli("unmount", "--no-wait", str(m.path))
    assert r.returncode == 0, r.stderr
    m.pid = None
    # Grow the journal to 10,000 entries, as many closes would have.
    db = sqlite3.connect(m.cache / "journal.sqlite")
    (row,) = db.execute("SELECT key, data, size, headers, content_type FROM pending").fetchall()
    rows = []
    for i in range(10_000):
        data = m.cache / "pending" / uuid.uuid4().hex
        os.link(m.cache / "pending" / row[1], data)
        rows.append((f"many/f{i:05d}", data.name, row[2], row[3], row[4], None, time.time()))
    db.executemany(
        "INSERT INTO pending (key, data, size, headers, content_type, base_etag, created) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    db.commit()
    db.close()
    started = time.monotonic()
    m.options = ["--write-back", "3600"]
    m.mount()
    assert time.monotonic() - started < 15
    # (what an earlier mount journaled starts uploading at once, whatever the delay)
    assert 0 < m.status()["pending_uploads"] <= 10_001
    assert len(os.listdir(m / "many")) == 10_000  # journaled files are visible at once
    run_cli("unmount", "--no-wait", str(m.path))
    m.pid = None
