"""CachedFile and FileCache on their own: ranges asked of S3 (a recording fetcher, no S3)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
import trio

from s3mount.core import filecache
from s3mount.core.filecache import CachedFile, FileCache, MiB


def cached_file(tmp_path: Path, data: bytes, fetch: filecache.Fetcher) -> CachedFile:
    """A CachedFile of ``data`` (as the object "k", ETag "etag"), on a new local file."""
    path = tmp_path / "open-1"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    return CachedFile(str(path), fd, "k", len(data), "etag", fetch)


def test_readahead_without_background_fetches_each_block_once(tmp_path: Path) -> None:
    data = os.urandom(40 * MiB)
    asked: list[tuple[int, int]] = []

    async def fetch(start: int, length: int, etag: str | None) -> bytes:
        asked.append((start // MiB, length // MiB))
        return data[start : start + length]

    async def main() -> None:
        cf = cached_file(tmp_path, data, fetch)
        try:
            assert await cf.read(0, MiB, readahead=4 * MiB) == data[:MiB]
            assert await cf.read(MiB, MiB, readahead=8 * MiB) == data[MiB : 2 * MiB]
        finally:
            cf.close()

    trio.run(main)
    # The read's own block, then the window beyond it: no block twice.
    fetched = [b for first, n in asked for b in range(first, first + n)]
    assert len(fetched) == len(set(fetched)), asked
    assert asked[0] == (0, 1)


def test_closed_files_are_kept_by_etag_within_the_byte_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(filecache, "STREAMED_SHARE", 1)  # files are 2/5 of the budget
    objects = {k: os.urandom(2 * MiB) for k in ("a", "b", "c")}
    asked: list[str] = []

    def fetcher(key: str):  # noqa: ANN202
        async def fetch(start: int, length: int, etag: str | None) -> bytes:
            asked.append(key)
            return objects[key][start : start + length]

        return fetch

    stale = tmp_path / "open" / "kept-from-a-dead-daemon"
    stale.parent.mkdir()
    stale.write_bytes(b"x")
    files = FileCache(str(tmp_path / "open"), keep_bytes=5 * MiB)
    assert not stale.exists()  # removed at start: never taken for unsaved data

    async def read_and_close(key: str, etag: str) -> bytes:
        cf = files.reopen(key, 2 * MiB, etag) or files.new(key, 2 * MiB, etag, fetcher(key))
        data = await cf.read(0, 2 * MiB)
        assert files.keep(cf)
        return data

    async def main() -> None:
        for key in ("a", "b"):
            assert await read_and_close(key, "e1") == objects[key]
        assert await read_and_close("a", "e1") == objects["a"]  # kept: no fetch
        assert asked == ["a", "b"]
        assert await read_and_close("c", "e1") == objects["c"]  # 6 MiB > 5: "b" goes first
        assert sorted(files.kept) == ["a", "c"] and files.kept_bytes <= 5 * MiB
        assert await read_and_close("a", "e2") == objects["a"]  # a new version: fetched
        assert asked == ["a", "b", "c", "a"]
        names = sorted(os.listdir(tmp_path / "open"))
        assert len(names) == 2 and all(n.startswith("kept-") for n in names)
        files.forget_all()
        assert os.listdir(tmp_path / "open") == [] and files.kept_bytes == 0

    trio.run(main)


def test_writes_and_truncates_wait_for_fetched_blocks_being_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fetched data is copied into the local file by a worker thread; a write or a truncate
    arriving meanwhile must land after it, never under it."""
    data = os.urandom(4 * MiB)
    real_pwrite_all = filecache._pwrite_all
    storing = threading.Event()

    def slow_pwrite_all(fd: int, pieces: list[tuple[memoryview, int]]) -> None:
        storing.set()
        time.sleep(0.3)  # long enough for the write below to arrive during the store
        real_pwrite_all(fd, pieces)

    monkeypatch.setattr(filecache, "_pwrite_all", slow_pwrite_all)

    async def fetch(start: int, length: int, etag: str | None) -> bytes:
        return data[start : start + length]

    async def main() -> None:
        cf = cached_file(tmp_path, data, fetch)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cf.read, 0, 2 * MiB)
                await trio.to_thread.run_sync(storing.wait)
                assert await cf.write(0, b"new" * MiB) == 3 * MiB  # covers blocks 0-2
            assert await cf.read(0, 3 * MiB) == b"new" * MiB
            assert await cf.read(3 * MiB, MiB) == data[3 * MiB :]

            storing.clear()
            async with trio.open_nursery() as nursery:
                cf2 = CachedFile(str(tmp_path / "open-2"),
                                 os.open(tmp_path / "open-2", os.O_RDWR | os.O_CREAT, 0o600),
                                 "k2", len(data), "etag", fetch)  # fmt: skip
                nursery.start_soon(cf2.read, 2 * MiB, 2 * MiB)
                await trio.to_thread.run_sync(storing.wait)
                await cf2.truncate(MiB)
            assert os.fstat(cf2.fd).st_size == MiB  # the store did not extend it again
            assert await cf2.read(0, 4 * MiB) == data[:MiB]
            cf2.close()
        finally:
            cf.close()

    trio.run(main)


