"""How glibc's allocator treats the daemon's big buffers (a no-op on other C libraries).

Every GET of a part and every part read for an upload is one 16 MiB ``bytes`` object.  By
default glibc gives each such buffer fresh pages from the kernel (``mmap``, or heap space
it returned at the last free), so the kernel faults in and zeroes 16 MiB per request: per
GiB read through the mount ~100,000 page faults and a tenth of the daemon's CPU.  Kept in
the heap, the same buffers reuse the same pages (~30,000 faults per GiB, the first pass
only); the memory that stays resident after a burst goes back to the kernel once
transfers stop (:func:`release_when_idle`).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

ARENAS = 2
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest: buffers of up to 32 MiB come from the heap
TRIM_THRESHOLD = 128 * 1024 * 1024  # free heap kept at its top while busy
IDLE_CHECK = 5.0  # seconds between looks at the transfer counters


def _libc() -> ctypes.CDLL | None:
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def tune() -> None:
    """Set the allocator up for the daemon; call before any worker thread starts.

    At most ARENAS arenas, not one per thread up to 8 per core: a part is allocated in one
    worker thread's arena and freed by another thread, and with an arena per thread a
    read's peak RSS varied from 228 to 295 MiB, with two 185-202 MiB
    (docs/benchmarks-history.md).  Parts come from the heap (MMAP_THRESHOLD) and freed ones stay
    there up to TRIM_THRESHOLD, so that the next part reuses their pages."""
    libc = _libc()
    if libc is None:
        return
    libc.mallopt(M_ARENA_MAX, ARENAS)
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


async def release_when_idle(activity: Callable[[], int]) -> None:
    """Give free heap memory back to the kernel (``malloc_trim``) once ``activity`` (a
    counter of bytes transferred) has stood still for IDLE_CHECK seconds after moving.
    Runs until cancelled (by the daemon's lifecycle)."""
    libc = _libc()
    if libc is None:
        return
    last, moved = activity(), False
    while True:
        await trio.sleep(IDLE_CHECK)
        now = activity()
        if now != last:
            last, moved = now, True
        elif moved:
            moved = False
            await trio.to_thread.run_sync(libc.malloc_trim, 0)
            log.debug("free memory returned to the kernel")
