"""Streaming upload: a big file written from its start goes to S3 in parts while the program
is still writing, so that close() only sends the last part and completes the upload.

A :class:`PartStream` belongs to one open file.  Part ``i`` covers bytes ``[i*P, (i+1)*P)``;
it is sent once the program's contiguous writes from offset 0 have passed its end.  A later
write into a part that was sent (or is being sent) makes it stale, and close sends it again
(S3 keeps the last upload of a part number).  A truncate below what was sent breaks the
stream: close then aborts it and uploads the file whole, as without streaming.  The local
file stays the truth throughout, so a failed part never loses data.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from s3mount.core.errors import first_leaf
from s3mount.core.metadata import ObjectMeta
from s3mount.storage import Part, S3Facts, StorageError

log = logging.getLogger(__name__)


class Uploader:
    """The S3 calls a stream makes, bound to its key: ``start`` begins the multipart upload
    (with the object's headers as of that moment) and returns (upload id, those headers);
    ``send(upload_id, number, offset, length)`` sends a part from the local file."""

    def __init__(
        self,
        start: Callable[[], Awaitable[tuple[str, ObjectMeta]]],
        send: Callable[[str, int, int, int], Awaitable[Part]],
        finish: Callable[[str, list[Part]], Awaitable[str]],
        abort: Callable[[str], Awaitable[None]],
    ):
        self.start, self.send, self.finish, self.abort = start, send, finish, abort


class PartStream:
    def __init__(
        self,
        key: str,
        part_size: int,
        concurrency: int,
        uploader: Uploader,
        spawn: Callable[..., None],
    ):
        self.key = key
        self.part_size = part_size
        self.uploader = uploader
        self._spawn = spawn  # background tasks (the daemon's nursery)
        self.meta: ObjectMeta | None = None  # the headers the upload began with
        self.broken = False  # no more parts: close aborts it and uploads the file whole
        self._closed = False
        self._upload_id: str | None = None
        self._starting = trio.Lock()
        self._limiter = trio.CapacityLimiter(concurrency)
        self._frontier = 0  # bytes [0, frontier) were written contiguously
        self._queued = 0  # parts [0, queued) were handed to a sender
        self._version: dict[int, int] = {}  # part -> writes into it so far
        self._sent: dict[int, tuple[int, Part]] = {}  # part -> (its version when sent, it)
        self._inflight: dict[int, trio.Event] = {}

    # -- while the program writes (trio thread, no waiting) ---------------------------------

    def wrote(self, off: int, end: int) -> None:
        """Bytes [off, end) were written; start sending the parts that are now complete."""
        if self.broken or end <= off:
            return
        p = self.part_size
        for i in range(off // p, (end - 1) // p + 1):
            self._version[i] = self._version.get(i, 0) + 1
        if off <= self._frontier:
            self._frontier = max(self._frontier, end)
        full = self._frontier // p
        if full > S3Facts.maximum_part_number:
            self.broken = True  # too big for this part size: uploaded whole at close
            return
        while self._queued < full:
            self._spawn(self._send_quietly, self._queued, p)
            self._queued += 1

    def truncated(self, size: int) -> None:
        if size < self._queued * self.part_size:
            self.broken = True
        self._frontier = min(self._frontier, size)
        if size % self.part_size:
            i = size // self.part_size
            self._version[i] = self._version.get(i, 0) + 1

    # -- sending -----------------------------------------------------------------------------

    async def _ensure_started(self) -> str:
        async with self._starting:
            if self._upload_id is None:
                self._upload_id, self.meta = await self.uploader.start()
            return self._upload_id

    async def _send(self, i: int, length: int) -> None:
        while i in self._inflight:  # the same part again: after the earlier send
            await self._inflight[i].wait()
        done = self._inflight[i] = trio.Event()
        try:
            upload_id = await self._ensure_started()
            async with self._limiter:
                version = self._version.get(i, 0)  # a write after this makes it stale
                part = await self.uploader.send(upload_id, i + 1, i * self.part_size, length)
            self._sent[i] = (version, part)
        finally:
            del self._inflight[i]
            done.set()

    async def _send_quietly(self, i: int, length: int) -> None:
        """A background send; a failure only leaves the part for close to send again."""
        if self.broken or self._closed:
            return
        try:
            await self._send(i, length)
        except (StorageError, OSError) as exc:
            log.debug("part %d of %s failed, close sends it again: %s", i + 1, self.key, exc)

    # -- at close ----------------------------------------------------------------------------

    async def complete(self, size: int) -> str | None:
        """Send what is missing or stale and complete the upload: the object's ETag.  None
        when the stream is broken (the caller uploads the file whole)."""
        self._closed = True
        await self._settled()
        if self.broken or self._queued == 0:  # broken, or never a full part: upload whole
            await self.abort()
            return None
        p = self.part_size
        count = -(-size // p)
        stale = [i for i in range(count) if not self._clean(i)]
        try:
            async with trio.open_nursery() as nursery:
                for i in stale:
                    nursery.start_soon(self._send, i, min(p, size - i * p))
        except ExceptionGroup as group:
            raise first_leaf(group) from None
        parts = [self._sent[i][1] for i in range(count)]
        return await self.uploader.finish(await self._ensure_started(), parts)

    def _clean(self, i: int) -> bool:
        """Part ``i`` was sent and not written since."""
        sent = self._sent.get(i)
        return sent is not None and sent[0] == self._version.get(i, 0)

    async def _settled(self) -> None:
        while self._inflight:
            await next(iter(self._inflight.values())).wait()

    async def abort(self) -> None:
        """Give up the upload (best effort: a leftover is logged, not fatal)."""
        self.broken = self._closed = True
        await self._settled()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                await self.uploader.abort(upload_id)
            except StorageError as exc:
                log.warning("could not abort the multipart upload of %s: %s", self.key, exc)
