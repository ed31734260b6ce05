"""The core S3FS layer: path semantics over the keys of one bucket (and optional prefix).

The seed's path API (``exists``, ``isdir``, ``listdir``, ``makedir``, ``remove``, ``rename``,
``open``, ...) as trio coroutines, with three caches: the write-back temp-file cache
(:mod:`.filecache`), the directory listing cache (:mod:`.listing`) and the key-sync checker
(:meth:`S3FS.confirm_key`).  No FUSE here: the operations layer maps inodes onto these paths.

Concurrency: all state lives in the trio thread and changes only between awaits; blocking
storage calls run in worker threads through one :class:`ThreadRunner`.
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
from collections.abc import Iterator
from dataclasses import dataclass, replace

import trio

from s3mount.core.errors import (
    DirectoryNotEmpty,
    FSError,
    InvalidPath,
    IsADirectory,
    NameTooLong,
    NotADirectory,
    ReadOnly,
    ResourceExists,
    ResourceNotFound,
    Stale,
    UploadFailed,
    first_leaf,
)
from s3mount.core.filecache import BLOCK, MAX_READAHEAD, CachedFile, FileCache
from s3mount.core.listing import NAME_MAX, DirListing, Entry, ListingCache, entries_from_pages
from s3mount.core.runner import ThreadRunner
from s3mount.storage import (
    NotFound,
    ObjectInfo,
    PreconditionFailed,
    S3Facts,
    S3Key,
    S3Name,
    Storage,
    StorageError,
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
    mode: int | None = None  # permission bits set through the mount (kept in memory for now)
    uid: int | None = None
    gid: int | None = None

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)


class S3FS:
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
        listing_ttl: float = 10.0,
        threads: int = 16,
        read_only: bool = False,
    ):
        if len(separator) != 1:
            raise ValueError("the separator must be one character")
        self.bucket = bucket
        self.sep = separator
        self.prefix = prefix.strip(separator) + separator if prefix.strip(separator) else ""
        self.storage = storage or Storage(default_bucket=bucket)
        self.key_sync_timeout = key_sync_timeout
        self.read_only = read_only
        self.run = ThreadRunner(threads)
        self.listings = ListingCache(listing_ttl)
        self.files = FileCache(cache_dir)
        self.started = time.time()
        self._listing_inflight: dict[str, trio.Event] = {}
        self._attrs: dict[str, dict[str, int | float]] = {}  # in-memory mode/uid/gid/mtime
        self._kernel_etags: dict[str, str] = {}  # ETag whose data a reader last saw, by key
        self.recovery_dir = os.path.join(cache_dir, "unsaved")
        self.background: trio.Nursery | None = None  # for readahead; set by the daemon
        self._recover_leftovers()

    # -- paths and keys ---------------------------------------------------------------------

    def norm(self, path: str) -> str:
        """'/a/b' form of a path; refuses '..' above the root and bad names."""
        p = posixpath.normpath("/" + path.strip())
        if p.startswith("//"):
            p = "/" + p.lstrip("/")
        for part in p.split("/")[1:]:
            if part in ("..",):
                raise InvalidPath(f"{path}: '..' above the root")
            if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
                raise NameTooLong(path)
            if self.sep != "/" and self.sep in part:
                raise InvalidPath(f"{path}: contains the key separator {self.sep!r}")
        return p

    def key(self, path: str) -> str:
        """The object key of a file path."""
        p = self.norm(path)
        if p == "/":
            return self.prefix
        key = self.prefix + self.sep.join(p.split("/")[1:])
        try:
            raw = key.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidPath(f"{path}: not valid UTF-8, S3 cannot store it") from None
        if len(raw) + 1 > S3Facts.maximum_key_length:  # +1: room for a directory marker
            raise NameTooLong(f"{path}: key longer than S3's 1024 bytes")
        return key

    def dir_key(self, path: str) -> str:
        """The key prefix of a directory's children ('' or ending with the separator)."""
        k = self.key(path)
        return k if k == self.prefix else k + self.sep

    def _name(self, key: str) -> S3Name:
        return S3Name(key, self.bucket)

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        parent, name = posixpath.split(path)
        return parent or "/", name

    # -- listing ----------------------------------------------------------------------------

    async def _listing(self, path: str) -> DirListing:
        """The cached listing of a directory, fetched (once, however many ask) when stale."""
        dkey = self.dir_key(path)
        while True:
            listing = self.listings.get(dkey)
            if listing is not None:
                return listing
            pending = self._listing_inflight.get(dkey)
            if pending is not None:
                await pending.wait()
                continue
            done = self._listing_inflight[dkey] = trio.Event()
            try:
                pages = await self.run(
                    lambda: list(self.storage.list_pages(self.bucket, dkey, delimiter=self.sep))
                )
                return self.listings.put(dkey, entries_from_pages(dkey, pages))
            finally:
                del self._listing_inflight[dkey]
                done.set()

    def _local_entries(self, dkey: str) -> Iterator[Entry]:
        """Files open in this directory (possibly not uploaded yet)."""
        for key, cf in self.files.files.items():
            if key.startswith(dkey) and self.sep not in key[len(dkey) :] and key != dkey:
                yield Entry(
                    name=key[len(dkey) :],
                    is_dir=False,
                    size=cf.size,
                    mtime=cf.mtime or self.started,
                    etag=cf.etag,
                )

    async def _entries(self, path: str) -> dict[str, Entry]:
        listing = await self._listing(path)
        local = list(self._local_entries(self.dir_key(path)))
        if not local:
            return listing.entries
        merged = dict(listing.entries)
        for e in local:
            merged[e.name] = e
        return merged

    def _info(self, path: str, entry: Entry) -> Info:
        key = self.key(path)
        info = Info(
            path=path,
            is_dir=entry.is_dir,
            size=0 if entry.is_dir else entry.size,
            mtime=entry.mtime or self.started,
            etag=entry.etag,
        )
        attrs = self._attrs.get(key)
        if attrs:
            info = replace(info, **attrs)  # type: ignore[arg-type]
        return info

    # -- queries ----------------------------------------------------------------------------

    async def getinfo(self, path: str) -> Info:
        path = self.norm(path)
        if path == "/":
            return self._info(path, Entry(name="", is_dir=True, mtime=self.started))
        cf = self.files.files.get(self.key(path))
        parent, name = self._split(path)
        entries = await self._entries(parent) if cf is None else {}
        if cf is not None:
            entry = Entry(name, False, cf.size, cf.mtime or self.started, cf.etag)
        else:
            found = entries.get(name)
            if found is None:
                raise ResourceNotFound(path)
            entry = found
        return self._info(path, entry)

    async def exists(self, path: str) -> bool:
        try:
            await self.getinfo(path)
        except ResourceNotFound:
            return False
        return True

    async def isdir(self, path: str) -> bool:
        try:
            return (await self.getinfo(path)).is_dir
        except ResourceNotFound:
            return False

    async def isfile(self, path: str) -> bool:
        try:
            return not (await self.getinfo(path)).is_dir
        except ResourceNotFound:
            return False

    async def listinfo(self, path: str = "/") -> list[Info]:
        """Every entry of a directory with its attributes, from one (cached) listing."""
        path = self.norm(path)
        if not (await self.getinfo(path)).is_dir:
            raise NotADirectory(path)
        entries = await self._entries(path)
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
        self, path: str, recursive: bool = False, allow_recreate: bool = False
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
        parent, name = self._split(path)
        try:
            pinfo = await self.getinfo(parent)
        except ResourceNotFound:
            if not recursive:
                raise ResourceNotFound(f"{parent}: parent directory does not exist") from None
            await self.makedir(parent, recursive=True, allow_recreate=True)
        else:
            if not pinfo.is_dir:
                raise NotADirectory(parent)
        dkey = self.dir_key(path)
        await self._put_marker(dkey)
        now = time.time()
        self.listings.set_entry(self.dir_key(parent), Entry(name, True, mtime=now))
        self.listings.put(dkey, {})  # a new directory is empty: no LIST needed
        return Info(path=path, is_dir=True, mtime=now)

    async def _put_marker(self, dkey: str) -> None:
        await self.run(
            self.storage.write_stream,
            io.BytesIO(b""),
            self._name(dkey),
            WriteOptions(content_type=DIR_CONTENT_TYPE),
        )

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
        if entries and not (recursive or force):
            raise DirectoryNotEmpty(path)
        if entries:
            for key in [k for k in self.files.files if k.startswith(dkey)]:
                self._forget_file(key)
            keys = await self.run(
                lambda: [k.key for k in self.storage.bucket_list_keys(self.bucket, prefix=dkey)]
            )
            await self.run(self.storage.delete_many, keys, self.bucket)
        else:
            await self.run(self.storage.delete, self._name(dkey))
        parent, name = self._split(path)
        self.listings.remove_entry(self.dir_key(parent), name)
        self.listings.invalidate_tree(dkey)
        for key in [k for k in self._attrs if k.startswith(dkey) or k == dkey[:-1]]:
            del self._attrs[key]

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
        if cf is not None:
            async with cf.upload_lock:  # an upload in flight finishes first
                remote = cf.etag is not None
                if cf.open_count and remote:
                    await cf.ensure(0, cf.size)  # open handles keep reading after the delete
                self._forget_file(key)
        if remote:
            await self.run(self.storage.delete, self._name(key))
        parent, name = self._split(path)
        self.listings.remove_entry(self.dir_key(parent), name)
        self._attrs.pop(key, None)

    def _forget_file(self, key: str) -> None:
        """Detach an open file from its key: its handles go on working, nothing is uploaded."""
        cf = self.files.files.pop(key, None)
        if cf is not None:
            cf.unlinked = True
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
    ) -> OpenFile:
        """Open (and maybe create or truncate) a file; nothing is downloaded here."""
        if write or create or truncate:
            self._check_writable()
        path = self.norm(path)
        key = self.key(path)
        cf = self.files.files.get(key)
        if cf is not None and exclusive:
            raise ResourceExists(path)
        if cf is None:
            try:
                info = await self.getinfo(path)
            except ResourceNotFound:
                if not create:
                    raise
                parent, _name = self._split(path)
                if not (await self.getinfo(parent)).is_dir:
                    raise NotADirectory(parent) from None
                cf = self.files.new(key, 0, None, self._fetcher(key))
                cf.mtime = time.time()
                cf.dirty = True  # a new file is uploaded on close, even when empty
            else:
                if info.is_dir:
                    raise IsADirectory(path)
                if exclusive:
                    raise ResourceExists(path)
                cf = self.files.new(key, info.size, info.etag, self._fetcher(key))
                cf.mtime = info.mtime
            self.files.files[key] = cf
        if truncate and cf.size:
            await cf.truncate(0)
            cf.mtime = time.time()
        cf.open_count += 1
        keep = cf.etag is not None and self._kernel_etags.get(key) == cf.etag
        return OpenFile(self, cf, path, writable=write, keep_cache=keep)

    def _fetcher(self, key: str):  # noqa: ANN202
        name = self._name(key)

        async def fetch(start: int, length: int, etag: str | None) -> bytes:
            try:
                return await self.run(self.storage.read_range, name, start, length, etag)
            except PreconditionFailed:
                raise Stale(f"{key}: changed on the server while open") from None

        return fetch

    async def flush_file(self, cf: CachedFile) -> None:
        """Upload a dirty file (fetching what it still lacks); keeps it dirty on failure."""
        async with cf.upload_lock:
            uploaded = await self._upload_locked(cf)
        if uploaded is not None:
            await self.confirm_key(*uploaded)

    async def _upload_locked(self, cf: CachedFile) -> tuple[str, str] | None:
        """Upload ``cf`` (its upload lock held, so no rename or unlink can interleave).

        Returns (key, new ETag), or None when there was nothing to upload.
        """
        if not cf.dirty or cf.unlinked:
            return None
        await cf.ensure(0, cf.size)
        generation, key = cf.generation, cf.key
        try:
            info: ObjectInfo = await self.run(
                self.storage.write, cf.path, self._name(key), WriteOptions()
            )
        except StorageError as exc:
            log.error("upload of %s failed, the data stays in the local cache: %s", key, exc)
            raise UploadFailed(str(exc)) from exc
        cf.uploaded(generation, info.etag)
        self._kernel_etags[key] = info.etag
        self._update_listing(key, cf)
        return key, info.etag

    def _update_listing(self, key: str, cf: CachedFile) -> None:
        dkey, name = self._dir_key_of(key)
        self.listings.set_entry(dkey, Entry(name, False, cf.size, cf.mtime or time.time(), cf.etag))

    def _dir_key_of(self, key: str) -> tuple[str, str]:
        head, _, name = key[len(self.prefix) :].rpartition(self.sep)
        return (self.prefix + head + self.sep if head else self.prefix), name

    async def release_file(self, cf: CachedFile, handle_writable: bool) -> None:
        """A handle closed: upload if dirty; the last close frees the local copy."""
        cf.open_count -= 1
        try:
            if handle_writable or cf.dirty:
                await self.flush_file(cf)
        finally:
            if cf.open_count == 0:
                if cf.dirty and not cf.unlinked:
                    self._keep_unsaved(cf)
                elif not cf.unlinked and cf.etag:
                    self._kernel_etags[cf.key] = cf.etag
                if self.files.files.get(cf.key) is cf:
                    del self.files.files[cf.key]
                cf.close()

    def _keep_unsaved(self, cf: CachedFile) -> None:
        """Keep data that could not be uploaded, under the cache dir, named by its key."""
        parts = [self.bucket, *cf.key.split("/")]
        dest = os.path.join(self.recovery_dir, *parts) + f".{time.time_ns()}"
        try:
            _makedirs_private(os.path.dirname(dest))
            os.link(cf.path, dest)
            log.error("could not upload %s; its data is kept in %s", cf.key, dest)
        except OSError as exc:
            log.error("could not upload %s nor keep it in %s: %s", cf.key, dest, exc)

    def _recover_leftovers(self) -> None:
        """Temp files of a daemon that died: keep their data in the unsaved folder."""
        for path in self.files.leftovers():
            if os.path.getsize(path) == 0:
                os.unlink(path)
                continue
            dest = os.path.join(self.recovery_dir, "orphans", os.path.basename(path))
            _makedirs_private(os.path.dirname(dest))
            os.replace(path, dest)
            log.error("a previous daemon left unsaved data; it is kept in %s", dest)

    async def close(self) -> None:
        """Shut down: upload what is dirty, keep what cannot be, free every temp file."""
        try:
            await self.sync()
        finally:
            for cf in list(self.files.files.values()):
                if cf.dirty and not cf.unlinked:
                    self._keep_unsaved(cf)
                cf.close()
            self.files.files.clear()

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
        """
        timeout = self.key_sync_timeout
        if timeout is None:
            return True
        deadline = None if timeout == 0 else trio.current_time() + timeout
        delay = 0.05
        while True:
            try:
                found, info = await self.run(self.storage.exists, self._name(key))
            except StorageError as exc:
                log.warning("key-sync check of %s failed: %s", key, exc)
                return False
            if found and info is not None and info.etag == etag:
                return True
            if deadline is not None and trio.current_time() + delay > deadline:
                log.warning("key %s not readable with ETag %s after %ss", key, etag, timeout)
                return False
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def sync(self) -> None:
        """Upload every dirty open file; try them all, then report the first failure."""
        failures: list[FSError] = []
        for cf in list(self.files.files.values()):
            if cf.dirty:
                try:
                    await self.flush_file(cf)
                except FSError as exc:
                    failures.append(exc)
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
        mtime: float | None = None,
    ) -> Info:
        """chmod/chown/utimens: kept in memory for now (persisted in a later version)."""
        self._check_writable()
        path = self.norm(path)
        await self.getinfo(path)
        attrs = self._attrs.setdefault(self.key(path), {})
        if mode is not None:
            attrs["mode"] = stat.S_IMODE(mode)
        if uid is not None:
            attrs["uid"] = uid
        if gid is not None:
            attrs["gid"] = gid
        if mtime is not None:
            attrs["mtime"] = mtime
        return await self.getinfo(path)

    # -- rename, move, copy -----------------------------------------------------------------

    async def rename(self, src: str, dst: str, *, replace_existing: bool = True) -> None:
        """rename(2): a file by server-side copy + delete; a directory key by key."""
        self._check_writable()
        src, dst = self.norm(src), self.norm(dst)
        if src == dst:
            return
        if dst.startswith(src + "/") or src == "/":
            raise InvalidPath(f"cannot move {src} into itself")
        sinfo = await self.getinfo(src)
        try:
            dinfo: Info | None = await self.getinfo(dst)
        except ResourceNotFound:
            dinfo = None
            dparent = self._split(dst)[0]
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
        cf = self.files.files.get(skey)
        if dinfo is not None and dkey in self.files.files:
            self._forget_file(dkey)
        async with contextlib.AsyncExitStack() as stack:
            src_remote = sinfo.etag is not None
            if cf is not None:
                await stack.enter_async_context(cf.upload_lock)  # no upload in flight
                src_remote = cf.etag is not None
            if cf is not None and (cf.dirty or cf.etag is None):
                # Local data not in S3 yet: upload it straight under the new name.
                await cf.ensure(0, cf.size)  # what is still only in S3 comes from the old key
                self._rekey(skey, dkey)
                await self._upload_locked(cf)
            else:
                await self.run(
                    self.storage.copy, self._name(skey), self._name(dkey), size=sinfo.size
                )
                if cf is not None:
                    self._rekey(skey, dkey)
            if src_remote:
                await self.run(self.storage.delete, self._name(skey))
        self._move_attrs(skey, dkey)
        sp, sn = self._split(src)
        dp, dn = self._split(dst)
        self.listings.remove_entry(self.dir_key(sp), sn)
        self.listings.set_entry(
            self.dir_key(dp), Entry(dn, False, sinfo.size, sinfo.mtime, sinfo.etag)
        )

    async def _rename_dir(self, src: str, dst: str) -> None:
        sdk, ddk = self.dir_key(src), self.dir_key(dst)
        async with contextlib.AsyncExitStack() as stack:
            for key, cf in list(self.files.files.items()):
                if key.startswith(sdk):
                    await stack.enter_async_context(cf.upload_lock)
                    await self._upload_locked(cf)
            await self._move_tree(sdk, ddk)
        sp, sn = self._split(src)
        dp, dn = self._split(dst)
        self.listings.remove_entry(self.dir_key(sp), sn)
        self.listings.set_entry(self.dir_key(dp), Entry(dn, True, mtime=time.time()))
        self.listings.invalidate_tree(sdk)
        self.listings.invalidate_tree(ddk)

    async def _move_tree(self, sdk: str, ddk: str) -> None:
        """Copy every key below ``sdk`` to ``ddk`` (in parallel), then delete the originals."""
        objects = await self.run(
            lambda: list(self.storage.bucket_list_keys(self.bucket, prefix=sdk))
        )
        keys = [o.key for o in objects]

        async def copy_one(o: S3Key) -> None:
            dst = self._name(ddk + o.key[len(sdk) :])
            await self.run(self.storage.copy, self._name(o.key), dst, size=o.size)

        try:
            async with trio.open_nursery() as nursery:
                for o in objects:
                    nursery.start_soon(copy_one, o)
        except ExceptionGroup as group:
            raise first_leaf(group) from None
        if sdk not in keys:
            # Keep the moved directory even when it was implicit and is empty now.
            await self._put_marker(ddk)
        await self.run(self.storage.delete_many, keys, self.bucket)
        for key in [k for k in self.files.files if k.startswith(sdk)]:
            self._rekey(key, ddk + key[len(sdk) :])
        self._move_attrs(sdk[:-1], ddk[:-1])
        for key in [k for k in self._attrs if k.startswith(sdk)]:
            self._move_attrs(key, ddk + key[len(sdk) :])

    def _rekey(self, skey: str, dkey: str) -> None:
        """An open file now belongs to another key (after a rename)."""
        cf = self.files.files.pop(skey)
        cf.key = dkey
        cf._fetch = self._fetcher(dkey)
        self.files.files[dkey] = cf

    def _written(self, key: str) -> None:
        """A write sets mtime to now: drop an mtime set earlier by utimens."""
        attrs = self._attrs.get(key)
        if attrs:
            attrs.pop("mtime", None)

    def _move_attrs(self, skey: str, dkey: str) -> None:
        attrs = self._attrs.pop(skey, None)
        if attrs is not None:
            self._attrs[dkey] = attrs

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
        info = await self.run(
            self.storage.copy, self._name(self.key(src)), self._name(self.key(dst))
        )
        dp, dn = self._split(dst)
        self.listings.set_entry(
            self.dir_key(dp),
            Entry(dn, False, info.size, info.last_modified.timestamp(), info.etag),
        )

    # -- URLs and metadata ------------------------------------------------------------------

    async def getpathurl(self, path: str, allow_none: bool = False, expires: int = 3600) -> str:
        return await self.run(self.storage.presigned_url, self._name(self.key(path)), expires)

    async def makepublic(self, path: str) -> None:
        self._check_writable()
        try:
            await self.run(self.storage.make_public, self._name(self.key(path)))
        except NotFound:
            raise ResourceNotFound(path) from None

    async def getmeta(self, path: str) -> dict[str, str]:
        try:
            info = await self.run(self.storage.head, self._name(self.key(path)))
        except NotFound:
            raise ResourceNotFound(path) from None
        return info.metadata

    async def setmeta(self, path: str, metadata: dict[str, str]) -> None:
        self._check_writable()
        try:
            info = await self.run(
                self.storage.update_metadata, self._name(self.key(path)), metadata
            )
        except NotFound:
            raise ResourceNotFound(path) from None
        dp, dn = self._split(self.norm(path))
        self.listings.set_entry(
            self.dir_key(dp),
            Entry(dn, False, info.size, info.last_modified.timestamp(), info.etag),
        )

    def invalidate(self, path: str = "/") -> None:
        """Forget cached listings at and below ``path`` (someone changed the bucket)."""
        self.listings.invalidate_tree(self.dir_key(path))


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

    async def pread(self, off: int, size: int) -> bytes:
        # The kernel sends readahead requests concurrently, slightly out of order.
        if abs(off - self._next_sequential) <= SEQUENTIAL_SLACK:
            self._readahead = min(max(self._readahead * 2, size * 4), MAX_READAHEAD)
        else:
            self._readahead = 0
        bg = self.fs.background
        data = await self.cf.read(off, size, self._readahead, bg.start_soon if bg else None)
        self._next_sequential = max(self._next_sequential, off + len(data))
        return data

    async def pwrite(self, off: int, data: bytes) -> int:
        if not self.writable:
            raise FSError("file not open for writing")
        n = await self.cf.write(off, data)
        self.cf.mtime = time.time()
        self.fs._written(self.cf.key)
        return n

    async def truncate(self, size: int) -> None:
        self.fs._check_writable()
        await self.cf.truncate(size)
        self.cf.mtime = time.time()
        self.fs._written(self.cf.key)

    def info(self) -> Info:
        """Attributes of the open file (also after it was unlinked)."""
        return Info(self.path, False, self.cf.size, self.cf.mtime or 0.0, self.cf.etag)

    @property
    def size(self) -> int:
        return self.cf.size

    # file-like API
    async def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = max(self.cf.size - self.pos, 0)
        data = await self.pread(self.pos, size)
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
        await self.flush()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.fs.release_file(self.cf, self.writable)

    async def __aenter__(self) -> OpenFile:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _makedirs_private(path: str) -> None:
    """mkdir -p where every directory created is 0700."""
    if os.path.isdir(path):
        return
    _makedirs_private(os.path.dirname(path))
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
