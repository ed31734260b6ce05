"""Deletes in the background, batched: ``unlink`` returns at once, S3 learns it moments later.

``rm -rf`` unlinks one file after another; a DeleteObject round trip for each (20+ ms on real
S3) would make it crawl.  Instead :meth:`DeleteQueue.add` queues the key and a background task
sends whatever has queued up as one DeleteObjects request (up to 1,000 keys), as soon as the
previous request is answered: the first unlink costs one round trip, the next thousand share
the following one.

Consistency with the rest of the file system:
- a write, copy or marker PUT of a key first calls :meth:`settle`: a queued delete of it is
  dropped (the new version replaces it), one in flight is waited for;
- a LIST below a prefix first calls :meth:`flush`, so S3's answer no longer holds the keys;
- unmount and ``s3mount sync`` flush everything.
A delete that S3 refuses (after the storage layer's retries) is logged with its key and errno;
the object then stays, and shows up again in its directory.  Queued deletes live in memory: a
crash within a fraction of a second of an ``unlink`` can leave that object in place.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from s3mount.storage import StorageError

log = logging.getLogger(__name__)

BATCH = 1000  # keys in one DeleteObjects request, S3's limit

Deleter = Callable[[list[str]], Awaitable[None]]  # deletes the keys, raises StorageError
Failed = Callable[[list[str]], None]  # told which keys stay in S3 after a failure


class DeleteQueue:
    def __init__(self, delete: Deleter, on_failure: Failed):
        self._delete = delete
        self._on_failure = on_failure
        self.queued: dict[str, None] = {}  # keys to delete, in order
        self.sending: set[str] = set()  # keys of the request in flight
        self._changed = trio.Event()
        self.running = False  # the background task runs (else deletes are sent at once)
        self.deleted = 0
        self.failures = 0

    async def add(self, key: str) -> None:
        """Delete ``key`` soon (or now, when no background task runs)."""
        if not self.running:
            await self._send([key])
            return
        self.queued[key] = None
        self._notify()

    def hides(self, key: str) -> bool:
        return key in self.queued or key in self.sending

    async def settle(self, key: str) -> None:
        """Before ``key`` is written: a queued delete is dropped, one in flight waited for."""
        self.queued.pop(key, None)
        while key in self.sending:
            await self._wait()

    async def flush(self, prefix: str = "") -> None:
        """Return once no delete of a key below ``prefix`` is queued or in flight."""
        while any(k.startswith(prefix) for k in (*self.queued, *self.sending)):
            if self.running or self.sending:
                await self._wait()
            else:  # queued while a background task ran, which is gone now: send them here
                await self._send(self._take_batch())

    def stats(self) -> dict[str, int]:
        return {
            "pending_deletes": len(self.queued) + len(self.sending),
            "deleted": self.deleted,
            "delete_failures": self.failures,
        }

    async def run(self) -> None:
        """Send queued deletes forever (started and cancelled by the daemon's lifecycle)."""
        self.running = True
        try:
            while True:
                while not self.queued:
                    await self._wait()
                batch = self._take_batch()
                self.sending.update(batch)
                try:
                    with trio.CancelScope(shield=True):  # a request that started finishes
                        await self._send(batch)
                finally:
                    self.sending.difference_update(batch)
                    self._notify()
        finally:
            self.running = False
            self._notify()

    def _take_batch(self) -> list[str]:
        batch = list(self.queued)[:BATCH]
        for k in batch:
            del self.queued[k]
        return batch

    async def _send(self, keys: list[str]) -> None:
        try:
            await self._delete(keys)
        except StorageError as exc:
            self.failures += 1
            log.error("delete of %d key(s) failed, they stay in S3 (%s, errno %s): %s",
                      len(keys), keys[0], exc.errno, exc)  # fmt: skip
            self._on_failure(keys)
            if not self.running:
                raise
        else:
            self.deleted += len(keys)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait(self) -> None:
        await self._changed.wait()
