"""The core S3FS layer (no FUSE) against a real moto server process.

Each test is an ``async def`` run by :func:`trio.run` (see :func:`trio_test`); what the layer
wrote is checked through boto3, and what it cost through the storage's request counter.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
import trio

from s3mount.core import lister as lister_module
from s3mount.core.errors import (
    DirectoryNotEmpty,
    FSError,
    IsADirectory,
    NameTooLong,
    NotADirectory,
    ReadOnly,
    ResourceExists,
    ResourceNotFound,
    Stale,
)
from s3mount.core.journal import Journal
from s3mount.core.s3fs import DIR_CONTENT_TYPE, S3FS
from s3mount.storage import MiB, Storage, StorageError, Unreachable


def trio_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an ``async def`` test (its fixtures included) in a fresh trio run."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        trio.run(functools.partial(fn, *args, **kwargs))

    return wrapper


@pytest.fixture
def make_fs(storage: Storage, bucket: str, tmp_path: Path) -> Callable[..., S3FS]:
    """A factory of S3FS on the test's bucket; call it inside the trio run."""

    def make(prefix: str = "", **kwargs: Any) -> S3FS:
        kwargs.setdefault("key_sync_timeout", 5)
        kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
        kwargs.setdefault("listing_ttl", 10.0)
        return S3FS(bucket, prefix, storage, **kwargs)

    return make


# -- helpers ----------------------------------------------------------------------------------


def put(storage: Storage, bucket: str, key: str, data: bytes = b"", **kwargs: Any) -> str:
    """Put an object behind the layer's back; returns its ETag (unquoted)."""
    r = storage.client.put_object(Bucket=bucket, Key=key, Body=data, **kwargs)
    return r["ETag"].strip('"')


def get(storage: Storage, bucket: str, key: str) -> bytes:
    return storage.client.get_object(Bucket=bucket, Key=key)["Body"].read()


def absent(storage: Storage, bucket: str, key: str) -> bool:
    try:
        storage.client.head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        return True
    return False


def all_keys(storage: Storage, bucket: str, prefix: str = "") -> set[str]:
    pages = storage.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def requests(storage: Storage) -> dict[str, int]:
    return dict(storage.counter.snapshot()["requests"])


def since(storage: Storage, before: dict[str, int]) -> dict[str, int]:
    """Requests sent since ``before`` (a :func:`requests` snapshot), by operation."""
    now = requests(storage)
    return {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}


@contextlib.asynccontextmanager
async def listing_with(fs: S3FS, list_pages: Callable[..., Any]) -> AsyncIterator[None]:
    """``fs`` with a background nursery, as the daemon gives it (walks, the rest of a big
    listing), and its storage's ``list_pages`` replaced; both undone on the way out."""
    real_list_pages = fs.storage.list_pages
    fs.storage.list_pages = list_pages  # type: ignore[method-assign]
    try:
        async with trio.open_nursery() as nursery:
            fs.background = nursery
            try:
                yield
            finally:
                fs.background = None
                nursery.cancel_scope.cancel()
    finally:
        fs.storage.list_pages = real_list_pages  # type: ignore[method-assign]


def bytes_in(storage: Storage) -> int:
    return storage.counter.snapshot()["bytes_in"]


async def write_file(fs: S3FS, path: str, data: bytes, mode: str = "wb") -> None:
    f = await fs.open(path, mode)
    try:
        await f.write(data)
    finally:
        await f.close()


async def read_file(fs: S3FS, path: str) -> bytes:
    f = await fs.open(path, "rb")
    try:
        return await f.read()
    finally:
        await f.close()


# -- reading and writing ----------------------------------------------------------------------


@trio_test
async def test_write_then_read_round_trip(make_fs, storage, bucket):
    fs = make_fs()
    data = os.urandom(3 * MiB + 123)  # more than one block, the last one short
    await write_file(fs, "big.bin", data)
    assert get(storage, bucket, "big.bin") == data
    info = await fs.getinfo("big.bin")
    assert not info.is_dir and info.size == len(data)
    assert info.etag == storage.client.head_object(Bucket=bucket, Key="big.bin")["ETag"].strip('"')

    # A fresh layer reads it back from S3, whole and by position.
    fs2 = make_fs()
    assert await read_file(fs2, "big.bin") == data
    f = await fs2.open("big.bin", "rb")
    try:
        assert f.seek(2 * MiB - 10) == 2 * MiB - 10
        assert await f.read(20) == data[2 * MiB - 10 : 2 * MiB + 10]
        assert f.tell() == 2 * MiB + 10
        assert f.seek(-3, os.SEEK_END) == len(data) - 3
        assert await f.read() == data[-3:]
        assert await f.read() == b""
        assert await f.pread(len(data) + 10, 5) == b""  # past the end
        with pytest.raises(FSError):
            await f.pwrite(0, b"x")  # not open for writing
    finally:
        await f.close()


@trio_test
async def test_append(make_fs, storage, bucket):
    fs = make_fs()
    put(storage, bucket, "log.txt", b"first line\n")
    f = await fs.open("log.txt", "ab")
    try:
        f.seek(0)  # append mode writes at the end wherever the position is
        await f.write(b"second line\n")
        await f.write(b"third line\n")
    finally:
        await f.close()
    assert get(storage, bucket, "log.txt") == b"first line\nsecond line\nthird line\n"
    # 'ab' on a missing file creates it.
    await write_file(fs, "new.log", b"hello", mode="ab")
    assert get(storage, bucket, "new.log") == b"hello"


