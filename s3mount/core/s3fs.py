"""The core S3FS layer: path semantics over the keys of one bucket (and optional prefix).

The seed's path API (``exists``, ``isdir``, ``listdir``, ``makedir``, ``remove``, ``rename``,
``open``, ...) as trio coroutines, with three caches: the write-back temp-file cache
(:mod:`.filecache`), the directory listing cache (:mod:`.listing`) and the key-sync checker
(:meth:`S3FS.confirm_key`).  No FUSE here: the operations layer maps inodes onto these paths.

Concurrency: all state lives in the trio thread and changes only between awaits; blocking
storage calls run in worker threads through a :class:`ThreadRunner` (write-back uploads
through a second one of the same size).
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import os
import posixpath
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

import trio

from s3mount.core.deletes import DeleteQueue
from s3mount.core.errors import (
    DirectoryNotEmpty,
    FSError,
    InvalidPath,
    IsADirectory,
    NameTooLong,
    NoAttribute,
    NoSpace,
    NotADirectory,
    ReadOnly,
    ResourceExists,
    ResourceNotFound,
    Stale,
    Unsupported,
    UploadFailed,
    first_leaf,
)
from s3mount.core.filecache import BLOCK, MAX_READAHEAD, CachedFile, FileCache
from s3mount.core.journal import Journal, Record
from s3mount.core.keys import KeySpace
from s3mount.core.lister import Lister
from s3mount.core.listing import Entry, ListingCache
from s3mount.core.metadata import (
    CTIME,
    MAX_METADATA,
    MTIME,
    MetaCache,
    ObjectMeta,
    headers_size,
    with_posix,
)
from s3mount.core.resolver import MetadataResolver
from s3mount.core.runner import ThreadRunner
from s3mount.core.streaming import PartStream, Uploader
from s3mount.core.writeback import WriteBack
from s3mount.storage import (
    NotFound,
    ObjectInfo,
    Part,
    PreconditionFailed,
    S3Facts,
    S3Key,
    S3Name,
    Storage,
    StorageError,
    Unreachable,
    WriteOptions,
)

log = logging.getLogger(__name__)

DIR_CONTENT_TYPE = "application/x-directory"
SEQUENTIAL_SLACK = 2 * BLOCK


@dataclass(frozen=True)
class Info:
    """What the file system knows about a path."""

    path: str
    is_dir: bool
    size: int = 0
    mtime: float = 0.0
    etag: str | None = None
    mode: int | None = None  # permission bits from the object's metadata (None: not set)
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int = 0  # exact; mtime is the same in seconds
    ctime_ns: int | None = None
    is_symlink: bool = False
    meta: ObjectMeta = field(default_factory=ObjectMeta)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @classmethod
    def of(
        cls,
        path: str,
        is_dir: bool,
        size: int,
        modified: float,
        etag: str | None,
        meta: ObjectMeta,
        mtime_ns: int | None = None,
    ) -> Info:
        """Attributes from an object's metadata, where it has them, else from S3's own."""
        mode = meta.mode
        if mtime_ns is None:
            mtime_ns = meta.mtime_ns
        if mtime_ns is None:
            mtime_ns = round(modified * 1e9)
        return cls(
            path=path,
            is_dir=is_dir,
            size=0 if is_dir else size,
            mtime=mtime_ns / 1e9,
            etag=etag,
            mode=stat.S_IMODE(mode) if mode is not None else None,
            uid=meta.uid,
            gid=meta.gid,
            mtime_ns=mtime_ns,
            ctime_ns=meta.ctime_ns,
            is_symlink=not is_dir and meta.is_symlink,
            meta=meta,
        )


KEY_SYNC_PROOF = 8  # uploads read back at the first try, after which key-sync checks stop


class S3FS(KeySpace):
    """A file system over ``bucket`` (under ``prefix``), stored through ``storage``."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        storage: Storage | None = None,
        separator: str = "/",
        key_sync_timeout: float | None = 1,
        *,
        cache_dir: str,
        listing_ttl: float = 60.0,
        threads: int = 16,
        read_only: bool = False,
        write_back: float | None = None,
        io_timeout: float | None = 60.0,
        metadata: str = "auto",
        keep_bytes: int = 0,
    ):
        super().__init__(bucket, prefix, separator)
        self.storage = storage or Storage(default_bucket=bucket)
        self.key_sync_timeout = key_sync_timeout
        self.read_only = read_only
        self.run = ThreadRunner(threads, read_deadline=io_timeout)
        self.listings = ListingCache(listing_ttl)
        _makedirs_private(cache_dir)
        os.chmod(cache_dir, 0o700)  # temp files, unsaved data and metadata are private
        # keep_bytes: disk space for closed files' clean data, so re-opening costs no GET.
        self.files = FileCache(os.path.join(cache_dir, "open"), keep_bytes)
        # Cache hits and misses, for status and metrics: listing_*, meta_*, block_* (data),
        # kept_* (closed files' data reopened).
        self.stats = self.files.stats
        self.started = time.time()
        self._read_after_write = 0  # uploads that read back at once (-1: not always)
        self._copy_heads = True  # False once the store refused an UploadPartCopy
        self._link_targets: dict[str, tuple[str | None, str]] = {}  # key -> (ETag, target)
        self.meta_cache = MetaCache(os.path.join(cache_dir, "metadata.sqlite"))
        self.resolver = MetadataResolver(
            self, self.storage, self.run, self.listings, self.meta_cache, self.stats, metadata
        )
        self._kernel_etags: dict[str, str] = {}  # ETag whose data a reader last saw, by key
        self.recovery_dir = os.path.join(cache_dir, "unsaved")
        # Write-back mode (write_back = the delay before an upload starts): close() journals,
        # uploads run later.  The scheduler also finishes what an earlier mount journaled.
        self.write_back = write_back
        self.journal = Journal(cache_dir)
        unverified = self.journal.take_unverified()  # closed, not fsync'd, then a reboot
        # Write-back uploads have threads of their own, as many as the programs' requests:
        # a burst of closes keeps that many PUTs in flight (8 instead of 16 made the bench's
        # untar 15% slower), and reads and lookups never queue behind them.
        self.upload_run = ThreadRunner(threads)
        self.writeback = WriteBack(self.journal, write_back or 0.0, workers=threads)
        self.recovered: list[str] = []  # data of files being written when a daemon died
        self._renaming: dict[str, trio.Event] = {}  # keys a rename is replacing right now
        self._unsent_markers: set[str] = set()  # made by mkdir, journaled, not sent yet
        self.deletes = DeleteQueue(self._delete_keys, self._deletes_failed)
        self.lister = Lister(
            self, self.storage, self.run, self.listings, self.deletes, self.resolver,
            self.meta_cache, self.stats,
        )  # fmt: skip
        self.background = None
        self._recover_leftovers(unverified)

    @property
    def background(self) -> trio.Nursery | None:
        """The daemon's nursery: readahead, streamed parts, walks and big listings run in
        it (None: no background work, everything waits)."""
        return self._background

    @background.setter
    def background(self, nursery: trio.Nursery | None) -> None:
        self._background = self.lister.background = nursery

    # -- listing ----------------------------------------------------------------------------

    def _local_entries(self, dkey: str) -> Iterator[Entry]:
        """Files open in this directory, and journaled files and directories: not in S3 yet,
        maybe."""
        for record in list(self.writeback.records.values()):
            key = record.key
            if not key.startswith(dkey) or key == dkey:
                continue
            name, _, below = key[len(dkey) :].partition(self.sep)
            if not below:  # "dkey/name", or "dkey/name/": a directory's marker
                newest = self.writeback.pending_for(key)
                if newest is record and key not in self.files.files:
                    yield self._record_entry(name, record)
        for key, cf in self.files.files.items():
            if key.startswith(dkey) and self.sep not in key[len(dkey) :] and key != dkey:
                yield Entry(
                    name=key[len(dkey) :],
                    is_dir=False,
                    size=cf.size,
                    mtime=self._cf_mtime(cf),
                    etag=cf.etag,
                    meta=cf.meta,
                )

    async def _entries(self, path: str, readdir: bool = False) -> dict[str, Entry]:
        listing = await self.lister.listing(path, readdir)
        local = list(self._local_entries(self.dir_key(path)))
        if not local:
            return listing.entries
        merged = dict(listing.entries)
        for e in local:
            merged[e.name] = e
        return merged

    def _info(self, path: str, entry: Entry) -> Info:
        return Info.of(
            path,
            entry.is_dir,
            entry.size,
            entry.mtime or self.started,
            entry.etag,
            entry.meta or ObjectMeta(),
        )

    def _record_entry(self, name: str, record: Record) -> Entry:
        meta = ObjectMeta(record.headers, record.content_type)
        mtime = (meta.mtime_ns or int(record.created * 1e9)) / 1e9
        if self._is_marker(record.key):
            return Entry(name, True, mtime=mtime, meta=meta)
        return Entry(name, False, record.size, mtime, record.base_etag, meta)

    def _is_marker(self, key: str) -> bool:
        """Whether a key is a directory's marker (``dir_key``) rather than a file's."""
        return key.endswith(self.sep)

    def _pending_for_path(self, key: str) -> Record | None:
        """The newest journaled version of a path's object: its file, or its directory's
        marker (made by mkdir in write-back mode)."""
        return self.writeback.pending_for(key) or self.writeback.pending_for(key + self.sep)

    def _cf_mtime(self, cf: CachedFile) -> float:
        return cf.mtime_ns / 1e9 if cf.mtime_ns is not None else self.started

    def _cf_info(self, path: str, cf: CachedFile) -> Info:
        """Attributes of an open file, from its local state."""
        return Info.of(
            path, False, cf.size, self._cf_mtime(cf), cf.etag, cf.meta, mtime_ns=cf.mtime_ns
        )

    # -- queries ----------------------------------------------------------------------------

    async def getinfo(self, path: str, *, meta: bool = True) -> Info:
        """Attributes of a path; with ``meta`` (the default) including its POSIX metadata."""
        path = self.norm(path)
        if path == "/":
            return self._info(path, Entry(name="", is_dir=True, mtime=self.started))
        key = self.key(path)
        cf = self.files.files.get(key)
        if cf is not None:
            return self._cf_info(path, cf)
        record = self._pending_for_path(key)
        if record is not None:
            return self._info(path, self._record_entry(posixpath.basename(path), record))
        parent, name = self.split(path)
        # Neither open nor journaled, so the listing alone knows it (merging the directory's
        # local entries here would cost O(pending uploads) per lookup).
        listing = await self.lister.listing_or_big(parent, big_ok=True)
        entry = listing.entries.get(name) if listing is not None else await self.lister.probe(path)
        if entry is None:
            raise ResourceNotFound(path)
        if meta:
            await self.resolver.verify(parent, [entry])
        return self._info(path, entry)

    async def exists(self, path: str) -> bool:
        try:
            await self.getinfo(path, meta=False)
        except ResourceNotFound:
            return False
        return True

    async def isdir(self, path: str) -> bool:
        try:
            return (await self.getinfo(path, meta=False)).is_dir
        except ResourceNotFound:
            return False

    async def isfile(self, path: str) -> bool:
        try:
            return not (await self.getinfo(path, meta=False)).is_dir
        except ResourceNotFound:
            return False

    async def listinfo(self, path: str = "/", *, meta: bool = True) -> list[Info]:
        """Every entry of a directory with its attributes: one (cached) listing, plus, for
        entries whose metadata is not cached yet, HEADs in parallel."""
        path = self.norm(path)
        if not (await self.getinfo(path, meta=False)).is_dir:
            raise NotADirectory(path)
        entries = await self._entries(path, readdir=True)
        if meta:
            await self.resolver.verify(path, list(entries.values()), missing_ok=True)
            entries = {n: e for n, e in entries.items() if e.meta is not None}
        return [self._info(posixpath.join(path, n), e) for n, e in sorted(entries.items())]

    async def listdir(
        self,
        path: str = "./",
        wildcard: str | None = None,
        full: bool = False,
        absolute: bool = False,
        dirs_only: bool = False,
        files_only: bool = False,
    ) -> list[str]:
        """Names in a directory, as the seed's ``listdir`` (wildcard, full, absolute, ...)."""
        if dirs_only and files_only:
            raise ValueError("dirs_only and files_only can not both be True")
        out = []
        base = self.norm(path)
        for info in await self.listinfo(base):
            if (dirs_only and not info.is_dir) or (files_only and info.is_dir):
                continue
            if wildcard is not None and not fnmatch.fnmatch(info.name, wildcard):
                continue
            if absolute:
                out.append(info.path)
            elif full:
                out.append(posixpath.join(path.strip("/"), info.name) if base != "/" else info.name)
            else:
                out.append(info.name)
        return out

    async def ilistdir(self, *args: object, **kwargs: object) -> Iterator[str]:
        return iter(await self.listdir(*args, **kwargs))  # type: ignore[arg-type]

    # -- directories ------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnly("read-only mount")

    async def makedir(
        self,
        path: str,
        recursive: bool = False,
        allow_recreate: bool = False,
        *,
        mode: int = 0o755,
        uid: int | None = None,
        gid: int | None = None,
    ) -> Info:
        self._check_writable()
        path = self.norm(path)
        try:
            info = await self.getinfo(path)
        except ResourceNotFound:
            pass
        else:
            if info.is_dir and (allow_recreate or path == "/"):
                return info
            raise ResourceExists(path)
        parent, name = self.split(path)
        try:
            pinfo = await self.getinfo(parent)
        except ResourceNotFound:
            if not recursive:
                raise ResourceNotFound(f"{parent}: parent directory does not exist") from None
            await self.makedir(parent, recursive=True, allow_recreate=True, uid=uid, gid=gid)
        else:
            if not pinfo.is_dir:
                raise NotADirectory(parent)
        dkey = self.dir_key(path)
        now = time.time_ns()
        headers = with_posix(
            {}, mode=stat.S_IFDIR | stat.S_IMODE(mode), uid=uid, gid=gid, mtime_ns=now, ctime_ns=now
        )
        entry = await self._store_marker(dkey, name, headers)
        if self.write_back is not None:
            self._unsent_markers.add(dkey)
        self.listings.set_entry(self.dir_key(parent), entry)
        self.listings.put(dkey, {})  # a new directory is empty: no LIST needed
        return self._info(path, entry)

    async def _store_marker(self, dkey: str, name: str, headers: dict[str, str]) -> Entry:
        """A directory's marker with new ``headers``, and the directory's entry: written now,
        or in write-back mode journaled like a closed file (so mkdir, chmod and utimens do
        not wait for S3, and those before the upload only change the journal row)."""
        if self.write_back is not None:
            return self._record_entry(name, self._journal_bytes(dkey, b"", headers,
                                                                DIR_CONTENT_TYPE))  # fmt: skip
        meta = await self._put_marker(dkey, headers)
        return Entry(name, True, mtime=(meta.mtime_ns or time.time_ns()) / 1e9, meta=meta)

    async def _put_marker(self, dkey: str, headers: dict[str, str]) -> ObjectMeta:
        """Write a directory's marker object carrying its metadata."""
        meta = ObjectMeta(headers, DIR_CONTENT_TYPE)
        await self.deletes.settle(dkey)
        await self.run(
            self.storage.write_stream,
            io.BytesIO(b""),
            self.s3name(dkey),
            WriteOptions(content_type=DIR_CONTENT_TYPE, metadata=headers),
        )
        self.meta_cache.put(dkey, None, None, meta)
        return meta

    async def removedir(self, path: str, recursive: bool = False, force: bool = False) -> None:
        """Remove a directory (its marker); with ``recursive`` or ``force``, all below it."""
        self._check_writable()
        path = self.norm(path)
        if path == "/":
            raise InvalidPath("cannot remove the root directory")
        info = await self.getinfo(path)
        if not info.is_dir:
            raise NotADirectory(path)
        dkey = self.dir_key(path)
        self.listings.invalidate(dkey)  # emptiness must be checked against the server
        entries = await self._entries(path)
        listing = await self.lister.listing(path)
        hidden = listing.hidden  # keys that cannot be shown as names
        if (entries or hidden) and not (recursive or force):
            raise DirectoryNotEmpty(path)
        if entries or hidden:
            self.writeback.discard(dkey, prefix=True)
            self._unsent_markers -= {k for k in self._unsent_markers if k.startswith(dkey)}
            await self.writeback.settle(dkey, prefix=True)  # uploads in flight land first
            for key in [k for k in self.files.files if k.startswith(dkey)]:
                self._forget_file(key)
            await self.deletes.flush(dkey)
            keys = await self.run(
                lambda: [k.key for k in self.storage.bucket_list_keys(self.bucket, prefix=dkey)]
            )
            await self.run(self.storage.delete_many, keys, self.bucket)
        else:
            # S3 has no marker to delete if mkdir journaled it and no upload was tried (a
            # failed one may have landed), or if the listing just fetched showed none and
            # nothing here was writing one (rm -rf of a tree a plain client uploaded: one
            # request less per directory).
            journaled = self.writeback.pending_for(dkey)
            unsent = journaled is not None and not journaled.attempts
            unsent = unsent and dkey in self._unsent_markers
            self._unsent_markers.discard(dkey)
            busy = self.writeback.busy(dkey)
            listed_none = listing.own_marker is False and journaled is None and not busy
            self.writeback.discard(dkey)
            if busy:
                await self.writeback.settle(dkey)  # the upload in flight lands first
            if (busy or not unsent) and not listed_none:
                await self.deletes.flush(dkey)  # a marker goes after what was below it
                await self.run(self.storage.delete, self.s3name(dkey))
        parent, name = self.split(path)
        self.listings.remove_entry(self.dir_key(parent), name)
        self.listings.invalidate_tree(dkey)
        self.meta_cache.delete_tree(dkey)

    # -- files ------------------------------------------------------------------------------

    async def remove(self, path: str) -> None:
        self._check_writable()
        path = self.norm(path)
        info = await self.getinfo(path)
        if info.is_dir:
            raise IsADirectory(path)
        key = self.key(path)
        cf = self.files.files.get(key)
        remote = info.etag is not None
        if self.writeback.pending_for(key) is not None:
            self.writeback.discard(key)
            remote = True  # an earlier version may have reached S3 meanwhile
        if cf is not None:
            remote = await self._detach_open_file(cf) or remote
        if remote:
            if self.writeback.busy(key):  # an upload in flight lands before the delete
                await self.writeback.settle(key)
            await self.deletes.add(key)
        self.files.forget(key)
        parent, name = self.split(path)
        self.listings.remove_entry(self.dir_key(parent), name)
        self.meta_cache.delete(key)

    async def _delete_keys(self, keys: list[str]) -> None:
        if len(keys) == 1:
            await self.run(self.storage.delete, self.s3name(keys[0]))
        else:
            await self.run(self.storage.delete_many, keys, self.bucket)

    def _deletes_failed(self, keys: list[str]) -> None:
        """Deletes S3 refused: the objects stay, so their directories must show them again."""
        for key in keys:
            self.listings.invalidate(self.dir_key_of(key)[0])
            self.meta_cache.delete(key)

    async def _detach_open_file(self, cf: CachedFile) -> bool:
        """The object of an open file is about to go (unlink, or a rename over it): its
        handles keep working on a local copy.  Returns whether the object exists in S3."""
        async with cf.upload_lock:  # an upload in flight finishes first
            remote = cf.etag is not None
            if cf.open_count and remote:
                await cf.ensure(0, cf.size)  # what readers have not fetched yet
            self._forget_file(cf.key)
        return remote

    def _forget_file(self, key: str) -> None:
        """Detach an open file from its key: its handles go on working, nothing is uploaded."""
        cf = self.files.files.pop(key, None)
        if cf is not None:
            self._untrack(cf)
            cf.unlinked = True
            if cf.stream is not None:
                cf.stream.broken = True  # the last close aborts it
            if cf.open_count == 0:
                cf.close()

    async def open(self, path: str, mode: str = "r") -> OpenFile:
        """Open like the built-in ``open`` (binary; 'r', 'r+', 'w', 'w+', 'a', 'a+', 'x')."""
        m = mode.replace("b", "").replace("t", "")
        write = any(c in m for c in "wax+")
        handle = await self.open_file(
            path,
            write=write,
            create=any(c in m for c in "wax"),
            exclusive="x" in m,
            truncate="w" in m,
        )
        handle.append = "a" in m
        return handle

    async def open_file(
        self,
        path: str,
        *,
        write: bool = False,
        create: bool = False,
        exclusive: bool = False,
        truncate: bool = False,
        mode: int = 0o644,
        uid: int | None = None,
        gid: int | None = None,
    ) -> OpenFile:
        """Open (and maybe create or truncate) a file; nothing is downloaded here.

        ``mode``, ``uid`` and ``gid`` are the new file's, when this creates it.
        """
        if write or create or truncate:
            self._check_writable()
        path = self.norm(path)
        key = self.key(path)
        while key in self._renaming:  # opened mid-rename, it would read a vanishing version
            await self._renaming[key].wait()
        cf = self.files.files.get(key)
        if cf is not None and exclusive:
            raise ResourceExists(path)
        record = self.writeback.pending_for(key) if cf is None else None
        if record is not None:  # journaled, maybe not uploaded yet: open the journal's data
            cf = self.files.from_data(key, record, self._fetcher(key))
            cf.meta = ObjectMeta(record.headers, record.content_type)
            cf.mtime_ns = cf.meta.mtime_ns
            self.files.files[key] = cf
        if cf is None:
            info: Info | None = None
            try:
                info = await self.getinfo(path)
            except ResourceNotFound:
                if not create:
                    raise
                parent, _name = self.split(path)
                if not (await self.getinfo(parent)).is_dir:
                    raise NotADirectory(parent) from None
            else:
                if info.is_dir:
                    raise IsADirectory(path)
                if exclusive:
                    raise ResourceExists(path)
                if info.is_symlink:
                    raise InvalidPath(f"{path}: a symbolic link")
            cf = self.files.files.get(key)  # another open of the key, done during the awaits
            if cf is not None and exclusive:
                raise ResourceExists(path)
            if cf is None:
                cf = self._new_local_file(key, info, mode, uid, gid)
                self.files.files[key] = cf
        if truncate and cf.size:
            await cf.truncate(0)
            cf.mtime_ns = time.time_ns()
            self._track(cf)
        cf.open_count += 1
        keep = cf.etag is not None and self._kernel_etags.get(key) == cf.etag
        return OpenFile(self, cf, path, writable=write, keep_cache=keep)

    def _new_local_file(
        self, key: str, info: Info | None, mode: int, uid: int | None, gid: int | None
    ) -> CachedFile:
        """The local state of an object being opened (``info``: None when it is created)."""
        if info is None:
            cf = self.files.new(key, 0, None, self._fetcher(key))
            cf.mtime_ns = time.time_ns()
            cf.meta = ObjectMeta(
                with_posix({}, mode=stat.S_IFREG | stat.S_IMODE(mode), uid=uid, gid=gid)
            )
            cf.dirty = True  # a new file is uploaded on close, even when empty
            self._track(cf)
            return cf
        cf = self.files.reopen(key, info.size, info.etag) or self.files.new(
            key, info.size, info.etag, self._fetcher(key)
        )
        cf.mtime_ns = info.mtime_ns
        cf.meta = info.meta
        return cf

    def _fetcher(self, key: str):  # noqa: ANN202
        name = self.s3name(key)

        async def fetch(start: int, length: int, etag: str | None) -> bytes:
            try:
                return await self.run.read(self.storage.read_range, name, start, length, etag)
            except PreconditionFailed:
                raise Stale(f"{key}: changed on the server while open") from None

        return fetch

    async def flush_file(self, cf: CachedFile, durable: bool = False) -> None:
        """Save a dirty file: upload it now, or in write-back mode journal it for a later
        upload (``durable``, for fsync: so that it survives a power loss too).  On failure it
        stays dirty (and in the local cache)."""
        async with cf.upload_lock:
            if self.write_back is not None:
                await self._journal_locked(cf, durable)
                if durable:
                    records = self.writeback.records_of(cf.key)
                    await trio.to_thread.run_sync(self.journal.make_durable, records)
                return
            uploaded = await self._upload_locked(cf)
        if uploaded is not None:
            await self.confirm_key(*uploaded)

    def _headers_for_upload(self, cf: CachedFile) -> ObjectMeta:
        now = time.time_ns()
        headers = with_posix(cf.meta.headers, mtime_ns=cf.mtime_ns or now, ctime_ns=now)
        return ObjectMeta(headers, cf.meta.content_type)

    async def _journal_locked(self, cf: CachedFile, durable: bool) -> None:
        """Write-back mode: journal the file (``durable``: fsync'd first); upload later."""
        if not cf.dirty or cf.unlinked:
            return
        await cf.ensure(0, cf.size)
        generation = cf.generation
        meta = self._headers_for_upload(cf)
        if durable:
            await trio.to_thread.run_sync(os.fsync, cf.fd)  # the slow part, off the event loop
        record = self.journal.add(
            cf.key, cf.fd, cf.path, cf.size, meta.headers, meta.content_type, cf.etag,
            head=cf.same_below if cf.etag else 0, durable=durable,
        )  # fmt: skip
        cf.journaled(generation)
        cf.meta = meta
        if not cf.dirty:
            self._untrack(cf)
        self.writeback.add(record)
        self._update_listing(cf.key, cf)

    async def upload_record(self, record: Record) -> None:
        """Upload one journaled version (called by the write-back scheduler)."""
        key = record.key  # (the scheduler renames a record unlinked while it uploads)
        if not os.path.exists(record.data):
            # Cannot happen unless someone deleted it from the cache directory by hand.
            log.error("journaled data of %s is missing (%s); dropping it", key, record.data)
            return
        if record.base_etag is not None and await self._changed_remotely(key, record.base_etag):
            self._keep_conflict(key, record.data)
            return
        options = WriteOptions(content_type=record.content_type or None, metadata=record.headers)
        await self.deletes.settle(key)
        name, info = self.s3name(key), None
        if record.base_etag and self._may_copy_head(record.head, record.size):
            info = await self._write_keeping_head(
                record.data, name, record.base_etag, record.head, options, self.upload_run
            )
        if info is None:
            info = await self.upload_run(self.storage.write, record.data, name, options)
        if record.key != key:
            return  # unlinked meanwhile: the caller deletes the object
        meta = ObjectMeta(record.headers, info.content_type)
        if self._is_marker(key):
            self._marker_uploaded(key, record, meta)
            return
        self.meta_cache.put(key, info.etag, None, meta)
        # What was the same as the old version below record.head is the same as the new one.
        for later in self.writeback.records_of(key):  # they build on it now
            if later.id != record.id:
                same = later.base_etag == record.base_etag
                self.journal.rebase(later, info.etag, min(later.head, record.head) if same else 0)
        cf = self.files.files.get(key)
        if cf is not None and cf.etag == record.base_etag:
            cf.etag = info.etag
            cf.same_below = min(cf.same_below, record.head)
        self.files.uploaded(key, record.data, info.etag)
        newest = self.writeback.pending_for(key)
        if newest is None or newest.id == record.id:
            dkey, name = self.dir_key_of(key)
            mtime = (meta.mtime_ns or time.time_ns()) / 1e9
            self.listings.set_entry(dkey, Entry(name, False, record.size, mtime, info.etag, meta))
        await self.confirm_key(key, info.etag)

    def _marker_uploaded(self, dkey: str, record: Record, meta: ObjectMeta) -> None:
        """A directory's journaled marker is in S3 (as _put_marker would have left it)."""
        self.meta_cache.put(dkey, None, None, meta)
        self._unsent_markers.discard(dkey)
        if self.writeback.pending_for(dkey) in (None, record):
            parent, name = self.dir_key_of(dkey[: -len(self.sep)])
            self.listings.set_entry(parent, self._record_entry(name, record))

    async def _changed_remotely(self, key: str, base_etag: str) -> bool:
        """Whether another client replaced the object since our change was based on it."""
        found, info = await self.run.read(self.storage.exists, self.s3name(key))
        return found and info is not None and info.etag != base_etag

    def _keep_conflict(self, key: str, data_path: str) -> None:
        dest = self._unsaved_path(key, "conflict")
        _makedirs_private(os.path.dirname(dest))
        os.link(data_path, dest)
        self.recovered.append(dest)
        log.error(
            "%s was changed by another client since it was opened here; the other version "
            "stays in S3 and this one is kept in %s",
            key,
            dest,
        )

    def _unsaved_path(self, key: str, kind: str = "") -> str:
        parts = [self.bucket, *key.split("/")]
        suffix = f".{time.time_ns()}" + (f".{kind}" if kind else "")
        return os.path.join(self.recovery_dir, *parts) + suffix

    def _track(self, cf: CachedFile) -> None:
        """Tell the journal this temp file holds unsaved changes of its key."""
        if cf.tracked != cf.path:
            if cf.tracked:
                self.journal.written(cf.tracked)
            self.journal.writing(cf.path, cf.key)
            cf.tracked = cf.path

    def _untrack(self, cf: CachedFile) -> None:
        if cf.tracked:
            self.journal.written(cf.tracked)
            cf.tracked = None

    async def _upload_locked(self, cf: CachedFile) -> tuple[str, str] | None:
        """Upload ``cf`` (its upload lock held, so no rename or unlink can interleave).

        Returns (key, new ETag), or None when there was nothing to upload.
        """
        if not cf.dirty or cf.unlinked:
            return None
        # An unchanged head of at least a part is copied in S3 (appending to a big object
        # sends only the tail); then only the rest has to be local.
        copy = cf.stream is None and cf.etag and self._may_copy_head(cf.same_below, cf.size)
        keep = cf.same_below if copy else 0
        await cf.ensure(keep, cf.size)
        generation, key, base = cf.generation, cf.key, cf.etag
        meta = self._headers_for_upload(cf)
        options = WriteOptions(content_type=meta.content_type or None, metadata=meta.headers)
        try:
            if base is not None and await self._changed_remotely(key, base):
                self._keep_conflict(key, cf.path)
                cf.dirty = False  # kept in the unsaved folder; S3 keeps the other version
                self._untrack(cf)
                raise Stale(f"{key}: changed by another client since it was opened")
            await self.deletes.settle(key)
            streamed = await self._finish_stream(cf, meta) if cf.stream is not None else None
            info = None
            if streamed is not None:
                info, meta = streamed
            elif keep and base is not None:
                info = await self._write_keeping_head(cf.path, self.s3name(key), base, keep,
                                                      options)  # fmt: skip
                if info is None:
                    await cf.ensure(0, cf.size)
            if info is None:
                info = await self.run(self.storage.write, cf.path, self.s3name(key), options)
        except StorageError as exc:
            log.error("upload of %s failed, the data stays in the local cache: %s", key, exc)
            raise UploadFailed(str(exc)) from exc
        cf.uploaded(generation, info.etag, head_copied=bool(keep))
        if not cf.dirty:
            self._untrack(cf)
        cf.meta = ObjectMeta(meta.headers, info.content_type)
        self.meta_cache.put(key, info.etag, None, cf.meta)
        self._kernel_etags[key] = info.etag
        self._update_listing(key, cf)
        return key, info.etag

    def _may_copy_head(self, head: int, size: int) -> bool:
        """Whether an upload copies its unchanged ``head`` in S3 instead of sending it:
        only a head of at least a part, and not if the store refused such a copy before."""
        return self._copy_heads and S3Facts.minimum_part_size <= head < size

    async def _write_keeping_head(
        self,
        path: str,
        name: S3Name,
        base: str,
        keep: int,
        options: WriteOptions,
        run: ThreadRunner | None = None,
    ) -> ObjectInfo | None:
        """Upload local file ``path`` with its first ``keep`` bytes copied in S3 from version
        ``base``.  None: the store refused the copy (not every S3-compatible one has
        UploadPartCopy); the caller uploads the whole file, now and from then on."""
        try:
            return await (run or self.run)(self.storage.write_keeping_head, path, name, base,
                                           keep, options)  # fmt: skip
        except (PreconditionFailed, Unreachable):
            raise  # changed meanwhile, or S3 is not answering: not the copy's fault
        except StorageError as exc:
            log.warning("S3 refused to copy the unchanged head of %s (%s): uploading whole "
                        "files from now on", name.key, exc)  # fmt: skip
            self._copy_heads = False
            return None

    # -- streaming a big file to S3 while it is written (default mode) ------------------------

    def _maybe_stream(self, cf: CachedFile) -> None:
        """A write at offset 0 of a file whose whole content is local: send its full parts to
        S3 as the program goes on writing (see core/streaming.py)."""
        if (
            cf.stream is None
            and self.write_back is None
            and self.background is not None
            and cf.fetch_limit == 0
            and not cf.unlinked
        ):
            t = self.storage.transfer
            cf.stream = PartStream(
                cf.key, t.part_size_for(0), t.max_concurrency, self._uploader(cf),
                self.background.start_soon,
            )  # fmt: skip

    def _uploader(self, cf: CachedFile) -> Uploader:
        name, path = self.s3name(cf.key), cf.path

        async def start() -> tuple[str, ObjectMeta]:
            meta = self._headers_for_upload(cf)
            options = WriteOptions(content_type=meta.content_type or None, metadata=meta.headers)
            upload_id = await self.run(self.storage.multipart_start, name, options)
            return upload_id, ObjectMeta(meta.headers, options.extra_args(name.key)["ContentType"])

        async def send(upload_id: str, number: int, offset: int, length: int) -> Part:
            part = await self.run(
                self.storage.multipart_part, name, upload_id, number, path, offset, length
            )
            await cf.release_pages(offset + length)  # sent: its pages can go
            return part

        async def finish(upload_id: str, parts: list[Part]) -> str:
            return await self.run(self.storage.multipart_finish, name, upload_id, parts)

        async def abort(upload_id: str) -> None:
            await self.run(self.storage.multipart_abort, name, upload_id)

        return Uploader(start, send, finish, abort)

    async def _finish_stream(
        self, cf: CachedFile, meta: ObjectMeta
    ) -> tuple[ObjectInfo, ObjectMeta] | None:
        """Complete ``cf``'s streamed upload: (the object, the metadata it got), or None when
        the file must be uploaded whole.  The object keeps the headers the upload began with,
        mtime included (the time the writing began), unless the program changed them since
        (chmod, utimens, ...): then a copy in place stores ``meta``."""
        stream, cf.stream = cf.stream, None
        assert stream is not None
        try:
            etag = await stream.complete(cf.size)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.abort()
            raise
        if etag is None or stream.meta is None:
            return None
        began = stream.meta
        info = ObjectInfo(
            cf.key, cf.size, datetime.now().astimezone(), etag, began.content_type,
            metadata=began.headers,
        )  # fmt: skip
        ignored = (CTIME,) if cf.times_set else (CTIME, MTIME)
        if not _same_meta(meta.headers, began.headers, ignored):
            meta = ObjectMeta(meta.headers, began.content_type)
            return await self._replace_object_meta(cf.key, cf.size, meta), meta
        cf.mtime_ns = began.mtime_ns
        return info, began

    def _update_listing(self, key: str, cf: CachedFile) -> None:
        dkey, name = self.dir_key_of(key)
        entry = Entry(name, False, cf.size, self._cf_mtime(cf), cf.etag, cf.meta)
        self.listings.set_entry(dkey, entry)

    async def release_file(self, cf: CachedFile, handle_writable: bool) -> None:
        """A handle closed: upload if dirty; the last close frees the local copy."""
        cf.open_count -= 1
        try:
            if handle_writable or cf.dirty:
                await self.flush_file(cf)
        finally:
            if cf.open_count == 0:
                await self._free(cf)

    async def _free(self, cf: CachedFile) -> None:
        """The last handle is gone: keep what is unsaved, forget the local copy."""
        async with cf.upload_lock:  # after an unlink or rename still working on it
            if cf.open_count == 0 and not cf.closed:
                if cf.stream is not None:
                    stream, cf.stream = cf.stream, None
                    await stream.abort()
                clean = False
                if cf.dirty and not cf.unlinked:
                    await self._keep_unsaved(cf)
                elif not cf.unlinked and cf.awaits_upload():
                    cf.etag = None  # a journaled version: named once uploaded (upload_record)
                    clean = True
                elif not cf.unlinked and cf.etag:
                    self._kernel_etags[cf.key] = cf.etag
                    clean = True
                if self.files.files.get(cf.key) is cf:
                    del self.files.files[cf.key]
                self._untrack(cf)
                if not (clean and self.files.keep(cf)):
                    cf.close()

    async def _keep_unsaved(self, cf: CachedFile) -> None:
        """Keep data that could not be uploaded, under the cache dir, named by its key.
        First, best effort (S3 may be what failed), fetch what of it is still only in S3 (an
        upload that copied the unchanged head in S3 did not need it local), so that the kept
        copy is whole; the copy is made whatever happens to that."""
        try:
            await cf.ensure(0, cf.size)
        except Exception as exc:
            log.error(
                "%s: the parts of it never read could not be fetched (%s); in the copy kept "
                "below they are zeros, the rest is what was written", cf.key, exc,
            )  # fmt: skip
        finally:
            dest = self._unsaved_path(cf.key)
            try:
                _makedirs_private(os.path.dirname(dest))
                os.link(cf.path, dest)
                log.error("could not upload %s; its data is kept in %s", cf.key, dest)
            except OSError as exc:
                log.error("could not upload %s nor keep it in %s: %s", cf.key, dest, exc)

    def _recover_leftovers(self, unverified: list[Record]) -> None:
        """Temp files of a daemon that died.  Those the journal knew were being written are
        kept in the unsaved folder, named by key (never uploaded over the object); the others
        only cached what S3 has, and go.  Likewise for journaled files that were closed but
        not fsync'd before the machine rebooted: their data may be incomplete."""
        for record in unverified:
            dest = self._unsaved_path(record.key, "unverified")
            _makedirs_private(os.path.dirname(dest))
            with contextlib.suppress(FileNotFoundError):
                os.replace(record.data, dest)
                self.recovered.append(dest)
                log.error("%s was closed but not fsync'd before a reboot; not uploaded, its "
                          "data (maybe incomplete) is kept in %s", record.key, dest)  # fmt: skip
        writing = dict(self.journal.interrupted())
        for path in self.files.leftovers():
            key = writing.get(path)
            if key is None:
                os.unlink(path)
                continue
            dest = self._unsaved_path(key, "interrupted")
            _makedirs_private(os.path.dirname(dest))
            os.replace(path, dest)
            self.recovered.append(dest)
            log.error("%s was being written when the daemon died; its data is kept in %s",
                      key, dest)  # fmt: skip
        if self.writeback.records:
            log.info("%d journaled uploads to finish", len(self.writeback.records))

    async def close(self, drain: bool = True) -> None:
        """Shut down: save what is dirty (keeping what cannot be), upload what is journaled
        unless ``drain`` is False (it stays journaled for the next mount), free temp files."""
        try:
            await self.sync(drain=drain)
            for cf in self.files.files.values():  # unlinked while open: nothing to complete
                if cf.stream is not None:
                    await cf.stream.abort()
        finally:
            for cf in list(self.files.files.values()):
                if cf.dirty and not cf.unlinked:
                    await self._keep_unsaved(cf)
                self._untrack(cf)
                cf.close()
            self.files.files.clear()
            self.files.forget_all()

    async def truncate(self, path: str, size: int) -> None:
        """truncate(2) by path: open, cut or extend, upload, close."""
        handle = await self.open_file(path, write=True)
        try:
            await handle.truncate(size)
        finally:
            await handle.close()

    async def confirm_key(self, key: str, etag: str) -> bool:
        """The key-sync checker: wait until ``key`` reads back with ``etag``.

        Waits at most ``key_sync_timeout`` seconds (0: no limit; None: no check at all).
        Once KEY_SYNC_PROOF uploads in a row read back at the first try, the store has shown
        read-after-write consistency (as S3 has since 2020) and the checks stop; a store that
        ever needs a second try is checked after every upload.
        """
        timeout = self.key_sync_timeout
        if timeout is None or self._read_after_write >= KEY_SYNC_PROOF:
            return True
        first_try = True
        deadline = None if timeout == 0 else trio.current_time() + timeout
        delay = 0.05
        while True:
            try:
                found, info = await self.run.read(self.storage.exists, self.s3name(key))
            except StorageError as exc:
                log.warning("key-sync check of %s failed: %s", key, exc)
                return False
            if found and info is not None and info.etag == etag:
                if first_try and self._read_after_write >= 0:
                    self._read_after_write += 1
                    if self._read_after_write == KEY_SYNC_PROOF:
                        log.info("uploads read back at once: key-sync checks stop")
                return True
            first_try = False
            self._read_after_write = -1  # eventually consistent: check every upload
            if deadline is not None and trio.current_time() + delay > deadline:
                log.warning("key %s not readable with ETag %s after %ss", key, etag, timeout)
                return False
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def sync(self, drain: bool = True) -> None:
        """Save every dirty open file (try them all, then report the first failure); then,
        with ``drain``, wait until everything journaled is uploaded."""
        failures: list[FSError] = []
        for cf in list(self.files.files.values()):
            if cf.dirty:
                try:
                    await self.flush_file(cf)
                except FSError as exc:
                    failures.append(exc)
        if drain:
            await self.writeback.drain()
        await self.deletes.flush()
        if failures:
            raise failures[0]

    # -- attributes -------------------------------------------------------------------------

    async def set_attrs(
        self,
        path: str,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        mtime_ns: int | None = None,
    ) -> Info:
        """chmod/chown/utimens, stored in the object's metadata (s3fs-fuse's headers)."""
        now = time.time_ns()

        def change(info: Info) -> dict[str, str]:
            full_mode = None
            if mode is not None:
                kind = stat.S_IFDIR if info.is_dir else stat.S_IFLNK if info.is_symlink else 0
                full_mode = (kind or stat.S_IFREG) | stat.S_IMODE(mode)
            return with_posix(
                info.meta.headers, mode=full_mode, uid=uid, gid=gid, mtime_ns=mtime_ns, ctime_ns=now
            )

        return await self._update_meta(path, change, mtime_ns=mtime_ns)

    async def _update_meta(
        self, path: str, change: Callable[[Info], dict[str, str]], mtime_ns: int | None = None
    ) -> Info:
        """Replace a path's metadata: carried by the next upload of a dirty open file, else
        written now (a copy in place for a file, a PUT of the marker for a directory)."""
        self._check_writable()
        path = self.norm(path)
        if path == "/":
            return await self.getinfo(path)  # the bucket's root has no object to hold it
        key = self.key(path)
        record = self._pending_for_path(key)  # the file's, or the directory's marker
        if (
            record is not None
            and record.key not in self.files.files
            and not self.writeback.busy(record.key)
        ):
            # Journaled and not uploading yet: the upload will carry the new metadata.
            _, headers = await self._changed_headers(path, change)
            self.journal.update_headers(record, headers)
            return await self.getinfo(path)
        for mkey in (key, key + self.sep):
            if self.writeback.pending_for(mkey) or self.writeback.busy(mkey):
                await self.writeback.settle(mkey)  # metadata changes apply to what S3 has
        cf = self.files.files.get(key)
        if cf is not None:
            async with cf.upload_lock:
                info, headers = await self._changed_headers(path, change)
                if _same_meta(headers, info.meta.headers):
                    return info
                cf.meta = ObjectMeta(headers, cf.meta.content_type)
                if mtime_ns is not None:
                    cf.mtime_ns = mtime_ns
                    cf.times_set = True
                if not cf.dirty and cf.etag is not None:
                    result = await self._replace_object_meta(key, cf.size, cf.meta)
                    cf.etag = result.etag
                    self._update_listing(key, cf)
            return await self.getinfo(path)
        info, headers = await self._changed_headers(path, change)
        if _same_meta(headers, info.meta.headers):
            return info  # e.g. tar's lchown to the owner the link already has: no request
        parent, name = self.split(path)
        if info.is_dir:
            entry = await self._store_marker(self.dir_key(path), name, headers)
        else:
            meta = ObjectMeta(headers, info.meta.content_type)
            result = await self._replace_object_meta(key, info.size, meta)
            entry = Entry(
                name, False, info.size, result.last_modified.timestamp(), result.etag, meta
            )
        self.listings.set_entry(self.dir_key(parent), entry)
        return self._info(path, entry)

    async def _changed_headers(
        self, path: str, change: Callable[[Info], dict[str, str]]
    ) -> tuple[Info, dict[str, str]]:
        """The path's attributes, and its headers after ``change`` (NoSpace if too big)."""
        info = await self.getinfo(path)
        headers = change(info)
        if headers_size(headers) > MAX_METADATA:
            raise NoSpace(f"{path}: S3 keeps at most 2 KiB of metadata")
        return info, headers

    async def _replace_object_meta(self, key: str, size: int, meta: ObjectMeta) -> ObjectInfo:
        """Copy an object onto itself with new metadata; the data is not uploaded again."""
        options = WriteOptions(content_type=meta.content_type or None, metadata=meta.headers)
        name = self.s3name(key)
        result: ObjectInfo = await self.run(self.storage.copy, name, name, options, size=size)
        self.meta_cache.put(key, result.etag, result.last_modified.timestamp(), meta)
        return result

    # -- symbolic links and extended attributes --------------------------------------------

    async def symlink(
        self, path: str, target: str, *, uid: int | None = None, gid: int | None = None
    ) -> Info:
        """A link in s3fs-fuse's form: the object's body is the target, its mode S_IFLNK."""
        self._check_writable()
        path = self.norm(path)
        if await self.exists(path):
            raise ResourceExists(path)
        parent, name = self.split(path)
        if not (await self.getinfo(parent, meta=False)).is_dir:
            raise NotADirectory(parent)
        key = self.key(path)
        now = time.time_ns()
        headers = with_posix(
            {}, mode=stat.S_IFLNK | 0o777, uid=uid, gid=gid, mtime_ns=now, ctime_ns=now
        )
        body = os.fsencode(target)
        ctype = "application/octet-stream"
        if self.write_back is not None:
            # Journaled like a closed file: lchown/utimens then change the journal row (tar
            # sets both on every link), and the one PUT goes later with the final headers.
            entry = self._record_entry(name, self._journal_bytes(key, body, headers, ctype))
        else:
            await self.deletes.settle(key)
            info: ObjectInfo = await self.run(
                self.storage.write_stream,
                io.BytesIO(body),
                self.s3name(key),
                WriteOptions(content_type=ctype, metadata=headers),
            )
            meta = ObjectMeta(headers, ctype)
            self.meta_cache.put(key, info.etag, None, meta)
            self._link_targets[key] = (info.etag, target)
            entry = Entry(name, False, len(body), now / 1e9, info.etag, meta)
        self.listings.set_entry(self.dir_key(parent), entry)
        return self._info(path, entry)

    def _journal_bytes(self, key: str, body: bytes, headers: dict[str, str], ctype: str) -> Record:
        """Write-back mode: journal a new object from memory (uploaded later)."""
        fd, tmp = self.files.temp_file()
        try:
            os.write(fd, body)
            record = self.journal.add(key, fd, tmp, len(body), headers, ctype, None, durable=False)
        finally:
            os.close(fd)
            os.unlink(tmp)
        self.writeback.add(record)
        return record

    async def readlink(self, path: str) -> str:
        info = await self.getinfo(path)
        if not info.is_symlink:
            raise InvalidPath(f"{path}: not a symbolic link")
        key = self.key(path)
        record = self.writeback.pending_for(key)
        if record is not None:  # journaled, maybe not uploaded yet
            with open(record.data, "rb") as f:
                return os.fsdecode(f.read())
        known = self._link_targets.get(key)
        if known is not None and known[0] == info.etag:
            return known[1]
        data = await self.run.read(
            self.storage.read_range, self.s3name(key), 0, max(info.size, 1), info.etag
        )
        target = os.fsdecode(data)
        self._link_targets[key] = (info.etag, target)
        return target

    async def getxattrs(self, path: str) -> dict[str, bytes]:
        return (await self.getinfo(path)).meta.xattrs

    async def setxattr(self, path: str, name: str, value: bytes) -> None:
        if not name.startswith("user."):
            raise Unsupported(f"{name}: only user.* attributes are stored")

        def change(info: Info) -> dict[str, str]:
            xattrs = info.meta.xattrs
            xattrs[name] = value
            return with_posix(info.meta.headers, xattrs=xattrs, ctime_ns=time.time_ns())

        await self._update_meta(path, change)

    async def removexattr(self, path: str, name: str) -> None:
        if name not in await self.getxattrs(path):
            raise NoAttribute(name)

        def change(info: Info) -> dict[str, str]:
            xattrs = info.meta.xattrs
            xattrs.pop(name, None)
            return with_posix(info.meta.headers, xattrs=xattrs, ctime_ns=time.time_ns())

        await self._update_meta(path, change)

    async def object_info(self, path: str) -> ObjectInfo:
        """A fresh HEAD of the object behind a path (its marker, for a directory)."""
        info = await self.getinfo(path, meta=False)
        try:
            return await self.run(
                self.storage.head, self.s3name(self.meta_key(self.norm(path), info.is_dir))
            )
        except NotFound:
            raise NoAttribute(f"{path}: no object behind it (an implicit directory)") from None

    # -- rename, move, copy -----------------------------------------------------------------

    async def rename(self, src: str, dst: str, *, replace_existing: bool = True) -> None:
        """rename(2): a file by server-side copy + delete; a directory key by key."""
        self._check_writable()
        src, dst = self.norm(src), self.norm(dst)
        if src == dst:
            return
        if dst.startswith(src + "/") or src == "/":
            raise InvalidPath(f"cannot move {src} into itself")
        # Journaled versions go to S3 first: a rename moves what S3 has.
        await self.writeback.settle(self.key(src))
        await self.writeback.settle(self.dir_key(src), prefix=True)
        await self.writeback.settle(self.key(dst))
        sinfo = await self.getinfo(src)
        try:
            dinfo: Info | None = await self.getinfo(dst)
        except ResourceNotFound:
            dinfo = None
            dparent = self.split(dst)[0]
            if not (await self.getinfo(dparent)).is_dir:
                raise NotADirectory(dparent) from None
        if dinfo is not None:
            if not replace_existing:
                raise ResourceExists(dst)
            if sinfo.is_dir and not dinfo.is_dir:
                raise NotADirectory(dst)
            if not sinfo.is_dir and dinfo.is_dir:
                raise IsADirectory(dst)
            if dinfo.is_dir:
                await self.removedir(dst)  # raises DirectoryNotEmpty unless empty
        if sinfo.is_dir:
            await self._rename_dir(src, dst)
        else:
            await self._rename_file(src, dst, sinfo, dinfo)

    async def _rename_file(self, src: str, dst: str, sinfo: Info, dinfo: Info | None) -> None:
        skey, dkey = self.key(src), self.key(dst)
        done = trio.Event()
        self._renaming[skey] = self._renaming[dkey] = done
        try:
            await self._rename_file_now(src, dst, skey, dkey, sinfo, dinfo)
        finally:
            del self._renaming[skey], self._renaming[dkey]
            done.set()

    async def _rename_file_now(
        self, src: str, dst: str, skey: str, dkey: str, sinfo: Info, dinfo: Info | None
    ) -> None:
        cf = self.files.files.get(skey)
        replaced = self.files.files.get(dkey) if dinfo is not None else None
        if replaced is not None:
            await self._detach_open_file(replaced)
        async with contextlib.AsyncExitStack() as stack:
            src_remote = sinfo.etag is not None
            if cf is not None:
                await stack.enter_async_context(cf.upload_lock)  # no upload in flight
                src_remote = cf.etag is not None
            if cf is not None and (cf.dirty or cf.etag is None):
                # Local data not in S3 yet: upload it straight under the new name.
                await cf.ensure(0, cf.size)  # what is still only in S3 comes from the old key
                self._rekey(skey, dkey)
                # Its base version was the old key's; the destination is replaced whole, so
                # there is nothing to check for another client's change.
                cf.etag = None
                await self._upload_locked(cf)
            else:
                await self.deletes.settle(dkey)
                result = await self.run(
                    self.storage.copy, self.s3name(skey), self.s3name(dkey), size=sinfo.size
                )
                self.meta_cache.put(dkey, result.etag, result.last_modified.timestamp(), sinfo.meta)
                if cf is not None:
                    self._rekey(skey, dkey)
                    cf.etag = result.etag
            if src_remote:
                await self.deletes.add(skey)
        self.meta_cache.delete(skey)
        self.files.forget(skey)
        self.files.forget(dkey)
        link = self._link_targets.pop(skey, None)
        sp, sn = self.split(src)
        dp, dn = self.split(dst)
        self.listings.remove_entry(self.dir_key(sp), sn)
        if cf is not None:
            self._update_listing(dkey, cf)
        else:
            self.listings.invalidate(self.dir_key(dp))  # the copy's ETag and time are new
            if link is not None:
                self._link_targets[dkey] = link

    async def _rename_dir(self, src: str, dst: str) -> None:
        sdk, ddk = self.dir_key(src), self.dir_key(dst)
        async with contextlib.AsyncExitStack() as stack:
            for key, cf in list(self.files.files.items()):
                if key.startswith(sdk):
                    await stack.enter_async_context(cf.upload_lock)
                    await self._upload_locked(cf)
            await self._move_tree(sdk, ddk)
        sp, sn = self.split(src)
        dp, dn = self.split(dst)
        self.listings.remove_entry(self.dir_key(sp), sn)
        self.listings.set_entry(self.dir_key(dp), Entry(dn, True, mtime=time.time()))
        self.listings.invalidate_tree(sdk)
        self.listings.invalidate_tree(ddk)

    async def _move_tree(self, sdk: str, ddk: str) -> None:
        """Copy every key below ``sdk`` to ``ddk`` (in parallel), then delete the originals."""
        await self.deletes.flush(sdk)
        await self.deletes.flush(ddk)
        objects = await self.run(
            lambda: list(self.storage.bucket_list_keys(self.bucket, prefix=sdk))
        )
        keys = [o.key for o in objects]
        for k in keys:  # check every new key before the first copy: no half-made tree
            if len((ddk + k[len(sdk) :]).encode()) > S3Facts.maximum_key_length:
                raise NameTooLong(f"{ddk + k[len(sdk) :]}: key longer than S3's 1024 bytes")

        async def copy_one(o: S3Key) -> None:
            dst = self.s3name(ddk + o.key[len(sdk) :])
            await self.run(self.storage.copy, self.s3name(o.key), dst, size=o.size)

        try:
            async with trio.open_nursery() as nursery:
                if sdk not in keys:
                    # Keep the moved directory even when it was implicit and is empty now.
                    nursery.start_soon(self._put_marker, ddk, {})
                for o in objects:
                    nursery.start_soon(copy_one, o)
        except ExceptionGroup as group:
            raise first_leaf(group) from None
        await self.run(self.storage.delete_many, keys, self.bucket)
        for key in [k for k in self.files.files if k.startswith(sdk)]:
            self._rekey(key, ddk + key[len(sdk) :])
        self.meta_cache.move_tree(sdk, ddk)

    def _rekey(self, skey: str, dkey: str) -> None:
        """An open file now belongs to another key (after a rename)."""
        cf = self.files.files.pop(skey)
        if cf.stream is not None:
            cf.stream.broken = True  # its parts went to the old key: uploaded whole at close
        cf.key = dkey
        cf._fetch = self._fetcher(dkey)
        self.files.files[dkey] = cf
        if cf.tracked:
            self.journal.writing(cf.tracked, dkey)

    async def move(self, src: str, dst: str, overwrite: bool = False) -> None:
        await self.rename(src, dst, replace_existing=overwrite)

    async def copy(self, src: str, dst: str, overwrite: bool = False) -> None:
        """Copy a file, server-side."""
        self._check_writable()
        src, dst = self.norm(src), self.norm(dst)
        sinfo = await self.getinfo(src)
        if sinfo.is_dir:
            raise IsADirectory(src)
        if await self.exists(dst):
            if not overwrite:
                raise ResourceExists(dst)
            if await self.isdir(dst):
                raise IsADirectory(dst)
        cf = self.files.files.get(self.key(src))
        if cf is not None and cf.dirty:
            await self.flush_file(cf)
        await self.writeback.settle(self.key(src))
        await self.deletes.settle(self.key(dst))
        info = await self.run(
            self.storage.copy, self.s3name(self.key(src)), self.s3name(self.key(dst))
        )
        dp, dn = self.split(dst)
        self.listings.set_entry(
            self.dir_key(dp),
            Entry(dn, False, info.size, info.last_modified.timestamp(), info.etag),
        )

    # -- URLs and metadata ------------------------------------------------------------------

    async def getpathurl(self, path: str, allow_none: bool = False, expires: int = 3600) -> str:
        return await self.run(self.storage.presigned_url, self.s3name(self.key(path)), expires)

    async def makepublic(self, path: str) -> None:
        self._check_writable()
        try:
            await self.run(self.storage.make_public, self.s3name(self.key(path)))
        except NotFound:
            raise ResourceNotFound(path) from None

    async def getmeta(self, path: str) -> dict[str, str]:
        """The object's user metadata (``x-amz-meta-*``), POSIX headers included."""
        return dict((await self.getinfo(path)).meta.headers)

    async def setmeta(self, path: str, metadata: dict[str, str]) -> None:
        """Merge ``metadata`` into the object's user metadata (the data is not re-sent)."""
        await self._update_meta(path, lambda info: {**info.meta.headers, **metadata})

    def invalidate(self, path: str = "/") -> None:
        """Forget what is cached at and below ``path``: listings, metadata, the kernel's
        pages (someone changed the bucket behind the mount's back)."""
        path = self.norm(path)
        key, dkey = self.key(path), self.dir_key(path)
        self.listings.invalidate_tree(dkey)
        if path != "/":
            self.listings.invalidate(self.dir_key(self.split(path)[0]))
            self.meta_cache.delete(key)
        self.meta_cache.delete_tree(dkey)
        for k in [k for k in self._kernel_etags if k == key or k.startswith(dkey)]:
            del self._kernel_etags[k]


