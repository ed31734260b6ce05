"""CachedFile on its own: which ranges a read asks S3 for (a recording fetcher, no S3)."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from s3mount.core.filecache import CachedFile, MiB


def test_readahead_without_background_fetches_each_block_once(tmp_path: Path) -> None:
    data = os.urandom(40 * MiB)
    asked: list[tuple[int, int]] = []

    async def fetch(start: int, length: int, etag: str | None) -> bytes:
        asked.append((start // MiB, length // MiB))
        return data[start : start + length]

    async def main() -> None:
        path = tmp_path / "open-1"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        cf = CachedFile(str(path), fd, "k", len(data), "etag", fetch)
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