def test_copy_on_write_runs_in_a_thread_and_changes_wait_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Write-back: a file the journal still links is copied before it changes.  The copy runs
    in a worker thread: reads go on meanwhile, and a second change waits for the copy and
    lands in it, never in the journal's data."""
    data = os.urandom(3 * MiB)
    real_copy_head = filecache._copy_head
    copying, copied = threading.Event(), threading.Event()

    def slow_copy_head(src: int, dst: int, length: int) -> None:
        copying.set()
        time.sleep(0.3)
        real_copy_head(src, dst, length)
        copied.set()

    monkeypatch.setattr(filecache, "_copy_head", slow_copy_head)

    async def fetch(start: int, length: int, etag: str | None) -> bytes:
        raise AssertionError("all of it is local")

    async def main() -> None:
        path, journaled = tmp_path / "open-1", tmp_path / "journaled"
        path.write_bytes(data)
        os.link(path, journaled)
        cf = CachedFile(str(path), os.open(path, os.O_RDWR), "k", len(data), "etag", fetch)
        cf.fetch_limit, cf.shared = 0, True
        try:
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cf.write, 5, b"first")
                    await trio.to_thread.run_sync(copying.wait)
                    assert await cf.read(0, 16) == data[:16]  # served during the copy
                    assert not copied.is_set()
                    assert await cf.write(len(data), b"second") == 6  # waits for the copy
                    assert copied.is_set()
            want = data[:5] + b"first" + data[10:] + b"second"
            assert await cf.read(0, len(want) + 1) == want
            assert journaled.read_bytes() == data
            assert not cf.awaits_upload() and cf.path != str(path)
        finally:
            cf.close()

    trio.run(main)


def test_temp_files_are_made_ahead_in_a_thread_and_removed_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = FileCache(str(tmp_path / "c"))
    made_in: set[str] = set()
    make = filecache._make_temp

    def recording_make(directory: str) -> tuple[int, str]:
        made_in.add(threading.current_thread().name)
        return make(directory)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.keep_spares)
            fd, first = cache.temp_file()  # none made yet: made here, and a refill asked for
            os.close(fd)
            os.unlink(first)
            for _ in range(100):
                await trio.sleep(0.01)
                if len(cache._spares) == filecache.SPARE_FILES:
                    break
            spares = {p for _, p in cache._spares}
            fd, path = cache.temp_file()
            assert path in spares and os.fstat(fd).st_size == 0
            assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
            os.close(fd)
            os.unlink(path)
            nursery.cancel_scope.cancel()

    monkeypatch.setattr(filecache, "_make_temp", recording_make)
    trio.run(main)
    assert threading.main_thread().name in made_in and len(made_in) == 2  # and a worker's
    assert os.listdir(tmp_path / "c") == []  # the unused spares went with the task