class OpenFile:
    """One open handle: positional reads and writes, plus a file-like position API."""

    def __init__(self, fs: S3FS, cf: CachedFile, path: str, writable: bool, keep_cache: bool):
        self.fs = fs
        self.cf = cf
        self.path = path
        self.writable = writable
        self.keep_cache = keep_cache
        self.append = False
        self.pos = 0
        self._next_sequential = 0
        self._readahead = 0
        self.closed = False

    async def pread(self, off: int, size: int) -> bytes | memoryview:
        # The kernel sends its readahead requests concurrently and slightly out of order:
        # a read is sequential if it starts near where the requests so far have got to (or
        # a little behind it), counted when they arrive, not when they are answered.
        ahead = off - self._next_sequential
        if -max(SEQUENTIAL_SLACK, self._readahead) <= ahead <= SEQUENTIAL_SLACK:
            self._readahead = min(max(self._readahead * 2, size * 4), MAX_READAHEAD)
            self._next_sequential = max(self._next_sequential, off + size)
        else:  # a jump: a new run may start here
            self._readahead = 0
            self._next_sequential = off + size
        bg = self.fs.background
        # Only backward jumps count as random: a re-read that finds most pages in the
        # kernel's cache skips forward over them, and must not fetch the whole file.
        return await self.cf.read(
            off, size, self._readahead, bg.start_soon if bg else None, random=ahead < 0
        )

    async def pwrite(self, off: int, data: bytes) -> int:
        if not self.writable:
            raise FSError("file not open for writing")
        if off == 0:
            self.fs._maybe_stream(self.cf)
        n = await self.cf.write(off, data)
        self.cf.mtime_ns = time.time_ns()
        self.cf.times_set = False
        self.fs._track(self.cf)
        return n

    async def truncate(self, size: int) -> None:
        self.fs._check_writable()
        await self.cf.truncate(size)
        self.cf.mtime_ns = time.time_ns()
        self.cf.times_set = False
        self.fs._track(self.cf)

    def info(self) -> Info:
        """Attributes of the open file (also after it was unlinked)."""
        return self.fs._cf_info(self.path, self.cf)

    @property
    def size(self) -> int:
        return self.cf.size

    # file-like API
    async def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = max(self.cf.size - self.pos, 0)
        data = bytes(await self.pread(self.pos, size))
        self.pos += len(data)
        return data

    async def write(self, data: bytes) -> int:
        if self.append:
            self.pos = self.cf.size
        n = await self.pwrite(self.pos, data)
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.cf.size}[whence]
        self.pos = max(base + offset, 0)
        return self.pos

    def tell(self) -> int:
        return self.pos

    async def flush(self) -> None:
        if self.writable or self.cf.dirty:
            await self.fs.flush_file(self.cf)

    async def fsync(self) -> None:
        if self.writable or self.cf.dirty:
            await self.fs.flush_file(self.cf, durable=True)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.fs.release_file(self.cf, self.writable)

    async def __aenter__(self) -> OpenFile:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _same_meta(
    new: dict[str, str], old: dict[str, str], ignored: tuple[str, ...] = (CTIME,)
) -> bool:
    """Whether a metadata change changes nothing stored but the ``ignored`` headers (by
    default the ctime: not worth a request)."""
    return {k: v for k, v in new.items() if k not in ignored} == {
        k: v for k, v in old.items() if k not in ignored
    }


def _makedirs_private(path: str) -> None:
    """mkdir -p where every directory created is 0700."""
    if os.path.isdir(path):
        return
    _makedirs_private(os.path.dirname(path))
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
