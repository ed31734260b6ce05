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