@trio_test
async def test_random_write_into_the_middle_fetches_only_what_it_touches(make_fs, storage, bucket):
    fs = make_fs()
    data = bytearray(os.urandom(5 * MiB))
    put(storage, bucket, "blob.bin", bytes(data))
    patch = os.urandom(100)
    off = 5 * MiB // 2

    before, before_in = requests(storage), bytes_in(storage)
    f = await fs.open("blob.bin", "r+b")
    assert since(storage, before).get("GetObject", 0) == 0  # opening downloads nothing
    assert await f.pwrite(off, patch) == 100
    # Only the block the write lands in came down (1 MiB), not the object.
    fetched = bytes_in(storage) - before_in
    assert 0 < fetched <= 2 * MiB
    assert since(storage, before).get("GetObject", 0) == 1
    # The data is readable at once, from the local copy.
    assert await f.pread(off - 5, 110) == bytes(data[off - 5 : off]) + patch + bytes(
        data[off + 100 : off + 105]
    )
    await f.close()
    # The upload needed the rest: a few ranged GETs (runs of blocks), never one per KiB.
    assert since(storage, before).get("GetObject", 0) <= 3
    assert bytes_in(storage) - before_in == 5 * MiB  # each byte fetched once

    data[off : off + 100] = patch
    assert get(storage, bucket, "blob.bin") == bytes(data)


@trio_test
async def test_truncate_shrink_and_grow(make_fs, storage, bucket):
    fs = make_fs()
    put(storage, bucket, "t.txt", b"hello world")
    await fs.truncate("t.txt", 5)
    assert get(storage, bucket, "t.txt") == b"hello"
    assert (await fs.getinfo("t.txt")).size == 5
    await fs.truncate("t.txt", 12)
    assert get(storage, bucket, "t.txt") == b"hello" + b"\0" * 7
    assert (await fs.getinfo("t.txt")).size == 12

    # Through a handle, on a multi-block object: cut inside block 1, then grow past the end.
    data = os.urandom(3 * MiB)
    put(storage, bucket, "m.bin", data)
    fs.invalidate()  # it was put behind the layer's back
    f = await fs.open("m.bin", "r+b")
    try:
        await f.truncate(MiB + 7)
        assert f.size == MiB + 7
        await f.truncate(2 * MiB)
        assert await f.pread(MiB, 20) == data[MiB : MiB + 7] + b"\0" * 13
    finally:
        await f.close()
    assert get(storage, bucket, "m.bin") == data[: MiB + 7] + b"\0" * (MiB - 7)


@trio_test
async def test_open_w_on_existing_object_downloads_nothing(make_fs, storage, bucket):
    fs = make_fs()
    put(storage, bucket, "w.bin", os.urandom(3 * MiB))
    before, before_in = requests(storage), bytes_in(storage)
    f = await fs.open("w.bin", "wb")
    assert f.size == 0
    await f.write(b"replaced")
    assert since(storage, before).get("GetObject", 0) == 0
    await f.close()
    assert since(storage, before).get("GetObject", 0) == 0
    assert bytes_in(storage) == before_in
    assert get(storage, bucket, "w.bin") == b"replaced"


@trio_test
async def test_zero_byte_files(make_fs, storage, bucket):
    fs = make_fs()
    f = await fs.open("empty", "wb")
    await f.close()  # created even though nothing was written
    head = storage.client.head_object(Bucket=bucket, Key="empty")
    assert head["ContentLength"] == 0
    assert (await fs.getinfo("empty")).size == 0
    assert await fs.isfile("empty")
    assert await read_file(fs, "empty") == b""
    # An existing empty object opens and reads without any GET.
    put(storage, bucket, "empty2")
    fs2 = make_fs()
    before = requests(storage)
    assert await read_file(fs2, "empty2") == b""
    assert since(storage, before).get("GetObject", 0) == 0
    # 'x' refuses an existing file, creates a new one.
    with pytest.raises(ResourceExists):
        await fs.open("empty", "xb")
    await write_file(fs, "fresh", b"x", mode="xb")
    assert get(storage, bucket, "fresh") == b"x"


# -- directories ------------------------------------------------------------------------------


@trio_test
async def test_implicit_directories(make_fs, storage, bucket):
    put(storage, bucket, "a/b/c.txt", b"deep")
    fs = make_fs()
    assert await fs.isdir("a")
    assert await fs.isdir("/a/b")
    assert await fs.isfile("a/b/c.txt")
    assert not await fs.isfile("a")
    assert await fs.listdir("/") == ["a"]
    assert await fs.listdir("a") == ["b"]
    assert await fs.listdir("a/b") == ["c.txt"]
    assert await read_file(fs, "a/b/c.txt") == b"deep"
    assert (await fs.getinfo("a")).is_dir
    assert (await fs.getinfo("/")).is_dir


@trio_test
async def test_makedir_writes_a_marker_and_removedir_deletes_it(make_fs, storage, bucket):
    fs = make_fs()
    info = await fs.makedir("dir")
    assert info.is_dir
    head = storage.client.head_object(Bucket=bucket, Key="dir/")
    assert head["ContentType"] == DIR_CONTENT_TYPE
    assert head["ContentLength"] == 0
    assert await fs.isdir("dir")
    assert await fs.listdir("dir") == []
    assert "dir" in await fs.listdir("/")
    # Seen by a fresh layer too.
    assert await make_fs().isdir("dir")

    await fs.removedir("dir")
    assert absent(storage, bucket, "dir/")
    assert not await fs.exists("dir")
    assert await fs.listdir("/") == []


@trio_test
async def test_a_lookup_in_a_big_directory_does_not_wait_for_its_whole_listing(
    make_fs, storage, bucket
):
    # cat big/x in a directory of a million keys must not list them all first.  Here pages
    # of 3 keys, each after the first taking 0.4 s, stand for a directory of many pages.
    for i in range(12):
        put(storage, bucket, f"big/k{i:02d}", b"x" * i)
    put(storage, bucket, "big/sub/f", b"1")
    fs = make_fs()
    real_list_pages = fs.storage.list_pages

    def list_pages(bucket_: str, prefix: str, delimiter: str | None = None, **kw: Any):
        if prefix != "big/" or not delimiter:
            yield from real_list_pages(bucket_, prefix, delimiter, **kw)
            return
        for n, page in enumerate(real_list_pages(bucket_, prefix, delimiter, page_size=3)):
            if n:
                time.sleep(0.4)
            yield page

    async with listing_with(fs, list_pages):
        before = requests(storage)
        with trio.fail_after(1):  # all 5 pages take 1.6 s
            assert (await fs.getinfo("big/k11")).size == 11
            assert not await fs.exists("big/nope")
            assert await fs.isdir("big/sub")
        used = since(storage, before)
        assert used.get("HeadObject", 0) >= 2, used  # the names were asked for alone
        assert fs.stats["lookup_probes"] == 3
        # The listing went on in the background; once it is there, lookups use it.
        assert len(await fs.listdir("big")) == 13
        before = requests(storage)
        assert (await fs.getinfo("big/k05")).size == 5
        assert not await fs.exists("big/nope2")
        assert since(storage, before) == {}