@pytest.mark.parametrize("eager", [True, False])
def test_random_reads_fetch_the_whole_file_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, eager: bool
) -> None:
    # A file of at most WHOLE_FILE_EAGER is fetched whole at its first backward miss; a
    # bigger one once the random misses reach 1/WHOLE_FILE_RATIO of it.  Either way every
    # block is fetched once, and the fetch stops at close.
    data = os.urandom(40 * MiB)
    monkeypatch.setattr(filecache, "WHOLE_FILE_EAGER", (40 if eager else 39) * MiB)
    monkeypatch.setattr(filecache, "WHOLE_FILE_RATIO", 20)  # 2 misses of a 40 MiB file
    asked: list[tuple[int, int]] = []

    async def fetch(start: int, length: int, etag: str | None) -> bytes:
        asked.append((start // MiB, -(-length // MiB)))
        await trio.sleep(0.001)
        return data[start : start + length]

    async def main() -> None:
        cf = cached_file(tmp_path, data, fetch)
        cf.open_count = 1
        try:
            async with trio.open_nursery() as nursery:
                spawn = nursery.start_soon
                assert await cf.read(30 * MiB, 4096, spawn=spawn) == data[30 * MiB :][:4096]
                assert (
                    await cf.read(9 * MiB, 4096, spawn=spawn, random=True) == data[9 * MiB :][:4096]
                )
                await trio.sleep(0.2)
                assert len(cf.present) == (40 if eager else 2)
                assert (
                    await cf.read(20 * MiB, 4096, spawn=spawn, random=True)
                    == data[20 * MiB :][:4096]
                )
            assert len(cf.present) == 40
            assert await cf.read(0, 40 * MiB) == data
        finally:
            cf.close()

    trio.run(main)
    fetched = [b for first, n in asked for b in range(first, first + n)]
    assert sorted(fetched) == list(range(40))  # each block once


def test_whole_file_parts_are_read_from_memory_while_their_store_is_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part of the whole-file fetch serves reads as soon as it arrives, before a worker
    thread has copied it into the local file; at most twice the parts in flight wait in
    memory for that copy, and in the end every block is in the file and none in memory."""
    data = os.urandom(16 * filecache.FETCH_PART)
    real_pwrite_all = filecache._pwrite_all
    may_store = threading.Event()

    def held_back_pwrite_all(fd: int, pieces: list[tuple[memoryview, int]]) -> None:
        if sum(len(p) for p, _ in pieces) > MiB:  # a part, not a read's own block
            may_store.wait()
        real_pwrite_all(fd, pieces)

    monkeypatch.setattr(filecache, "_pwrite_all", held_back_pwrite_all)

    async def fetch(start: int, length: int, etag: str | None) -> bytes:
        await trio.sleep(0.001)
        return data[start : start + length]

    async def main() -> None:
        cf = cached_file(tmp_path, data, fetch)
        cf.open_count = 1
        part_blocks = filecache.FETCH_PART // MiB
        try:
            async with trio.open_nursery() as nursery:
                spawn = nursery.start_soon
                assert await cf.read(5 * MiB, 4096, spawn=spawn) == data[5 * MiB :][:4096]
                # A backward jump starts the whole-file fetch; its first parts arrive
                # and are read while no store can finish.
                off = 3 * MiB
                with trio.fail_after(10):
                    got = await cf.read(off, 4096, spawn=spawn, random=True)
                    assert got == data[off : off + 4096]
                    off = filecache.FETCH_PART + 7 * MiB
                    got = await cf.read(off, 4096, spawn=spawn, random=True)
                    assert got == data[off : off + 4096]
                await trio.sleep(0.2)  # the fetch is now stalled on the stores
                parts_in_memory = len(cf._held) / part_blocks
                assert 2 <= parts_in_memory <= filecache.FETCH_ALL_HELD
                assert len(cf.present) <= 2  # the reads' own first blocks
                may_store.set()
            assert not cf._held
            assert len(cf.present) == len(data) // MiB
            assert await cf.read(0, len(data)) == data
        finally:
            may_store.set()
            cf.close()

    trio.run(main)


def test_sequential_reads_stay_in_memory_and_a_change_stores_them_first(tmp_path: Path) -> None:
    # A streamed read keeps what it fetches in memory, never in the local file, and drops it
    # behind the reader; a write or a truncate first stores what is held, so that reads after
    # it see old bytes, new bytes and zeros where they belong.
    data = os.urandom(40 * MiB + 1234)  # a short last block
    asked: list[int] = []

    async def fetch(start: int, length: int, etag: str | None) -> bytes:
        asked.extend(range(start // MiB, -(-(start + length) // MiB)))
        await trio.sleep(0.001)
        return data[start : start + length]

    async def main() -> None:
        cf = cached_file(tmp_path, data, fetch)
        cf.hold_reads = True
        try:
            async with trio.open_nursery() as nursery:
                for off in range(0, 30 * MiB, MiB):
                    got = await cf.read(off, MiB, 8 * MiB, nursery.start_soon)
                    assert got == data[off : off + MiB]
                    assert len(cf._held) <= filecache.HELD_BEHIND + 8 + 16 + 1
                assert os.fstat(cf.fd).st_blocks == 0  # nothing went to the disk
                assert 0 not in cf._held  # left behind the reader
                await cf.write(31 * MiB - 5, b"new")  # in a held block (fetched ahead)
            assert os.fstat(cf.fd).st_blocks > 0 and not cf._held
            want = bytearray(data)
            want[31 * MiB - 5 : 31 * MiB - 2] = b"new"
            assert await cf.read(29 * MiB, 3 * MiB) == want[29 * MiB : 32 * MiB]

            async with trio.open_nursery() as nursery:  # the tail, held again
                for off in range(32 * MiB, len(data), MiB):
                    got = await cf.read(off, MiB, 8 * MiB, nursery.start_soon)
                    assert got == want[off : off + MiB]
            assert len(data) // MiB in cf._held
            await cf.truncate(len(data) + MiB)  # the short last block must not stay short
            assert await cf.read(len(data) - 10, 20) == data[-10:] + bytes(10)
        finally:
            cf.close()

    trio.run(main)
    assert len(asked) == len(set(asked)) and 0 in asked and 40 in asked  # each block once


def test_a_file_bigger_than_a_quarter_of_the_disk_cache_is_streamed(tmp_path: Path) -> None:
    files = FileCache(str(tmp_path / "open"), keep_bytes=8 * MiB)

    async def fetch(start: int, length: int, etag: str | None) -> bytes:
        return bytes(length)

    assert not files.new("small", 2 * MiB, "e", fetch).hold_reads
    assert files.new("big", 2 * MiB + 1, "e", fetch).hold_reads
    assert FileCache(str(tmp_path / "none")).new("any", 1, "e", fetch).hold_reads


def resident_bytes(path: str) -> int:
    """How much of ``path`` is in the page cache (util-linux's fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(out.strip())


def skip_unless_fadvise_drops_pages(directory: Path) -> None:
    if shutil.which("fincore") is None:
        pytest.skip("needs util-linux's fincore")
    probe = directory / "probe"
    probe.write_bytes(bytes(MiB))
    with open(probe, "rb") as f:
        os.fdatasync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if resident_bytes(str(probe)) == MiB:  # tmpfs, for one
        pytest.skip("this file system keeps its pages whatever fadvise says")


def test_released_pages_leave_the_page_cache_and_keep_their_bytes(tmp_path: Path) -> None:
    # A streamed upload releases what it has sent: the first call starts the write-back,
    # a later one drops the pages, now clean.  The bytes stay in the file.
    skip_unless_fadvise_drops_pages(tmp_path)
    data = os.urandom(8 * MiB)

    async def fetch(start: int, length: int, etag: str | None) -> bytes:
        raise AssertionError("nothing is fetched")

    async def main() -> None:
        cf = cached_file(tmp_path, b"", fetch)
        try:
            os.pwrite(cf.fd, data, 0)
            assert resident_bytes(cf.path) == len(data)
            await cf.release_pages(len(data))
            os.fdatasync(cf.fd)  # (the write-back the first call started, finished)
            await cf.release_pages(len(data))
            assert resident_bytes(cf.path) < len(data) // 4
            assert os.pread(cf.fd, len(data), 0) == data
        finally:
            cf.close()

    trio.run(main)


def test_a_whole_file_fetch_keeps_about_one_part_in_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each part stored lets the kernel drop the parts stored before it, once written back:
    the fetch reuses pages instead of taking the file's size in new ones.  One part at a
    time here, each GET after the file's write-back, so that nothing depends on timing."""
    skip_unless_fadvise_drops_pages(tmp_path)
    monkeypatch.setattr(filecache, "FETCH_ALL_PARTS", 1)
    monkeypatch.setattr(filecache, "FETCH_ALL_HELD", 1)
    data = os.urandom(4 * filecache.FETCH_PART)
    cf = cached_file(tmp_path, data, lambda *_: None)  # its fetcher is set below

    async def fetch(start: int, length: int, etag: str | None) -> bytes:
        os.fdatasync(cf.fd)  # what was stored before this GET is clean now
        return data[start : start + length]

    async def main() -> None:
        cf._fetch = fetch
        cf.open_count = 1
        async with trio.open_nursery() as nursery:
            spawn = nursery.start_soon
            assert await cf.read(5 * MiB, 4096, spawn=spawn) == data[5 * MiB :][:4096]
            # a backward jump starts the whole-file fetch, which the nursery waits for
            assert await cf.read(3 * MiB, 4096, spawn=spawn, random=True) == data[3 * MiB :][:4096]
        assert len(cf.present) == len(data) // MiB

    try:
        trio.run(main)
        assert resident_bytes(cf.path) <= filecache.FETCH_PART + MiB
        assert os.pread(cf.fd, len(data), 0) == data
    finally:
        cf.close()
