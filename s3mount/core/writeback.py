"""Asynchronous write-back: upload journaled files in the background, never dropping one.

``close()`` in write-back mode journals the file (:mod:`.journal`) and returns.  This
scheduler uploads each record once it is ``delay`` seconds old, ``workers`` at a time, and
retries failures with exponential backoff for as long as it takes (an S3 outage only queues
uploads).  For each key only the newest record is uploaded; older ones are superseded.
``drain`` (``s3mount sync``, unmount) and ``settle`` (before a rename) skip the delay.
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from s3mount.core.journal import Journal, Record

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0
DISCARDED = "\0discarded"  # the key of a record unlinked while its upload was in flight

Uploader = Callable[[Record], Awaitable[None]]


class WriteBack:
    def __init__(self, journal: Journal, delay: float, workers: int):
        self.journal = journal
        self.delay = delay
        self.workers = workers
        self.records: dict[int, Record] = {}  # by id, in id order
        self._by_key: dict[str, dict[int, Record]] = {}
        # Each record waits in one place: in ``_due`` (a heap of (next_try, id); entries that
        # no longer match their record are skipped) until it is due, then in ``_ready`` (ids,
        # in order) for a worker, or in ``_waiting`` while an upload of its key is in flight.
        self._due: list[tuple[float, int]] = []
        self._ready: deque[int] = deque()
        self._waiting: dict[str, list[int]] = {}
        self._queued: set[int] = set()  # ids in _ready or _waiting
        for r in journal.records():
            self._index(r)
        self._uploading: dict[str, int] = {}  # key -> id of the record in flight
        self._urgent = 0  # > 0 while someone drains: ignore the delay
        self._changed = trio.Event()  # set whenever records or uploads change
        self.failures = 0
        self.last_error = ""

    # -- what the file system calls ---------------------------------------------------------

    def add(self, record: Record) -> None:
        """A new journaled version of a key: older records of that key are superseded."""
        in_flight = self._uploading.get(record.key)
        for old in list(self._by_key.get(record.key, {}).values()):
            if old.id != in_flight:
                self._forget(old)
        record.next_try = trio.current_time() + self.delay
        self._index(record)
        if self._urgent:
            self._enqueue(record)
        self._notify()

    def pending_for(self, key: str) -> Record | None:
        """The newest record of a key (what a reader of that key must see)."""
        found = self._by_key.get(key)
        return found[max(found)] if found else None

    def records_of(self, key: str) -> list[Record]:
        return list(self._by_key.get(key, {}).values())

    def discard(self, key_or_prefix: str, prefix: bool = False) -> None:
        """The key was unlinked (or its directory removed): nothing of it is uploaded."""
        keys = (
            [k for k in self._by_key if k.startswith(key_or_prefix)] if prefix else [key_or_prefix]
        )
        for key in keys:
            for r in list(self._by_key.get(key, {}).values()):
                if r.key not in self._uploading:
                    self._forget(r)
                else:  # in flight: forgotten when it ends (and the caller deletes the key)
                    self._unindex(r)
                    r.key = DISCARDED
        self._notify()

    def busy(self, key: str) -> bool:
        """Whether an upload of ``key`` is in flight."""
        return key in self._uploading

    async def settle(self, key_or_prefix: str, prefix: bool = False) -> None:
        """Upload now, and wait for, every record of a key (or below a prefix)."""

        def mine() -> bool:
            if not prefix:
                return key_or_prefix in self._by_key or key_or_prefix in self._uploading
            return any(k.startswith(key_or_prefix) for k in (*self._by_key, *self._uploading))

        self._hurry()
        try:
            while mine():
                await self._wait_change()
        finally:
            self._urgent -= 1

    async def drain(self) -> None:
        """Upload everything journaled, now; return when the journal is empty."""
        self._hurry()
        try:
            while self.records or self._uploading:
                await self._wait_change()
        finally:
            self._urgent -= 1

    def stats(self) -> dict[str, object]:
        return {
            "pending_uploads": len(self.records),
            "pending_bytes": sum(r.size for r in self.records.values()),
            "uploading": len(self._uploading),
            "upload_failures": self.failures,
            "last_upload_error": self.last_error,
        }

    # -- the background task ----------------------------------------------------------------

    async def run(self, upload: Uploader) -> None:
        """Upload due records forever (started and cancelled by the daemon's lifecycle).

        Each pass costs O(records that change state), never O(all records): a drain of
        thousands of small files must not spend its CPU on bookkeeping."""
        limiter = trio.CapacityLimiter(self.workers)
        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                while self._due and self._due[0][0] <= now:
                    _, rid = heapq.heappop(self._due)
                    r = self.records.get(rid)
                    if r is not None and r.next_try <= now:
                        self._enqueue(r)
                while self._ready and limiter.available_tokens:
                    rid = self._ready.popleft()
                    r = self.records.get(rid)
                    if r is None or (r.attempts and r.next_try > now):
                        # Superseded, discarded or uploaded meanwhile; or it failed since it
                        # was queued, and its retry waits in _due.
                        self._queued.discard(rid)
                        continue
                    if r.key in self._uploading:  # it goes when that upload ends
                        self._waiting.setdefault(r.key, []).append(rid)
                        continue
                    self._queued.discard(rid)
                    await limiter.acquire_on_behalf_of(rid)
                    self._uploading[r.key] = rid
                    nursery.start_soon(self._upload_one, upload, r, limiter)
                wake = self._due[0][0] if self._due else now + 3600
                with trio.move_on_at(max(wake, now + 0.01)):
                    await self._wait_change()

    async def _upload_one(self, upload: Uploader, r: Record, limiter: trio.CapacityLimiter) -> None:
        key = r.key
        try:
            await upload(r)
        except Exception as exc:  # keep it; try again later
            r.attempts += 1
            backoff = min(MAX_BACKOFF, 0.5 * 2 ** min(r.attempts, 10))
            r.next_try = trio.current_time() + backoff
            heapq.heappush(self._due, (r.next_try, r.id))
            self.failures += 1
            self.last_error = f"{r.key}: {exc}"
            log.warning("upload of %s failed (try %d), again in %.0fs: %s",
                        r.key, r.attempts, backoff, exc)  # fmt: skip
        else:
            self._forget(r)
        finally:
            self._uploading.pop(key, None)
            limiter.release_on_behalf_of(r.id)
            if r.key == DISCARDED:
                self._forget(r)
            self._ready.extend(self._waiting.pop(key, ()))  # newer versions of the key
            self._notify()

    # -- helpers -------------------------------------------------------------------------------

    def _index(self, r: Record) -> None:
        self.records[r.id] = r
        self._by_key.setdefault(r.key, {})[r.id] = r
        heapq.heappush(self._due, (r.next_try, r.id))

    def _unindex(self, r: Record) -> None:
        self.records.pop(r.id, None)
        same = self._by_key.get(r.key)
        if same is not None:
            same.pop(r.id, None)
            if not same:
                del self._by_key[r.key]

    def _forget(self, r: Record) -> None:
        self._unindex(r)
        self._queued.discard(r.id)
        self.journal.done(r)

    def _enqueue(self, r: Record) -> None:
        """The record is due: it waits for a worker now."""
        if r.id not in self._queued:
            self._queued.add(r.id)
            self._ready.append(r.id)

    def _hurry(self) -> None:
        """Someone waits for uploads: every record not failed before is due at once (and,
        while someone waits, every new one)."""
        self._urgent += 1
        for r in self.records.values():
            if not r.attempts:
                self._enqueue(r)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_change(self) -> None:
        await self._changed.wait()
