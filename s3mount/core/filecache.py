"""The write-back temp-file cache.

An open file is a :class:`CachedFile`: a sparse local temporary file plus the set of blocks of
it that hold the object's data.  Blocks come from S3 only when a read needs them (ranged GETs
pinned to the object's ETag, with sequential readahead) or when a write covers part of a block.
Writes land in the local file and mark it dirty; the S3FS uploads it on flush/fsync/close.
What a sequential read fetches can instead stay in memory (``hold_reads``): it is served from
there and dropped once the reader is past it, so that streaming a big file does not also
write it to the local disk (see :attr:`CachedFile._held`).
When the last handle closes, a clean file's blocks are kept (up to a byte budget, least
recently closed first out) so that opening the same version again costs no GET.
All state changes happen in the trio thread; S3 fetches and the copying of what they bring
into the local file run in worker threads.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

import trio

from s3mount.core.errors import first_leaf
from s3mount.core.metadata import ObjectMeta
from s3mount.storage import MiB

if TYPE_CHECKING:
    from s3mount.core.journal import Record
    from s3mount.core.streaming import PartStream

log = logging.getLogger(__name__)

BLOCK = 1 * MiB
MAX_READAHEAD = 64 * MiB
FETCH_PART = 16 * MiB
# Random reads (counted at jumps backward) that fetched 1/WHOLE_FILE_RATIO of a file start a
# background fetch of all of it, FETCH_ALL_PARTS parts in flight: it then costs a bounded
# multiple of what the random reads were fetching anyway, and later reads find their blocks
# local.  A file of at most WHOLE_FILE_EAGER is fetched whole at its first random miss (as
# s3fs-fuse does at its first read): a few seconds of transfer at most, stopped at close.
WHOLE_FILE_RATIO = 32
WHOLE_FILE_EAGER = 256 * MiB
FETCH_ALL_PARTS = 4
# Parts of a whole-file fetch in memory at once: in flight, or arrived and waiting for a
# thread to store them (a store can take longer than a GET on a VM short of fresh pages).
FETCH_ALL_HELD = FETCH_ALL_PARTS + 2
# Blocks a sequential reader has passed stay in memory this far behind it (the kernel's
# readahead requests arrive a little out of order).
HELD_BEHIND = FETCH_PART // BLOCK
# Sequential reads of a file bigger than 1/STREAMED_SHARE of the disk cache for closed files
# (all files when there is none) are held in memory instead of written to the local file.
STREAMED_SHARE = 4

Spawner = Callable[..., None]  # nursery.start_soon
Fetcher = Callable[[int, int, str | None], Awaitable[bytes]]  # (start, length, etag) -> data


class CachedFile:
    """Local state of one object while it is open (shared by all handles on it)."""

    def __init__(self, path: str, fd: int, key: str, size: int, etag: str | None, fetch: Fetcher):
        self.path = path
        self.fd = fd
        self.key = key
        self.size = size
        # Bytes below fetch_limit that are not in `present` still have to come from the object
        # version `etag`; above it the local file is the truth (zeros where never written).
        self.fetch_limit = size
        self.etag = etag
        # Bytes [0, same_below) are still those of version `etag` (an upload can copy them
        # in S3 instead of sending them).
        self.same_below = size
        self.present: set[int] = set()
        # Sequential reads keep what they fetch in memory, not in the local file: a block of
        # object data -> (the fetched run, the run's offset).  Never a block in `present`;
        # only while fetch_limit == size; any change to the file first stores them.
        self.hold_reads = False
        self._held: dict[int, tuple[memoryview, int]] = {}
        self._inflight: dict[int, trio.Event] = {}
        self._storing: dict[int, trio.Event] = {}  # blocks a worker thread is writing
        self._unsharing: trio.Event | None = None  # set while _unshare copies the file
        self._random_misses = 0  # blocks fetched for reads that were not sequential
        self._fetching_all = False
        self._fetch = fetch
        self.dirty = False
        self.generation = 0  # bumped by every change; an upload clears `dirty` only if unchanged
        self.open_count = 0
        self.unlinked = False
        self.upload_lock = trio.Lock()
        self.mtime_ns: int | None = None  # of the last write (or as set by utimens)
        self.times_set = False  # mtime_ns was set by utimens, not by a write
        self.stream: PartStream | None = None  # parts of it already on their way to S3
        self.meta = ObjectMeta()  # the object's metadata, uploaded with the data
        self.closed = False
        # The journal holds a hard link to this file: copy it before changing it.
        self.shared = False
        self.tracked: str | None = None  # the path the journal knows we are writing
        self.stats: Counter[str] = Counter()  # the FileCache's: block hits and misses
        os.ftruncate(fd, size)

    # -- reading ---------------------------------------------------------------------------

    def _missing_blocks(self, start: int, end: int, held_ok: bool = True) -> list[int]:
        """Blocks of [start, end) that S3 still has to bring (``held_ok``: those in memory
        count as here; else only those in the local file do)."""
        end = min(end, self.fetch_limit)
        if end <= start:
            return []
        return [
            b
            for b in range(start // BLOCK, (end - 1) // BLOCK + 1)
            if b not in self.present and not (held_ok and b in self._held)
        ]

    async def ensure(
        self, start: int, end: int, hold: bool = False, held_ok: bool | None = None
    ) -> None:
        """Make bytes [start, end) of the object present in the local file (``hold``: or in
        memory, where what is fetched stays; ``held_ok``: blocks already in memory count as
        here, whatever ``hold`` says of the fetched ones)."""
        if held_ok is None:
            held_ok = hold
        while True:
            if self.closed:  # released meanwhile: nothing can be stored any more
                return
            missing = self._missing_blocks(start, end, held_ok=held_ok)
            if not missing:
                return
            to_store = [b for b in missing if b in self._held and b not in self._storing]
            if to_store:
                await self._store_held(to_store)
                continue
            busy = [self._inflight.get(b, self._storing.get(b)) for b in missing]
            todo = [b for b in missing if b not in self._inflight and b not in self._held]
            if todo:
                await self._fetch_blocks(todo, hold)
            elif waits := [ev for ev in busy if ev is not None]:
                await waits[0].wait()

    async def _fetch_blocks(self, blocks: list[int], hold: bool = False) -> None:
        await self._fetch_claimed(self._claim(blocks), hold)

    def _claim(self, blocks: list[int]) -> dict[int, trio.Event]:
        """Mark blocks in flight (at once, so that readers arriving meanwhile wait for them)."""
        events = {b: trio.Event() for b in blocks}
        self._inflight.update(events)
        return events

    async def _fetch_claimed(self, events: dict[int, trio.Event], hold: bool = False) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for first, count in _runs(events, FETCH_PART // BLOCK):
                    nursery.start_soon(self._fetch_run, first, count, hold)
        except ExceptionGroup as group:
            raise first_leaf(group) from None
        finally:
            for b, ev in events.items():
                self._inflight.pop(b, None)
                ev.set()

    async def _fetch_run(self, first: int, count: int, hold: bool = False) -> None:
        start = first * BLOCK
        length = min(count * BLOCK, self.fetch_limit - start)
        if length <= 0:
            return
        etag = self.etag
        data = memoryview(await self._fetch(start, length, etag))
        if self.closed:
            return
        # Store what arrived, except blocks written (or truncated away) meanwhile: one
        # pwrite per run of wanted blocks (slices of a memoryview copy nothing).
        end = min(len(data), self.fetch_limit - start)
        run = range(first, first + count)
        wanted = [b for b in run if b not in self.present and b not in self._held]
        fits = all((b - first) * BLOCK < end for b in wanted)  # else: zeros past its end
        if hold and fits and self.fetch_limit == self.size:
            held = data[:end]  # one view for all its blocks: reads across them slice it
            for b in wanted:
                self._held[b] = (held, start)
            return
        pieces = []
        for b, n in _runs(wanted):
            lo, hi = (b - first) * BLOCK, min((b - first + n) * BLOCK, end)
            if hi > lo:
                pieces.append((data[lo:hi], start + lo))
        await self._store(wanted, pieces)

    async def _store(self, blocks: list[int], pieces: list[tuple[memoryview, int]]) -> None:
        """Write fetched ``pieces`` (data, offset) of ``blocks`` in a worker thread: copying
        16 MiB into the page cache takes 5-30 ms (longer when the kernel throttles dirty
        pages), which every other request would wait for on the event loop.  Changes to
        these blocks wait meanwhile (:meth:`_settle`)."""
        done = trio.Event()
        for b in blocks:
            self._storing[b] = done
        try:
            await self._in_thread(_pwrite_all, pieces)
            self.present.update(blocks)
            for b in blocks:
                self._held.pop(b, None)
        finally:
            for b in blocks:
                del self._storing[b]
            done.set()

    async def release_pages(self, end: int) -> None:
        """Start writing bytes [0, end) of the local file back to disk and let the kernel drop
        those already written (``POSIX_FADV_DONTNEED`` drops clean pages only, so no byte is
        lost): after a streamed upload sent them, or a whole-file fetch stored them (its
        reads are random, and the kernel caches what the program reads on the mount's side).
        The next writes then reuse the freed pages instead of taking new ones; on the
        benchmark VM, 1 GiB written into new page-cache pages cost 2.2 s of kernel CPU,
        0.3-0.4 s this way (docs/benchmarks.md, "The machine")."""
        if self.closed or end <= 0:
            return
        try:
            await self._in_thread(os.posix_fadvise, 0, end, os.POSIX_FADV_DONTNEED)
        except OSError as exc:  # only a hint: the pages stay cached
            log.debug("fadvise of %s failed: %s", self.key, exc)

    async def _in_thread(self, fn: Callable[..., object], *args: object) -> None:
        """``fn(fd, *args)`` in a worker thread, ``fd`` a duplicate of the local file's
        descriptor: a close (or a copy-on-write move) meanwhile leaves it valid."""
        fd = os.dup(self.fd)
        try:
            await trio.to_thread.run_sync(fn, fd, *args)
        finally:
            os.close(fd)

    async def _store_held(self, blocks: list[int]) -> None:
        """Write held blocks into the local file (they then leave memory)."""
        pieces = []
        for b in blocks:
            run, start = self._held[b]
            lo = b * BLOCK - start
            pieces.append((run[lo : lo + BLOCK], b * BLOCK))
        await self._store(blocks, pieces)

    async def _store_all_held(self) -> None:
        """Before the local file changes: what is held goes into it, so that nothing in
        memory can be stale or shorter than its block afterwards."""
        while self._held:
            if to_store := [b for b in self._held if b not in self._storing]:
                await self._store_held(to_store)
            else:  # another task is storing them
                await self._storing[next(iter(self._held))].wait()

    def _held_unstored(self, start: int, end: int) -> list[int]:
        """The blocks of [start, end) in memory that no thread is storing yet."""
        last = (min(end, self.fetch_limit) - 1) // BLOCK
        return [b for b in range(start // BLOCK, last + 1)
                if b in self._held and b not in self._storing]  # fmt: skip

    def _drop_held(self, below: float = math.inf) -> None:
        for b in [b for b in self._held if b < below]:
            del self._held[b]

    def _bytes(self, off: int, end: int) -> bytes | memoryview:
        """Bytes [off, end) from memory and the local file; a slice of one fetched run
        when they all come from it (no copy)."""
        if not self._held:
            return os.pread(self.fd, end - off, off)
        pieces: list[tuple[memoryview | None, int, int]] = []  # (run or None: file, lo, hi)
        pos = off
        while pos < end:
            b = pos // BLOCK
            stop = min(end, (b + 1) * BLOCK)
            run, start = self._held.get(b, (None, 0))
            lo, hi = pos - start, stop - start
            if pieces and pieces[-1][0] is run and pieces[-1][2] == lo:
                pieces[-1] = (run, pieces[-1][1], hi)
            else:
                pieces.append((run, lo, hi))
            pos = stop
        if len(pieces) == 1 and pieces[0][0] is not None:
            run, lo, hi = pieces[0]
            return run[lo:hi]
        return b"".join(
            os.pread(self.fd, hi - lo, lo) if run is None else run[lo:hi] for run, lo, hi in pieces
        )

    async def _settle(self, first: int, last: float = math.inf) -> None:
        """Wait until no block from ``first`` to ``last`` is being stored by a worker thread.
        Callers change the local file right after, with no await in between."""
        while busy := [ev for b, ev in self._storing.items() if first <= b <= last]:
            await busy[0].wait()

    async def read(
        self,
        off: int,
        size: int,
        readahead: int = 0,
        spawn: Spawner | None = None,
        random: bool = False,
    ) -> bytes | memoryview:
        """Bytes [off, off+size); then fetch up to ``readahead`` bytes beyond, in the
        background when ``spawn`` is given, once less than half of that window is present.
        ``random``: the reader jumped back (see WHOLE_FILE_RATIO).  With ``hold_reads``,
        what a sequential read fetches stays in memory; a slice of it may be returned."""
        end = min(off + size, self.size)
        if end <= off:
            return b""
        missing = self._missing_blocks(off, end)
        self.stats["block_misses" if missing else "block_hits"] += 1
        if missing and random:
            self._random_misses += len(missing)
            total = -(-self.fetch_limit // BLOCK)
            far_enough = (
                self._random_misses * WHOLE_FILE_RATIO >= total
                or self.fetch_limit <= WHOLE_FILE_EAGER
            )
            if far_enough and spawn is not None and not self._fetching_all:
                self._fetching_all = True
                spawn(self._fetch_all)
        hold = self.hold_reads and not random and not self._fetching_all
        ahead = self._ahead(off, end, readahead) if readahead else []
        if ahead and spawn is not None:
            # Before waiting: the read's own missing blocks lead the first GET of the window.
            spawn(self._prefetch, self._claim(ahead), hold)
        await self.ensure(off, end, hold, held_ok=True)
        if ahead and spawn is None:  # no background: the window now, its own blocks are here
            here = self.present | self._held.keys() | self._inflight.keys()
            await self._fetch_blocks([b for b in ahead if b not in here], hold)
        if not self._fetching_all:  # (its parts wait in memory for their store)
            self._drop_held(below=off // BLOCK - HELD_BEHIND)
        return self._bytes(off, end)

    def _ahead(self, off: int, end: int, readahead: int) -> list[int]:
        """What a sequential read [off, end) should fetch: nothing while at least half of
        the window beyond ``end`` is present or in flight; else every missing block from
        ``off`` to the end of the window, cut to whole FETCH_PARTs (the rest comes with
        the next window), so that each GET is a full part."""
        todo = [
            b
            for b in self._missing_blocks(off, min(end + readahead, self.size))
            if b not in self._inflight
        ]
        if not todo:
            return []
        own_missing = todo[0] * BLOCK < end
        beyond = next((b for b in todo if b * BLOCK >= end), None)
        if not own_missing and (beyond is None or beyond * BLOCK - end >= readahead // 2):
            return []
        per_part = FETCH_PART // BLOCK
        if len(todo) > per_part:
            todo = todo[: len(todo) // per_part * per_part]
        return todo

    async def _fetch_all(self) -> None:
        """Fetch every block still missing, a part at a time, FETCH_ALL_PARTS in flight (the
        rest of the threads serve reads).  A part is claimed only when its GET starts, so a
        read of a block further on fetches that block itself instead of waiting.

        A part is readable from memory as soon as it arrives; a worker thread then copies it
        into the local file.  That copy can take longer than the GET (100-190 ms for 16 MiB
        measured here, when the kernel has to find fresh pages), so it is off the readers'
        path, and up to FETCH_ALL_HELD parts in all may be in memory meanwhile."""
        transfers = trio.Semaphore(FETCH_ALL_PARTS)
        in_memory = trio.Semaphore(FETCH_ALL_HELD)  # fetching or waiting to be stored

        async def fetch_part(start: int, end: int) -> None:
            try:
                try:
                    await self.ensure(start, end, hold=True)
                finally:
                    transfers.release()
                while not self.closed and (held := self._held_unstored(start, end)):
                    await self._store_held(held)
                await self.release_pages(end)
            finally:
                in_memory.release()

        try:
            async with trio.open_nursery() as nursery:
                for start in range(0, self.fetch_limit, FETCH_PART):
                    await in_memory.acquire()
                    await transfers.acquire()
                    if self.closed or self.open_count == 0:  # nobody reads it any more
                        transfers.release()
                        in_memory.release()
                        return
                    end = min(start + FETCH_PART, self.fetch_limit)
                    blocks = [b for b in self._missing_blocks(start, end, held_ok=False)
                              if b not in self._inflight]  # fmt: skip
                    if blocks:
                        nursery.start_soon(fetch_part, start, end)
                    else:
                        transfers.release()
                        in_memory.release()
        except Exception as exc:  # the reads that need these blocks fetch them again
            log.debug("background fetch of %s failed: %s", self.key, exc)
        finally:
            self._fetching_all = False

    async def _prefetch(self, claimed: dict[int, trio.Event], hold: bool = False) -> None:
        try:
            await self._fetch_claimed(claimed, hold)
        except Exception as exc:  # a reader that needs these blocks fetches them again
            log.debug("readahead of %s failed: %s", self.key, exc)

    # -- writing ---------------------------------------------------------------------------

    def awaits_upload(self) -> bool:
        """Whether the local file is the data of a journaled version not uploaded yet (the
        journal links it until then)."""
        return self.shared and os.fstat(self.fd).st_nlink > 1

    async def _own(self, keep_below: float = math.inf) -> None:
        """Before the local file changes in place (the caller's last await): if the journal
        still links it, move to a private copy of its bytes below ``keep_below``; once that
        upload is done and the link gone, the file is ours again as it is."""
        while self._unsharing is not None:  # another change is copying it: wait, look again
            await self._unsharing.wait()
        if self.awaits_upload():
            self._unsharing = trio.Event()
            try:
                await self._unshare(int(min(keep_below, self.size)))
            finally:
                self._unsharing.set()
                self._unsharing = None
        self.shared = False

    async def _unshare(self, keep: int) -> None:
        """Copy-on-write: move to a private copy of the first ``keep`` bytes, copied by a
        worker thread (a big file takes a while; reads go on meanwhile, changes wait)."""
        fd, path = _make_temp(os.path.dirname(self.path))
        try:
            await self._in_thread(_copy_head, fd, keep)
            os.ftruncate(fd, self.size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(self.fd)
        os.unlink(self.path)  # the journal's link keeps the data it promised
        self.fd, self.path = fd, path

    async def write(self, off: int, data: bytes) -> int:
        await self._store_all_held()
        end = off + len(data)
        # Only blocks the write covers partially need their old bytes.
        edges = {off // BLOCK, (end - 1) // BLOCK} if data else set()
        for b in sorted(edges):
            bstart, bend = b * BLOCK, (b + 1) * BLOCK
            if off <= bstart and end >= bend:
                continue
            await self.ensure(bstart, bend)
        await self._settle(off // BLOCK, (end - 1) // BLOCK)
        await self._own()
        n = os.pwrite(self.fd, data, off)
        self.same_below = min(self.same_below, off)
        if data:
            self.present.update(range(off // BLOCK, (end - 1) // BLOCK + 1))
        self.size = max(self.size, off + n)
        self._drop_held()  # fetched during the awaits above: a cache, dropped to stay simple
        self._changed()
        if self.stream is not None:
            self.stream.wrote(off, off + n)
        return n

    async def truncate(self, size: int) -> None:
        await self._store_all_held()
        if size < self.fetch_limit and size % BLOCK:
            await self.ensure(size - size % BLOCK, size)  # keep the head of the cut block
        await self._settle(size // BLOCK)
        await self._own(size)
        self.fetch_limit = min(self.fetch_limit, size)
        self.same_below = min(self.same_below, size)
        os.ftruncate(self.fd, size)
        self.size = size
        self._drop_held()
        self._changed()
        if self.stream is not None:
            self.stream.truncated(size)

    def _changed(self) -> None:
        self.dirty = True
        self.generation += 1

    def uploaded(self, generation: int, etag: str, head_copied: bool = False) -> None:
        """The object now holds the local file as of ``generation``: all of it was present,
        or (``head_copied``) the bytes below ``same_below`` that were not came from the old
        version, which the new one holds too (so they can still be fetched, from ``etag``)."""
        self.etag = etag
        if not head_copied:
            self.fetch_limit = 0
        if self.generation == generation:
            self.dirty = False
            self.same_below = self.size
        else:  # written during the upload: where, is no longer known against either version
            self.same_below = 0

    def journaled(self, generation: int) -> None:
        """The journal now holds the local file as of ``generation`` (all of it present)."""
        self.fetch_limit = 0
        self.shared = True
        if self.generation == generation:
            self.dirty = False

    def close(self) -> None:
        self.closed = True  # a background fetch still in flight must not write any more
        self._held.clear()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _pwrite_all(fd: int, pieces: list[tuple[memoryview, int]]) -> None:
    for data, off in pieces:
        os.pwrite(fd, data, off)


def _copy_head(src: int, dst: int, length: int) -> None:
    """Copy the first ``length`` bytes of ``src`` into ``dst`` (in the kernel; a reflink on
    file systems that have them)."""
    done = 0
    while done < length:
        n = os.copy_file_range(src, dst, length - done, done, done)
        if n == 0:
            break
        done += n


def _runs(blocks: Iterable[int], longest: int | None = None) -> list[tuple[int, int]]:
    """Ascending block numbers as (first, count) runs of consecutive ones, each at most
    ``longest`` blocks."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and sum(runs[-1]) == b and (longest is None or runs[-1][1] < longest):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


OPEN_PREFIX = "open-"  # a temp file that may hold unsaved data (recovered after a crash)
KEPT_PREFIX = "kept-"  # a closed file's clean blocks, removed at start
SPARE_FILES = 16  # empty temp files made ahead of the creates that need them


def _make_temp(directory: str) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=OPEN_PREFIX, dir=directory)  # mode 0600


class FileCache:
    """The open files, by key, backed by temp files in one private directory; and the clean
    data of closed files, kept for ``keep_bytes`` (disk space, least recently closed out)."""

    def __init__(self, directory: str, keep_bytes: int = 0):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        self.directory = directory
        self.files: dict[str, CachedFile] = {}
        self.keep_bytes = keep_bytes
        self.kept: OrderedDict[str, tuple[CachedFile, int]] = OrderedDict()  # key -> (, bytes)
        self.kept_bytes = 0
        for name in os.listdir(directory):  # a dead daemon's, or one killed while stopping
            if name.startswith(KEPT_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))
        # Reads served from local blocks ("block_hits") or that waited for S3 ("block_misses").
        self.stats: Counter[str] = Counter()
        # (fd, path) of empty temp files made by keep_spares' worker thread, which appends
        # while the trio thread pops: both are atomic list operations.
        self._spares: list[tuple[int, str]] = []
        self._spares_low = trio.Event()

    def temp_file(self) -> tuple[int, str]:
        """A new empty temp file (fd, path), made ahead when possible: creating a file can
        cost a few hundred microseconds of kernel time (ext4 after many deletes), which a
        create(2) would otherwise wait for."""
        if len(self._spares) <= SPARE_FILES // 2:
            self._spares_low.set()
        with contextlib.suppress(IndexError):
            return self._spares.pop()
        return _make_temp(self.directory)

    async def keep_spares(self) -> None:
        """Refill the spare temp files in a worker thread whenever they run low (run by the
        daemon's lifecycle; the spares go when it is cancelled)."""
        try:
            while True:
                await self._spares_low.wait()
                self._spares_low = trio.Event()
                try:
                    await trio.to_thread.run_sync(self._make_spares)
                except OSError as exc:  # a full disk: creates make their own files, or fail
                    log.debug("no spare temp files: %s", exc)
                    await trio.sleep(1)
        finally:
            while self._spares:
                fd, path = self._spares.pop()
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def _make_spares(self) -> None:
        while len(self._spares) < SPARE_FILES:
            self._spares.append(_make_temp(self.directory))

    def _cached_file(self, path: str, fd: int, key: str, size: int, etag: str | None,
                     fetch: Fetcher) -> CachedFile:  # fmt: skip
        cf = CachedFile(path, fd, key, size, etag, fetch)
        cf.stats = self.stats
        # A file that the disk cache cannot keep, or that would push out most of it, is
        # streamed through memory when read in order (the kernel caches its pages anyway).
        cf.hold_reads = size * STREAMED_SHARE > self.keep_bytes
        return cf

    def new(self, key: str, size: int, etag: str | None, fetch: Fetcher) -> CachedFile:
        fd, path = self.temp_file()
        return self._cached_file(path, fd, key, size, etag, fetch)

    def from_data(self, key: str, record: Record, fetch: Fetcher) -> CachedFile:
        """An open file whose content is a journaled version's data file (linked, copied on
        write)."""
        name = f"{OPEN_PREFIX}{os.path.basename(record.data)}-{os.getpid()}"
        path = os.path.join(self.directory, name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.link(record.data, path)
        fd = os.open(path, os.O_RDWR)
        cf = self._cached_file(path, fd, key, record.size, record.base_etag, fetch)
        cf.fetch_limit = 0
        cf.same_below = record.head
        cf.shared = True
        return cf

    def leftovers(self) -> list[str]:
        """Temp files in the cache directory that no open file owns (a dead daemon's)."""
        owned = {f.path for f in self.files.values()}
        return [
            os.path.join(self.directory, n)
            for n in os.listdir(self.directory)
            if n.startswith(OPEN_PREFIX) and os.path.join(self.directory, n) not in owned
        ]

    def dirty_bytes(self) -> int:
        return sum(f.size for f in self.files.values() if f.dirty)

    # -- closed files' clean data ----------------------------------------------------------

    def keep(self, cf: CachedFile) -> bool:
        """Keep a closed, clean file's blocks (False: no room, the caller closes it)."""
        if self.keep_bytes <= 0:
            return False
        used = os.fstat(cf.fd).st_blocks * 512
        if used > self.keep_bytes:
            return False
        self.forget(cf.key)
        if not self._rename(cf, OPEN_PREFIX, KEPT_PREFIX):  # not unsaved data, after a crash
            return False
        self.kept[cf.key] = (cf, used)
        self.kept_bytes += used
        while self.kept_bytes > self.keep_bytes:
            self.forget(next(iter(self.kept)))
        return True

    def uploaded(self, key: str, data: str, etag: str) -> None:
        """A journaled version of ``key`` (data file ``data``) is now ``etag`` in S3: a kept
        file that is that data (the same inode) can serve opens of ``etag``."""
        entry = self.kept.get(key)
        if entry is None:
            return
        try:
            same = os.path.samestat(os.fstat(entry[0].fd), os.stat(data))
        except OSError:
            return
        if same:
            entry[0].etag = etag
            entry[0].same_below = entry[0].size

    def reopen(self, key: str, size: int, etag: str | None) -> CachedFile | None:
        """The kept file of ``key`` if it holds version ``etag`` (else it is dropped)."""
        cf = self._take(key)
        if cf is None:
            return None
        if etag is None or cf.etag != etag or cf.size != size:
            self.stats["kept_misses"] += 1  # another version now
            cf.close()
            return None
        if not self._rename(cf, KEPT_PREFIX, OPEN_PREFIX):
            cf.close()
            return None
        self.stats["kept_hits"] += 1
        return cf

    def _rename(self, cf: CachedFile, old: str, new: str) -> bool:
        name = os.path.basename(cf.path).removeprefix(old)
        path = os.path.join(self.directory, new + name)
        try:
            os.rename(cf.path, path)
        except OSError as exc:
            log.warning("cannot rename %s in the cache: %s", cf.path, exc.strerror)
            return False
        cf.path = path
        return True

    def _take(self, key: str) -> CachedFile | None:
        entry = self.kept.pop(key, None)
        if entry is None:
            return None
        self.kept_bytes -= entry[1]
        return entry[0]

    def forget(self, key: str) -> None:
        """Drop the kept data of ``key`` (its object changed or went away)."""
        cf = self._take(key)
        if cf is not None:
            cf.close()

    def forget_all(self) -> None:
        for key in list(self.kept):
            self.forget(key)
