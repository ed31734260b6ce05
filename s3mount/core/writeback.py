"""Asynchronous write-back: upload journaled files in the background, never dropping one.

``close()`` in write-back mode journals the file (:mod:`.journal`) and returns.  This
scheduler uploads each record once it is ``delay`` seconds old, ``workers`` at a time, and
retries failures with exponential backoff for as long as it takes (an S3 outage only queues
uploads).  For each key only the newest record is uploaded; older ones are superseded.
``drain`` (``s3mount sync``, unmount) and ``settle`` (before a rename) skip the delay.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from s3mount.core.journal import Journal, Record

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0

Uploader = Callable[[Record], Awaitable[None]]


class WriteBack:
    def __init__(self, journal: Journal, delay: float, workers: int):
        self.journal = journal
        self.delay = delay
        self.workers = workers
        self.records: dict[int, Record] = {r.id: r for r in journal.records()}
        self._uploading: set[str] = set()  # keys with an upload in flight
        self._urgent = 0  # > 0 while someone drains: ignore the delay
        self._changed = trio.Event()  # set whenever records or uploads change
        self.failures = 0
        self.last_error = ""

    # -- what the file system calls ---------------------------------------------------------

    def add(self, record: Record) -> None:
        """A new journaled version of a key: older records of that key are superseded."""
        for old in [r for r in self.records.values() if r.key == record.key]:
            if old.key not in self._uploading:
                self._forget(old)
        record.next_try = trio.current_time() + self.delay
        self.records[record.id] = record
        self._notify()

    def pending_for(self, key: str) -> Record | None:
        """The newest record of a key (what a reader of that key must see)."""
        found = [r for r in self.records.values() if r.key == key]
        return max(found, key=lambda r: r.id) if found else None

    def discard(self, key_or_prefix: str, prefix: bool = False) -> None:
        """The key was unlinked (or its directory removed): nothing of it is uploaded."""
        for r in list(self.records.values()):
            if r.key == key_or_prefix or (prefix and r.key.startswith(key_or_prefix)):
                if r.key not in self._uploading:
                    self._forget(r)
                else:
                    r.key = "\0discarded"  # the upload in flight is deleted afterwards
        self._notify()

    def busy(self, key: str) -> bool:
        """Whether an upload of ``key`` is in flight."""
        return key in self._uploading

    async def settle(self, key_or_prefix: str, prefix: bool = False) -> None:
        """Upload now, and wait for, every record of a key (or below a prefix)."""

        def mine() -> bool:
            return any(
                r.key == key_or_prefix or (prefix and r.key.startswith(key_or_prefix))
                for r in self.records.values()
            ) or any(k == key_or_prefix or (prefix and k.startswith(key_or_prefix))
                     for k in self._uploading)  # fmt: skip

        self._urgent += 1
        self._notify()
        try:
            while mine():
                await self._wait_change()
        finally:
            self._urgent -= 1

    async def drain(self) -> None:
        """Upload everything journaled, now; return when the journal is empty."""
        self._urgent += 1
        self._notify()
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
        """Upload due records forever (started and cancelled by the daemon's lifecycle)."""
        limiter = trio.CapacityLimiter(self.workers)
        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                for r in sorted(self.records.values(), key=lambda r: r.id):
                    if limiter.available_tokens == 0:
                        break
                    if r.key in self._uploading:
                        continue
                    # due: old enough, or someone waits for it (failures keep their backoff)
                    if r.next_try <= now or (self._urgent and not r.attempts):
                        await limiter.acquire_on_behalf_of(r.id)
                        self._uploading.add(r.key)
                        nursery.start_soon(self._upload_one, upload, r, limiter)
                wake = min(
                    (r.next_try for r in self.records.values() if r.key not in self._uploading),
                    default=now + 3600,
                )
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
            self.failures += 1
            self.last_error = f"{r.key}: {exc}"
            log.warning("upload of %s failed (try %d), again in %.0fs: %s",
                        r.key, r.attempts, backoff, exc)  # fmt: skip
        else:
            self._forget(r)
        finally:
            self._uploading.discard(key)
            limiter.release_on_behalf_of(r.id)
            if r.key == "\0discarded":
                self._forget(r)
            self._notify()

    # -- helpers -------------------------------------------------------------------------------

    def _forget(self, r: Record) -> None:
        self.records.pop(r.id, None)
        self.journal.done(r)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_change(self) -> None:
        await self._changed.wait()