@trio_test
async def test_removedir_deletes_a_marker_only_where_s3_has_one(make_fs, storage, bucket):
    # rm -rf of a tree a plain client uploaded: its directories exist only as key
    # prefixes, and their emptiness check (a LIST) shows there is no marker to delete.
    put(storage, bucket, "plain/sub/x", b"1")
    put(storage, bucket, "marked/")
    put(storage, bucket, "marked/y", b"2")
    fs = make_fs()
    for path in ("/", "plain", "plain/sub", "marked"):  # rm reads each directory first
        await fs.listdir(path)
    for path in ("plain/sub/x", "marked/y"):
        await fs.remove(path)
    await fs.deletes.flush()
    before = requests(storage)
    for path in ("plain/sub", "plain", "marked"):
        await fs.removedir(path)
    assert since(storage, before) == {"ListObjectsV2": 3, "DeleteObject": 1}
    assert all_keys(storage, bucket) == set()
    assert await fs.listdir("/") == []


@trio_test
async def test_makedir_recursive_and_recreate(make_fs, storage, bucket):
    fs = make_fs()
    with pytest.raises(ResourceNotFound):
        await fs.makedir("x/y/z")
    await fs.makedir("x/y/z", recursive=True)
    assert all_keys(storage, bucket) == {"x/", "x/y/", "x/y/z/"}
    assert await fs.isdir("x/y/z")

    with pytest.raises(ResourceExists) as exc:
        await fs.makedir("x/y")
    assert exc.value.errno == errno.EEXIST
    assert (await fs.makedir("x/y", allow_recreate=True)).is_dir
    # Recreating an implicit directory is fine too, and so is the root.
    put(storage, bucket, "imp/file", b"1")
    fs.invalidate()
    assert (await fs.makedir("imp", allow_recreate=True)).is_dir
    assert (await fs.makedir("/")).is_dir

    await write_file(fs, "file", b"data")
    with pytest.raises(ResourceExists):
        await fs.makedir("file", allow_recreate=True)  # a file is no directory
    with pytest.raises(NotADirectory):
        await fs.makedir("file/sub")


@trio_test
async def test_removedir_non_empty_and_recursive(make_fs, storage, bucket):
    put(storage, bucket, "topper", b"a sibling that shares the prefix")
    fs = make_fs()
    await fs.makedir("top/mid", recursive=True)
    await write_file(fs, "top/mid/f1", b"1")
    await write_file(fs, "top/f2", b"2")
    put(storage, bucket, "top/mid/deep/f3", b"3")  # behind the layer's back

    with pytest.raises(DirectoryNotEmpty) as exc:
        await fs.removedir("top")
    assert exc.value.errno == errno.ENOTEMPTY
    assert "top/f2" in all_keys(storage, bucket)

    await fs.removedir("top/mid", recursive=True)
    assert all_keys(storage, bucket) == {"top/", "top/f2", "topper"}
    assert await fs.listdir("top") == ["f2"]

    await fs.removedir("top", force=True)
    assert all_keys(storage, bucket) == {"topper"}
    assert await fs.listdir("/") == ["topper"]
    assert not await fs.exists("top/f2")


# -- listing ----------------------------------------------------------------------------------


async def _tree(fs: S3FS, storage: Storage, bucket: str) -> None:
    for name in ("a.txt", "b.txt", "c.log"):
        put(storage, bucket, f"d/{name}", name.encode())
    put(storage, bucket, "d/sub1/x", b"x")
    await fs.makedir("d/sub2", recursive=True)


@trio_test
async def test_listdir_options(make_fs, storage, bucket):
    fs = make_fs()
    await _tree(fs, storage, bucket)
    assert await fs.listdir("d") == ["a.txt", "b.txt", "c.log", "sub1", "sub2"]
    assert await fs.listdir("d", wildcard="*.txt") == ["a.txt", "b.txt"]
    assert await fs.listdir("d", wildcard="sub*") == ["sub1", "sub2"]
    assert await fs.listdir("d", full=True) == ["d/a.txt", "d/b.txt", "d/c.log", "d/sub1", "d/sub2"]
    assert await fs.listdir("/d/", full=True, wildcard="*.log") == ["d/c.log"]
    assert await fs.listdir("d", absolute=True, dirs_only=True) == ["/d/sub1", "/d/sub2"]
    assert await fs.listdir("d", files_only=True) == ["a.txt", "b.txt", "c.log"]
    assert await fs.listdir("d", dirs_only=True) == ["sub1", "sub2"]
    assert await fs.listdir("d/sub1", full=True) == ["d/sub1/x"]
    assert await fs.listdir("/", full=True) == ["d"]
    assert await fs.listdir("/", absolute=True) == ["/d"]
    assert list(await fs.ilistdir("d", files_only=True, wildcard="a*")) == ["a.txt"]
    with pytest.raises(ValueError):
        await fs.listdir("d", dirs_only=True, files_only=True)
    with pytest.raises(NotADirectory):
        await fs.listdir("d/a.txt")
    with pytest.raises(ResourceNotFound):
        await fs.listdir("nowhere")


