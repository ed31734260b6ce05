"""Runs blocking storage calls in worker threads, bounded by one CapacityLimiter."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class ThreadRunner:
    def __init__(self, threads: int):
        self.limiter = trio.CapacityLimiter(threads)

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``await run(fn, ...)``: call ``fn`` in a worker thread.

        Not abandoned on cancellation: a write to S3 that started always finishes (or fails)
        before its caller moves on.
        """
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=self.limiter
        )
