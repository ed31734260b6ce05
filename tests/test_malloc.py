"""Unit tests of s3mount/malloc.py: when free heap memory goes back to the kernel."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from s3mount import malloc


class FakeLibc:
    def __init__(self) -> None:
        self.trims: list[int] = []

    def malloc_trim(self, pad: int) -> int:
        self.trims.append(pad)
        return 1


def test_memory_is_released_once_after_transfers_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = FakeLibc()
    monkeypatch.setattr(malloc, "_libc", lambda: libc)
    moved = [0]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(malloc.release_when_idle, lambda: moved[0])
            await trio.sleep(malloc.IDLE_CHECK / 2)  # between the task's checks
            await trio.sleep(3 * malloc.IDLE_CHECK)
            assert libc.trims == []  # nothing moved yet: nothing to give back
            for _ in range(4):  # a transfer that lasts several checks
                moved[0] += 16 << 20
                await trio.sleep(malloc.IDLE_CHECK)
            assert libc.trims == []  # never while busy
            await trio.sleep(5 * malloc.IDLE_CHECK)
            assert len(libc.trims) == 1  # once, after the first idle check
            moved[0] += 1
            await trio.sleep(3 * malloc.IDLE_CHECK)
            assert len(libc.trims) == 2
            nursery.cancel_scope.cancel()

    # Jumps only when nothing ran for 50 ms of real time: never while malloc_trim's thread runs.
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.05))


def test_tune_sets_the_heap_thresholds_on_glibc() -> None:
    if malloc._libc() is None:
        pytest.skip("not glibc")
    malloc.tune()  # the limits glibc accepts: mallopt returns 1 for each
    libc = malloc._libc()
    assert libc is not None
    assert libc.mallopt(malloc.M_MMAP_THRESHOLD, malloc.MMAP_THRESHOLD) == 1
    assert libc.mallopt(malloc.M_TRIM_THRESHOLD, malloc.TRIM_THRESHOLD) == 1