@trio_test
async def test_a_walk_far_behind_does_not_hold_up_the_directories_a_program_lists(
    make_fs, storage, bucket
):
    # A walk of the whole bucket (started by ls of the top, or lookups in two top-level
    # directories) can be pages away from the tree a program lists next (ls -R zzz).  The
    # program's directories wait for one more page of the walk at most, then list
    # themselves and start a walk of their own.  Here the bucket walk stalls after its
    # second page.
    for i in range(6):
        put(storage, bucket, f"aaa/x{i}")
    for d in range(3):
        for j in range(2):
            put(storage, bucket, f"zzz/d{d}/f{j}")
    fs = make_fs(metadata="listing")
    real_list_pages = storage.list_pages
    release = threading.Event()

    def list_pages(bucket_: str, prefix: str, delimiter: str | None = None, **kw: Any):
        if prefix or delimiter:
            yield from real_list_pages(bucket_, prefix, delimiter, **kw)
            return
        for n, page in enumerate(real_list_pages(bucket_, prefix, page_size=2)):
            if n == 1:
                time.sleep(0.3)
            elif n >= 2:
                release.wait(30)  # stalled until the test ends
            yield page

    try:
        async with listing_with(fs, list_pages):
            assert await fs.listdir("/") == ["aaa", "zzz"]  # ls of the top: a walk of it all
            assert "" in fs.lister._walks
            with trio.fail_after(10):
                assert await fs.listdir("zzz") == ["d0", "d1", "d2"]
                assert await fs.listdir("zzz/d2") == ["f0", "f1"]
            assert fs.listings.get("zzz/d1/") is not None  # from zzz's own walk
    finally:
        release.set()


@trio_test
async def test_a_walk_goes_on_only_while_programs_use_it(make_fs, storage, bucket, monkeypatch):
    # A readdir with subdirectories (ls -R, find), or lookups in two subdirectories of a
    # directory (stat of many paths), start a walk of its tree.  At a bucket's top that tree
    # is the whole bucket: when no program goes where the walk goes (a plain ls), it stops
    # WALK_LEAD pages on instead of listing 50,000 keys; a program that takes listings from
    # it keeps it going to the end.
    put(storage, bucket, "a/x")
    put(storage, bucket, "b/y")
    for d in range(10):
        put(storage, bucket, f"c/d{d}/f0")
        put(storage, bucket, f"c/d{d}/f1")
    monkeypatch.setattr(lister_module, "WALK_PAUSE", 0.3)  # how long it waits for a program
    fs = make_fs(metadata="listing")
    real_list_pages = storage.list_pages
    pages = 0

    def list_pages(bucket_: str, prefix: str, delimiter: str | None = None, **kw: Any):
        nonlocal pages
        if prefix or delimiter:
            yield from real_list_pages(bucket_, prefix, delimiter, **kw)
            return
        for page in real_list_pages(bucket_, prefix, page_size=2):
            pages += 1
            yield page

    async def walk_done() -> None:
        with trio.fail_after(10):
            while fs.lister._walks:
                await trio.sleep(0.01)

    async with listing_with(fs, list_pages):
        for path in ("a", "a/x", "b", "b/y"):  # the kernel's lookups, one name each
            await fs.getinfo(path)  # b: a second top-level directory, a walk of it all
        assert "" in fs.lister._walks
        await walk_done()
        assert pages == 3  # WALK_LEAD pages: a/x b/y, c/d0/f0 c/d0/f1, c/d1/..

        fs.invalidate()
        pages = 0
        # A slow machine may take longer than 0.3 s between two stats: the walk would
        # stop waiting.  It ends at the bucket's end here, so a longer wait costs nothing.
        monkeypatch.setattr(lister_module, "WALK_PAUSE", 5.0)
        for path in ("a", "a/x", "b", "b/y"):
            await fs.getinfo(path)
        for d in range(10):  # stat of every file, in the walk's order
            assert (await fs.getinfo(f"c/d{d}/f1")).size == 0
        await walk_done()
        # The program used it, so it went far past WALK_LEAD pages: all 11 (22 keys), or
        # 10 on a busy machine, where the program can run a page ahead of the walk and
        # list its last directories itself.
        assert pages >= 10

        monkeypatch.setattr(lister_module, "WALK_PAUSE", 0.3)
        fs.invalidate()
        pages = 0
        assert await fs.listdir("/") == ["a", "b", "c"]  # ls of the top: a walk
        await walk_done()
        assert pages == 3


@trio_test
async def test_auto_metadata_samples_a_directory_before_heading_it_all(make_fs, storage, bucket):
    # "auto" (the default): a few HEADs tell whether a directory's objects carry POSIX
    # metadata.  Objects a plain S3 client wrote carry none: the rest of such a directory
    # shows the mount's defaults without a HEAD each.  Objects s3fs-fuse (or s3mount) wrote
    # do: then every entry is HEADed, and shows its stored mode and owner.
    for i in range(30):
        put(storage, bucket, f"plain/f{i:02d}", b"p")
        put(storage, bucket, f"rich/f{i:02d}", b"r", Metadata={"mode": str(0o100600), "uid": "7"})
    fs = make_fs()
    await fs.isdir("plain")
    before = requests(storage)
    infos = await fs.listinfo("plain")
    assert len(infos) == 30 and all(i.mode is None for i in infos)
    assert since(storage, before) == {"ListObjectsV2": 1, "HeadObject": 4}

    before = requests(storage)
    infos = await fs.listinfo("rich")
    assert all(i.mode & 0o777 == 0o600 and i.uid == 7 for i in infos)
    assert since(storage, before) == {"ListObjectsV2": 1, "HeadObject": 30}

    # "listing": never a HEAD for attributes.
    fast = make_fs(metadata="listing", cache_dir=str(fs.recovery_dir) + "-other")
    await fast.isdir("rich")
    before = requests(storage)
    assert len(await fast.listinfo("rich")) == 30
    assert since(storage, before) == {"ListObjectsV2": 1}


