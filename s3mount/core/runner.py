"""Runs blocking storage calls in worker threads, bounded by one CapacityLimiter."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from s3mount.storage import Unreachable

T = TypeVar("T")


class ThreadRunner:
    def __init__(self, threads: int, read_deadline: float | None = None):
        self.limiter = trio.CapacityLimiter(threads)
        self.read_deadline = read_deadline

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``await run(fn, ...)``: call ``fn`` in a worker thread.

        Not abandoned on cancellation: a write to S3 that started always finishes (or fails)
        before its caller moves on.  botocore's timeouts and retry budget bound it.
        """
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=self.limiter
        )

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Like calling the runner, for a call that changes nothing in S3 (HEAD, GET, LIST):
        past ``read_deadline`` seconds the caller gets EIO and the thread is abandoned."""
        call = functools.partial(fn, *args, **kwargs)
        if self.read_deadline is None:
            return await trio.to_thread.run_sync(call, limiter=self.limiter)
        with trio.move_on_after(self.read_deadline):
            return await trio.to_thread.run_sync(call, limiter=self.limiter, abandon_on_cancel=True)
        raise Unreachable(f"S3 did not answer within {self.read_deadline:g}s")
