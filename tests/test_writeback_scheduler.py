"""Unit tests of the write-back scheduler (core/writeback.py) with a real journal and a fake
uploader: the orderings that are hard to hit through a mount."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from s3mount.core.journal import Journal, Record
from s3mount.core.writeback import WriteBack


def journal_file(journal: Journal, tmp_path: Path, key: str, body: bytes) -> Record:
    src = tmp_path / f"{key}.tmp"
    src.write_bytes(body)
    fd = os.open(src, os.O_RDONLY)
    try:
        return journal.add(key, fd, str(src), len(body), {}, "text/plain", None, durable=False)
    finally:
        os.close(fd)
        src.unlink()


def test_an_unlink_during_the_upload_neither_crashes_nor_uploads_twice(tmp_path: Path) -> None:
    trio.run(unlink_during_upload, tmp_path)


async def unlink_during_upload(tmp_path: Path) -> None:
    # tar replaces the placeholder it wrote for a symlink: the unlink lands while the
    # placeholder's upload is in flight.  That record must be dropped once the upload ends,
    # never scheduled again (that crashed the scheduler: the same record took a second
    # worker token).
    journal = Journal(str(tmp_path / "cache"))
    wb = WriteBack(journal, delay=0, workers=2)
    started, release = trio.Event(), trio.Event()
    uploads: list[str] = []

    async def upload(record: Record) -> None:
        uploads.append(record.key)
        started.set()
        await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wb.run, upload)
        wb.add(journal_file(journal, tmp_path, "placeholder", b""))
        await started.wait()
        assert wb.busy("placeholder")
        wb.discard("placeholder")
        assert wb.pending_for("placeholder") is None
        await trio.sleep(0.1)  # the scheduler loops meanwhile
        release.set()
        with trio.fail_after(5):
            await wb.drain()
        wb.add(journal_file(journal, tmp_path, "placeholder", b"a link target"))
        with trio.fail_after(5):
            await wb.drain()
        nursery.cancel_scope.cancel()
    assert uploads == ["placeholder", "placeholder"]
    assert journal.records() == []


def test_versions_of_a_busy_key_wait_and_a_failed_upload_keeps_its_backoff(
    tmp_path: Path,
) -> None:
    trio.run(busy_key_and_backoff, tmp_path)


async def busy_key_and_backoff(tmp_path: Path) -> None:
    # Two workers, a long delay.  A drain makes everything due at once; a new version of a
    # key whose upload is in flight waits for that upload (never two uploads of one key at
    # a time) and supersedes the versions journaled before it; a failed upload is retried
    # after its backoff, not at once, even while someone drains.
    journal = Journal(str(tmp_path / "cache"))
    wb = WriteBack(journal, delay=3600, workers=2)
    in_flight: set[str] = set()
    log: list[tuple[str, bytes]] = []
    release = {"a": trio.Event(), "b": trio.Event()}
    failed_at: list[float] = []
    tried_at: list[float] = []

    async def upload(record: Record) -> None:
        assert record.key not in in_flight
        in_flight.add(record.key)
        try:
            with open(record.data, "rb") as f:
                body = f.read()
            log.append((record.key, body))
            if body == b"fails once":
                tried_at.append(trio.current_time())
            if record.key in release:
                await release[record.key].wait()
            if body == b"fails once" and not failed_at:
                failed_at.append(trio.current_time())
                raise OSError("S3 said no")
        finally:
            in_flight.discard(record.key)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wb.run, upload)
        wb.add(journal_file(journal, tmp_path, "a", b"a1"))
        wb.add(journal_file(journal, tmp_path, "b", b"fails once"))
        for i in range(5):
            wb.add(journal_file(journal, tmp_path, f"c{i}", b"c"))
        await trio.sleep(0.1)
        assert log == []  # the delay holds them back
        nursery.start_soon(wb.drain)
        while ("a", b"a1") not in log:
            await trio.sleep(0.01)
        wb.add(journal_file(journal, tmp_path, "a", b"a2"))  # while a1 uploads
        wb.add(journal_file(journal, tmp_path, "a", b"a3"))  # supersedes a2
        while len(tried_at) < 1:
            await trio.sleep(0.01)
        nursery.start_soon(wb.settle, "b")  # another waiter while b's first try is on
        await trio.sleep(0.1)
        release["a"].set()
        release["b"].set()
        with trio.fail_after(10):
            await wb.drain()
        nursery.cancel_scope.cancel()
    assert [body for key, body in log if key == "a"] == [b"a1", b"a3"]
    assert len(tried_at) == 2 and tried_at[1] - failed_at[0] >= 0.9  # backoff: 1 s
    assert sorted(key for key, _ in log if key.startswith("c")) == [f"c{i}" for i in range(5)]
    assert wb.failures == 1 and journal.records() == []