@trio_test
async def test_listinfo_costs_one_list_and_heads_only_once(make_fs, storage, bucket, tmp_path):
    sizes = {f"f{i:02d}": i * 7 for i in range(50)}
    for name, size in sizes.items():
        put(storage, bucket, f"big/{name}", b"z" * size)
    put(storage, bucket, "big/sub/inner", b"i")

    fs = make_fs(metadata="head")  # exact: a HEAD for every entry the cache does not know
    assert await fs.isdir("big")  # lists the root
    before = requests(storage)
    plain = await fs.listinfo("big", meta=False)  # names, types, sizes: the listing alone
    assert since(storage, before) == {"ListObjectsV2": 1}
    assert [i.name for i in plain] == sorted([*sizes, "sub"])

    # POSIX metadata is not in a listing: the first full listing HEADs each entry once
    # (in parallel), the directory's marker included.
    before = requests(storage)
    infos = await fs.listinfo("big")
    assert since(storage, before) == {"HeadObject": 51}
    by_name = {i.name: i for i in infos}
    for name, size in sizes.items():
        assert not by_name[name].is_dir
        assert by_name[name].size == size
        assert by_name[name].path == f"/big/{name}"
        assert by_name[name].etag
        assert by_name[name].mtime > 0
    assert by_name["sub"].is_dir

    # Everything about the entries now comes from the caches: no request at all.
    before = requests(storage)
    for name in sizes:
        assert (await fs.getinfo(f"big/{name}")).size == sizes[name]
    assert await fs.listdir("big", files_only=True) == sorted(sizes)
    assert since(storage, before) == {}

    # A cold layer on the same cache directory (a remount): the listings again, but the
    # metadata cache on disk spares every HEAD.
    cold = make_fs(metadata="head")
    before = requests(storage)
    assert len(await cold.listinfo("big")) == 51
    assert since(storage, before) == {"ListObjectsV2": 2}

    # With an empty cache directory, the HEADs come back.
    fresh = make_fs(cache_dir=str(tmp_path / "other-cache"), metadata="head")
    before = requests(storage)
    assert len(await fresh.listinfo("big")) == 51
    assert since(storage, before) == {"ListObjectsV2": 2, "HeadObject": 51}


@trio_test
async def test_listing_cache_ttl_and_invalidate(make_fs, storage, bucket):
    fs = make_fs(listing_ttl=1.0)
    assert await fs.listdir("/") == []
    put(storage, bucket, "sneaky.txt", b"s")
    assert await fs.listdir("/") == []  # the cached listing does not know it yet
    assert not await fs.exists("sneaky.txt")
    await trio.sleep(1.2)
    assert await fs.listdir("/") == ["sneaky.txt"]
    assert await fs.exists("sneaky.txt")

    put(storage, bucket, "sneaky2.txt", b"s")
    assert await fs.listdir("/") == ["sneaky.txt"]
    fs.invalidate("/")
    assert await fs.listdir("/") == ["sneaky.txt", "sneaky2.txt"]

    # Invalidating a subtree refreshes it.
    await fs.makedir("d")
    assert await fs.listdir("d") == []
    put(storage, bucket, "d/late", b"l")
    assert await fs.listdir("d") == []
    fs.invalidate("d")
    assert await fs.listdir("d") == ["late"]

    # A local create shows at once, before and after the upload.
    f = await fs.open("mine.txt", "wb")
    assert "mine.txt" in await fs.listdir("/")
    await f.write(b"12345")
    assert (await fs.getinfo("mine.txt")).size == 5
    await f.close()
    before = requests(storage)
    assert await fs.listdir("/") == ["d", "mine.txt", "sneaky.txt", "sneaky2.txt"]
    assert (await fs.getinfo("mine.txt")).size == 5
    assert "ListObjectsV2" not in since(storage, before)
    # A local remove too.
    await fs.remove("sneaky.txt")
    assert await fs.listdir("/") == ["d", "mine.txt", "sneaky2.txt"]


# -- rename, move, copy -----------------------------------------------------------------------


@trio_test
async def test_rename_file_is_server_side(make_fs, storage, bucket):
    fs = make_fs()
    data = os.urandom(2 * MiB)
    put(storage, bucket, "old.bin", data, Metadata={"k": "v"})
    await fs.makedir("dest")
    assert await fs.isfile("old.bin")
    before = requests(storage)
    await fs.rename("old.bin", "dest/new.bin")
    used = since(storage, before)
    assert used.get("CopyObject") == 1
    assert used.get("DeleteObject") == 1
    assert "GetObject" not in used
    assert "PutObject" not in used
    assert absent(storage, bucket, "old.bin")
    assert get(storage, bucket, "dest/new.bin") == data
    assert storage.client.head_object(Bucket=bucket, Key="dest/new.bin")["Metadata"] == {"k": "v"}
    assert not await fs.exists("old.bin")
    assert (await fs.getinfo("dest/new.bin")).size == len(data)
    assert await fs.listdir("dest") == ["new.bin"]


@trio_test
async def test_rename_directory_with_nested_content(make_fs, storage, bucket):
    fs = make_fs()
    contents = {
        "src/a.txt": b"a",
        "src/b/c.txt": b"c",
        "src/b/d/e.txt": b"e",
        "src/b/d/f.txt": b"f" * 1000,
    }
    for key, data in contents.items():
        put(storage, bucket, key, data)
    put(storage, bucket, "src/b/", b"", ContentType=DIR_CONTENT_TYPE)
    put(storage, bucket, "srcfile", b"same prefix, not inside")
    assert await fs.listdir("src/b") == ["c.txt", "d"]  # cache the old listings

    await fs.rename("src", "dst")
    keys = all_keys(storage, bucket)
    assert not {k for k in keys if k.startswith("src/")}
    assert "srcfile" in keys
    for key, data in contents.items():
        assert get(storage, bucket, "dst/" + key[4:]) == data
    assert "dst/b/" in keys  # the explicit marker moved along
    assert "dst/" in keys  # an implicit directory keeps existing as a marked one

    assert not await fs.exists("src")
    assert not await fs.exists("src/b")
    assert await fs.listdir("/") == ["dst", "srcfile"]
    assert await fs.listdir("dst/b") == ["c.txt", "d"]
    assert await fs.listdir("dst/b/d") == ["e.txt", "f.txt"]
    assert await read_file(fs, "dst/b/d/f.txt") == b"f" * 1000

    with pytest.raises(FSError):
        await fs.rename("dst", "dst/b/inside")  # into itself


@trio_test
async def test_move_overwrite(make_fs, storage, bucket):
    fs = make_fs()
    put(storage, bucket, "f", b"from")
    put(storage, bucket, "g", b"to")
    with pytest.raises(ResourceExists):
        await fs.move("f", "g")
    assert get(storage, bucket, "f") == b"from"
    assert get(storage, bucket, "g") == b"to"
    await fs.move("f", "g", overwrite=True)
    assert absent(storage, bucket, "f")
    assert get(storage, bucket, "g") == b"from"
    await fs.move("g", "h")  # no overwrite needed for a new name
    assert all_keys(storage, bucket) == {"h"}

    # Types must match when replacing.
    await fs.makedir("dir")
    with pytest.raises(IsADirectory):
        await fs.move("h", "dir", overwrite=True)
    with pytest.raises(NotADirectory):
        await fs.move("dir", "h", overwrite=True)
    with pytest.raises(ResourceNotFound):
        await fs.move("missing", "elsewhere")


@trio_test
async def test_copy_is_server_side(make_fs, storage, bucket):
    fs = make_fs()
    data = os.urandom(MiB + 5)
    put(storage, bucket, "orig", data)
    put(storage, bucket, "other", b"other")
    before = requests(storage)
    await fs.copy("orig", "dup")
    used = since(storage, before)
    assert used.get("CopyObject") == 1
    assert "GetObject" not in used and "PutObject" not in used
    assert get(storage, bucket, "dup") == data
    assert get(storage, bucket, "orig") == data
    assert (await fs.getinfo("dup")).size == len(data)

    with pytest.raises(ResourceExists):
        await fs.copy("orig", "other")
    assert get(storage, bucket, "other") == b"other"
    await fs.copy("orig", "other", overwrite=True)
    assert get(storage, bucket, "other") == data

    await fs.makedir("dir")
    with pytest.raises(IsADirectory):
        await fs.copy("dir", "dir2")
    with pytest.raises(IsADirectory):
        await fs.copy("orig", "dir", overwrite=True)
    with pytest.raises(ResourceNotFound):
        await fs.copy("missing", "x")

    # Unsaved data of an open file is uploaded first, then copied.
    f = await fs.open("orig", "r+b")
    try:
        await f.pwrite(0, b"NEW")
        await fs.copy("orig", "dup2")
    finally:
        await f.close()
    assert get(storage, bucket, "dup2") == b"NEW" + data[3:]


# -- prefix -----------------------------------------------------------------------------------


@trio_test
async def test_prefix_mount_sees_and_writes_only_under_its_prefix(make_fs, storage, bucket):
    put(storage, bucket, "sub/tree/a.txt", b"inside")
    put(storage, bucket, "sub/tree/deep/b.txt", b"deeper")
    put(storage, bucket, "sub/other.txt", b"outside")
    put(storage, bucket, "sub/treehouse.txt", b"shares the prefix string")
    put(storage, bucket, "top.txt", b"outside")
    outside = all_keys(storage, bucket) - all_keys(storage, bucket, "sub/tree/")

    fs = make_fs("/sub/tree/")
    assert await fs.listdir("/") == ["a.txt", "deep"]
    assert await read_file(fs, "a.txt") == b"inside"
    assert await read_file(fs, "/deep/b.txt") == b"deeper"
    assert not await fs.exists("top.txt")
    assert not await fs.exists("sub")

    await write_file(fs, "new.txt", b"new")
    await fs.makedir("made/here", recursive=True)
    await fs.rename("a.txt", "made/a.txt")
    await fs.copy("made/a.txt", "copy.txt")
    await fs.remove("deep/b.txt")
    assert get(storage, bucket, "sub/tree/new.txt") == b"new"
    assert all_keys(storage, bucket, "sub/tree/") == {
        "sub/tree/new.txt",
        "sub/tree/made/",
        "sub/tree/made/here/",
        "sub/tree/made/a.txt",
        "sub/tree/copy.txt",
    }
    assert all_keys(storage, bucket) - all_keys(storage, bucket, "sub/tree/") == outside
    # "deep" was implicit: with its only key gone it no longer exists in S3 (the cached
    # listing keeps showing it until the TTL or an invalidate).
    fs.invalidate()
    assert await fs.listdir("/") == ["copy.txt", "made", "new.txt"]

    await fs.removedir("made", recursive=True)
    assert all_keys(storage, bucket, "sub/tree/") == {"sub/tree/new.txt", "sub/tree/copy.txt"}
    assert all_keys(storage, bucket) - all_keys(storage, bucket, "sub/tree/") == outside


# -- open files -------------------------------------------------------------------------------


@trio_test
async def test_removed_while_open_keeps_reading(make_fs, storage, bucket):
    fs = make_fs()
    data = os.urandom(3 * MiB + 17)
    put(storage, bucket, "doomed", data)
    f = await fs.open("doomed", "rb")
    try:
        assert await f.read(10) == data[:10]
        await fs.remove("doomed")
        assert absent(storage, bucket, "doomed")
        assert not await fs.exists("doomed")
        assert await f.read() == data[10:]
        assert await f.pread(MiB, 100) == data[MiB : MiB + 100]
    finally:
        await f.close()
    assert absent(storage, bucket, "doomed")  # the close uploaded nothing

    # A writer's data is not uploaded after a remove either.
    w = await fs.open("gone", "wb")
    await w.write(b"never stored")
    await fs.remove("gone")
    await w.write(b" still writable")
    await w.close()
    assert absent(storage, bucket, "gone")
    assert os.listdir(fs.files.directory) == []


@trio_test
async def test_object_replaced_while_open_is_stale(make_fs, storage, bucket):
    fs = make_fs()
    old = os.urandom(3 * MiB)
    put(storage, bucket, "moving", old)
    f = await fs.open("moving", "rb")
    try:
        assert await f.pread(0, 10) == old[:10]
        put(storage, bucket, "moving", os.urandom(3 * MiB))  # someone else replaces it
        assert await f.pread(5, 10) == old[5:15]  # what is already here stays readable
        # The rest is never mixed from two versions: the reads are pinned to the old ETag.
        with pytest.raises(Stale) as exc:
            await f.pread(2 * MiB, 10)
        assert exc.value.errno == errno.ESTALE
    finally:
        await f.close()


@trio_test
async def test_two_handles_share_one_local_copy(make_fs, storage, bucket):
    fs = make_fs()
    put(storage, bucket, "shared", b"0123456789")
    r = await fs.open("shared", "rb")
    w = await fs.open("shared", "r+b")
    assert r.cf is w.cf
    await w.pwrite(2, b"ab")
    assert await r.pread(0, 10) == b"01ab456789"  # the reader sees the unsaved write
    await w.flush()
    assert get(storage, bucket, "shared") == b"01ab456789"
    await w.close()
    await r.close()
    assert fs.files.files == {}


# -- key-sync checker ------------------------------------------------------------------------


@trio_test
async def test_confirm_key(make_fs, storage, bucket):
    etag = put(storage, bucket, "k", b"value")
    fs = make_fs(key_sync_timeout=0.5)
    assert await fs.confirm_key("k", etag) is True

    t0 = time.monotonic()
    assert await fs.confirm_key("k", "0" * 32) is False
    assert time.monotonic() - t0 < 3
    t0 = time.monotonic()
    assert await fs.confirm_key("missing", etag) is False
    assert time.monotonic() - t0 < 3

    unchecked = make_fs(key_sync_timeout=None)
    before = requests(storage)
    assert await unchecked.confirm_key("k", "0" * 32) is True
    assert since(storage, before) == {}
    # Without the check a write costs no HEAD.
    before = requests(storage)
    await write_file(unchecked, "w", b"w")
    assert "HeadObject" not in since(storage, before)

    # With it, a write is confirmed by reading the key back.
    before = requests(storage)
    await write_file(fs, "w2", b"w")
    assert since(storage, before).get("HeadObject", 0) >= 1


# -- URLs and metadata ------------------------------------------------------------------------


@trio_test
async def test_getpathurl_and_metadata(make_fs, storage, bucket):
    fs = make_fs()
    data = os.urandom(1000)
    await fs.makedir("dir")
    await write_file(fs, "dir/pub.bin", data)
    url = await fs.getpathurl("dir/pub.bin")
    assert url.startswith("http")
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.read() == data

    posix = await fs.getmeta("dir/pub.bin")  # what the file system itself stores
    assert set(posix) == {"mode", "mtime", "ctime"}
    await fs.setmeta("dir/pub.bin", {"color": "blue", "owner": "me"})
    assert await fs.getmeta("dir/pub.bin") == {**posix, "color": "blue", "owner": "me"}
    await fs.setmeta("dir/pub.bin", {"color": "red"})  # merged into what was there
    assert await fs.getmeta("dir/pub.bin") == {**posix, "color": "red", "owner": "me"}
    head = storage.client.head_object(Bucket=bucket, Key="dir/pub.bin")
    assert head["Metadata"] == {**posix, "color": "red", "owner": "me"}
    assert get(storage, bucket, "dir/pub.bin") == data  # the data is untouched
    assert (await fs.getinfo("dir/pub.bin")).etag == head["ETag"].strip('"')
    with pytest.raises(ResourceNotFound):
        await fs.getmeta("nothing")
    with pytest.raises(ResourceNotFound):
        await fs.setmeta("nothing", {"a": "b"})
    assert all_keys(storage, bucket) == {"dir/", "dir/pub.bin"}


@trio_test
async def test_makepublic(make_fs, storage, bucket):
    fs = make_fs()
    await write_file(fs, "p.txt", b"for everyone")
    plain_url = f"{storage.client.meta.endpoint_url}/{bucket}/p.txt"
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(plain_url, timeout=10)
    assert denied.value.code == 403
    denied.value.close()
    await fs.makepublic("p.txt")
    with urllib.request.urlopen(plain_url, timeout=10) as r:
        assert r.read() == b"for everyone"
    with pytest.raises(ResourceNotFound):
        await fs.makepublic("nothing")


# -- errors -----------------------------------------------------------------------------------


@trio_test
async def test_errors(make_fs, storage, bucket):
    fs = make_fs()
    put(storage, bucket, "file", b"data")
    await fs.makedir("dir")

    for call in (
        fs.getinfo("missing"),
        fs.open("missing", "rb"),
        fs.open("missing", "r+b"),
        fs.remove("missing"),
        fs.removedir("missing"),
        fs.listinfo("missing"),
        fs.rename("missing", "x"),
        fs.open("nodir/new", "wb"),
        fs.truncate("missing", 3),
        fs.set_attrs("missing", mode=0o600),
    ):
        with pytest.raises(ResourceNotFound) as exc:
            await call
        assert exc.value.errno == errno.ENOENT
    assert not await fs.exists("missing")
    assert not await fs.isdir("missing")
    assert not await fs.isfile("missing")

    with pytest.raises(IsADirectory) as isdir:
        await fs.open("dir", "rb")
    assert isdir.value.errno == errno.EISDIR
    with pytest.raises(IsADirectory):
        await fs.remove("dir")
    with pytest.raises(NotADirectory) as notdir:
        await fs.removedir("file")
    assert notdir.value.errno == errno.ENOTDIR
    with pytest.raises(NotADirectory):
        await fs.listdir("file")
    with pytest.raises(NotADirectory):
        await fs.open("file/child", "wb")

    long_name = "n" * 256
    for call in (fs.getinfo(long_name), fs.open(long_name, "wb"), fs.makedir("dir/" + long_name)):
        with pytest.raises(NameTooLong) as toolong:
            await call
        assert toolong.value.errno == errno.ENAMETOOLONG
    # 255 bytes is fine; multi-byte characters count as bytes.
    await write_file(fs, "o" * 255, b"ok")
    assert get(storage, bucket, "o" * 255) == b"ok"
    with pytest.raises(NameTooLong):
        await fs.getinfo("é" * 128)  # 256 bytes

    # Nothing was created by the failed calls.
    assert all_keys(storage, bucket) == {"file", "dir/", "o" * 255}


@trio_test
async def test_read_only(make_fs, storage, bucket):
    put(storage, bucket, "file", b"data")
    put(storage, bucket, "dir/inner", b"i")
    fs = make_fs(read_only=True)
    assert await read_file(fs, "file") == b"data"
    assert await fs.listdir("/") == ["dir", "file"]

    for call in (
        fs.open("file", "wb"),
        fs.open("file", "r+b"),
        fs.open("file", "ab"),
        fs.open("new", "xb"),
        fs.makedir("newdir"),
        fs.remove("file"),
        fs.removedir("dir", recursive=True),
        fs.rename("file", "file2"),
        fs.move("file", "file2"),
        fs.copy("file", "file2"),
        fs.truncate("file", 0),
        fs.setmeta("file", {"a": "b"}),
        fs.set_attrs("file", mode=0o644),
        fs.makepublic("file"),
    ):
        with pytest.raises(ReadOnly) as exc:
            await call
        assert exc.value.errno == errno.EROFS
    assert all_keys(storage, bucket) == {"file", "dir/inner"}
    assert get(storage, bucket, "file") == b"data"


# -- the write-back temp files ----------------------------------------------------------------


@trio_test
async def test_temp_files_are_private_and_removed_on_close(make_fs, storage, bucket, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    os.chmod(cache, 0o755)  # a pre-existing, too open directory is tightened
    fs = make_fs()
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700

    opened = cache / "open"  # temp files of open files live here
    assert stat.S_IMODE(os.stat(opened).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cache / "metadata.sqlite").st_mode) == 0o600

    f = await fs.open("secret.txt", "wb")
    await f.write(b"top secret")
    temp_files = os.listdir(opened)
    assert len(temp_files) == 1
    temp = opened / temp_files[0]
    assert temp == Path(f.cf.path)
    assert stat.S_IMODE(os.stat(temp).st_mode) == 0o600
    assert temp.read_bytes() == b"top secret"
    await f.close()
    assert not temp.exists()
    assert os.listdir(opened) == []

    # Reading a remote object also goes through a private temp file, removed on close.
    put(storage, bucket, "remote", os.urandom(MiB + 1))
    fs.invalidate()
    r = await fs.open("remote", "rb")
    await r.read(10)
    (name,) = os.listdir(opened)
    assert stat.S_IMODE(os.stat(opened / name).st_mode) == 0o600
    await r.close()
    assert os.listdir(opened) == []


@trio_test
async def test_opens_racing_on_one_key_share_its_local_file(
    make_fs: Callable[..., S3FS], storage: Storage, bucket: str
) -> None:
    # Both opens wait for the directory's first LIST; the second must not replace the first's
    # local file, or the writes through one handle would be invisible to the other.
    put(storage, bucket, "d/f", b"old")
    put(storage, bucket, "d/g", b"old")
    fs = make_fs()
    handles: dict[str, list] = {"f": [], "g": []}

    async def open_one(name: str, mode: str) -> None:
        handles[name].append(await fs.open(f"/d/{name}", mode))

    async with trio.open_nursery() as nursery:
        for name in ("f", "g"):
            nursery.start_soon(open_one, name, "r+b")
            nursery.start_soon(open_one, name, "r+b")
    try:
        for a, b in handles.values():
            assert a.cf is b.cf
            await a.write(b"new")
            assert await b.pread(0, 3) == b"new"
    finally:
        for hs in handles.values():
            for h in hs:
                await h.close()
    await fs.close()
    assert get(storage, bucket, "d/f") == get(storage, bucket, "d/g") == b"new"


@trio_test
async def test_unsaved_append_is_kept_whole_though_its_head_was_never_fetched(
    make_fs, storage, bucket, monkeypatch
):
    """The upload of an append copies the unchanged head in S3, so the head is not local.
    If that upload fails, the copy kept in unsaved/ must still hold the whole file."""
    fs = make_fs()
    head = os.urandom(6 * MiB + 7)
    put(storage, bucket, "big.log", head)

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise Unreachable("S3 went away (test)")

    monkeypatch.setattr(storage, "write_keeping_head", unreachable)
    f = await fs.open("big.log", "ab")
    await f.write(b"the tail\n")
    with pytest.raises(FSError):
        await f.close()
    kept = list(Path(fs.recovery_dir).rglob("big.log.*"))
    assert len(kept) == 1 and kept[0].read_bytes() == head + b"the tail\n"
    assert get(storage, bucket, "big.log") == head


@trio_test
async def test_a_store_without_part_copy_gets_whole_uploads(make_fs, storage, bucket, monkeypatch):
    fs = make_fs()
    head = os.urandom(6 * MiB + 7)
    put(storage, bucket, "big.log", head)
    refused = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        refused.append(1)
        raise StorageError("NotImplemented (test)", code="NotImplemented")

    monkeypatch.setattr(storage, "write_keeping_head", refuse)
    want = head
    for i in range(2):
        f = await fs.open("big.log", "ab")
        await f.write(b"line %d\n" % i)
        await f.close()
        want += b"line %d\n" % i
        assert get(storage, bucket, "big.log") == want
    assert refused == [1]  # tried once, then whole uploads only


@trio_test
async def test_a_version_journaled_during_an_upload_builds_on_it(
    make_fs, storage, bucket, tmp_path
):
    """Write-back: a version journaled while the one before it uploads is rebased on that
    upload's ETag, keeping the head both share, in the journal too (a restart must neither
    take it for a conflict nor copy a head the new object does not have)."""
    fs = make_fs(write_back=3600)
    head = os.urandom(6 * MiB + 7)
    put(storage, bucket, "big.log", head)
    for line in (b"one\n", b"two\n"):
        f = await fs.open("big.log", "ab")
        await f.write(line)
        await f.close()
        if line == b"one\n":
            first = fs.writeback.pending_for("big.log")
            assert first is not None and first.head == len(head)
            fs.writeback._uploading["big.log"] = first.id  # in flight: not superseded
    second = fs.writeback.pending_for("big.log")
    assert second is not None and second.id != first.id and second.head == len(head)

    before = requests(storage)
    await fs.upload_record(first)
    assert get(storage, bucket, "big.log") == head + b"one\n"
    etag = storage.head(fs.s3name("big.log")).etag
    on_disk = {r.id: r for r in Journal(str(tmp_path / "cache")).records()}
    for r in (second, on_disk[second.id]):
        assert (r.base_etag, r.head) == (etag, len(head))
    await fs.upload_record(second)
    assert get(storage, bucket, "big.log") == head + b"one\ntwo\n"
    assert since(storage, before).get("UploadPartCopy") == 2
    await fs.close(drain=False)  # no scheduler runs here to forget the records
