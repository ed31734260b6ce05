"""POSIX metadata for listed entries: from the local metadata cache, else from S3.

A LIST gives names, sizes, mtimes and ETags, not the mode, owner and times s3mount keeps in
user metadata.  How entries the cache does not know get theirs is the mount's ``metadata``
mode: "head" (a HEAD each), "listing" (none: the defaults) or "auto" (a few sample HEADs per
directory decide whether its objects carry metadata at all; see docs/semantics.md).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections import Counter

import trio

from s3mount.core.errors import ResourceNotFound, first_leaf
from s3mount.core.keys import KeySpace
from s3mount.core.listing import DirListing, Entry, ListingCache
from s3mount.core.metadata import METADATA_MODES, MetaCache, ObjectMeta
from s3mount.core.runner import ThreadRunner
from s3mount.storage import NotFound, Storage

log = logging.getLogger(__name__)

META_SAMPLE = 4  # HEADs that decide whether a directory's objects carry metadata ("auto")
PRESAMPLE_DIRS = 16  # walked directories sampled at once, ahead of the program


class MetadataResolver:
    """Gives listed entries their metadata (``Entry.meta``), with one HEAD per key in flight
    and one sample per directory in flight, however many callers ask at once."""

    def __init__(
        self,
        keys: KeySpace,
        storage: Storage,
        run: ThreadRunner,
        listings: ListingCache,
        cache: MetaCache,
        stats: Counter[str],
        mode: str = "auto",
    ):
        if mode not in METADATA_MODES:
            raise ValueError(f"metadata must be one of {', '.join(METADATA_MODES)}")
        self.keys = keys
        self.storage = storage
        self.run = run
        self.listings = listings
        self.cache = cache
        self.stats = stats
        self.mode = mode
        self._head_inflight: dict[str, trio.Event] = {}
        self._sampling: dict[str, trio.Event] = {}  # dir keys whose sample HEADs are in flight
        # Walked directories are sampled in the background, PRESAMPLE_DIRS at a time (as
        # many as the default worker threads: a program's own request waits for the first
        # HEAD to finish, a round trip at most; with 4 at a time the bench's cold find +
        # stat took 1.1-1.3 s, with 16 0.8-0.9 s).
        self._presample_limiter = trio.CapacityLimiter(PRESAMPLE_DIRS)

    async def verify(self, dir_path: str, entries: list[Entry], missing_ok: bool = False) -> None:
        """Give every entry its metadata: from the local cache, else as ``self.mode`` says.

        "head": HEADs in parallel for every entry the cache does not know.  "listing": no
        HEAD; unknown entries get the mount's defaults.  "auto": a directory's first
        unknown entries are sampled with HEADs (in parallel, one round trip); when none of
        them carries POSIX metadata the directory is taken as plain (written by a tool that
        stores none) and the rest get the defaults, else every unknown entry is HEADed.
        A file found deleted meanwhile leaves the listing (and raises ResourceNotFound,
        unless ``missing_ok``).
        """
        todo = self._unknown(dir_path, entries)
        if not todo:
            if self.mode == "auto":
                listing = self.listings.get(self.keys.dir_key(dir_path))
                if listing is not None:
                    _plain_if_all_known(listing)
            return
        if self.mode == "listing":
            self._assume_plain(todo)
            return
        if self.mode == "auto":
            listing = self.listings.get(self.keys.dir_key(dir_path))
            if listing is not None and listing.plain is None:
                below_plain = dir_path != "/" and self._is_plain(self._parent_key(dir_path))
                await self._sample(dir_path, listing, todo, 1 if below_plain else META_SAMPLE)
                todo = [(k, e) for k, e in todo if e.meta is None]
            if listing is not None and listing.plain:
                self._assume_plain(todo)
                return
        await self._heads(dir_path, todo, missing_ok=missing_ok)

    async def _sample(
        self, dir_path: str, listing: DirListing, todo: list[tuple[str, Entry]], n: int
    ) -> None:
        """Decide ``listing.plain`` from HEADs of ``n`` unknown entries (those asked for
        first, filled up with siblings); once, however many ask at the same time.  No HEAD
        when an earlier sample (of this mount or one before, with the cache kept) found the
        directory plain while it held the same files."""
        dkey = self.keys.dir_key(dir_path)
        pending = self._sampling.get(dkey)
        if pending is not None:
            await pending.wait()
            return
        done = self._sampling[dkey] = trio.Event()
        try:
            files = _fingerprint(listing)
            if self.cache.plain_fingerprint(dkey) == files:
                self.stats["meta_plain_remembered"] += 1
                listing.plain = True
                return
            sample = list(todo[:n])
            if len(sample) < n:
                ids = {id(e) for _, e in sample}
                others = [e for e in listing.entries.values() if id(e) not in ids]
                sample += self._unknown(dir_path, others)[: n - len(sample)]
            await self._heads(dir_path, sample, missing_ok=True)
            listing.plain = not any(e.meta and e.meta.has_posix for _, e in sample)
            self.cache.set_plain(dkey, files if listing.plain else None)
        finally:
            del self._sampling[dkey]
            done.set()

    async def presample(self, dkey: str, walk_root: str) -> None:
        """Sample a listed directory before the program gets there (``find`` and ``ls -lR``
        would otherwise wait for one HEAD per directory, one directory after another).
        ``walk_root``: the directory the program is going through (Lister._note_enumeration);
        one HEAD when it is plain, as below any plain directory.  Only for the "auto" mode
        (the caller checks it)."""
        async with self._presample_limiter:
            listing = self.listings.get(dkey)
            if listing is None or listing.plain is not None or dkey in self._sampling:
                return
            path = self.keys.path_of_dir_key(dkey)
            todo = self._unknown(path, list(listing.entries.values()))
            if not todo:  # all known (cached, or directories without a marker): no HEAD
                _plain_if_all_known(listing)
                return
            pending = self._sampling.get(walk_root)
            if pending is not None:  # the program's readdir of it
                await pending.wait()
            below_plain = self._is_plain(walk_root) or self._is_plain(self._parent_key(path))
            n = 1 if below_plain else META_SAMPLE
            try:
                await self._sample(path, listing, todo, n)
            except Exception as exc:  # the program's own lookups sample it then
                log.debug("metadata sample of %s failed: %s", path, exc)

    def _parent_key(self, dir_path: str) -> str:
        return self.keys.dir_key(self.keys.split(dir_path)[0])

    def _is_plain(self, dkey: str) -> bool:
        """Whether the cached listing of ``dkey`` is known plain (decided now when all its
        entries are known)."""
        listing = self.listings.get(dkey)
        if listing is None:
            return False
        _plain_if_all_known(listing)
        return bool(listing.plain)

    def _unknown(self, dir_path: str, entries: list[Entry]) -> list[tuple[str, Entry]]:
        """The entries without metadata (taking what the cache knows), with their meta key."""
        todo: list[tuple[str, Entry]] = []
        for e in entries:
            if e.meta is not None:
                continue
            mkey = self.keys.meta_key(posixpath.join(dir_path, e.name), e.is_dir)
            cached = (
                self.cache.get(mkey, None, None)
                if e.is_dir
                else self.cache.get(mkey, e.etag, e.mtime)
            )
            if cached is not None:
                e.meta = cached
                self.stats["meta_hits"] += 1
            elif e.is_dir and e.marker is False:  # no object to ask: the defaults
                e.meta = ObjectMeta()
            else:
                todo.append((mkey, e))
        return todo

    def _assume_plain(self, todo: list[tuple[str, Entry]]) -> None:
        """Listing attributes and the mount's defaults, for this listing's lifetime (the
        metadata cache is not told: a later listing may sample again)."""
        self.stats["meta_assumed"] += len(todo)
        for _, e in todo:
            e.meta = ObjectMeta()

    async def _heads(
        self, dir_path: str, todo: list[tuple[str, Entry]], missing_ok: bool = False
    ) -> None:
        """HEADs in parallel for entries without metadata."""
        self.stats["meta_misses"] += len(todo)

        async def head(mkey: str, e: Entry) -> None:
            try:
                await self._head_entry(dir_path, mkey, e)
            except ResourceNotFound:
                if not missing_ok:
                    raise

        try:
            async with trio.open_nursery() as nursery:
                for mkey, e in todo:
                    nursery.start_soon(head, mkey, e)
        except ExceptionGroup as group:
            raise first_leaf(group) from None

    async def _head_entry(self, dir_path: str, mkey: str, e: Entry) -> None:
        """One HEAD (shared by concurrent askers); the answer also refreshes the entry."""
        pending = self._head_inflight.get(mkey)
        if pending is not None:
            await pending.wait()  # the other asker's HEAD put its answer in the cache
            e.meta = e.meta or self.cache.get(mkey, None, None)
            if e.meta is not None:
                return
        done = self._head_inflight[mkey] = trio.Event()
        try:
            try:
                info = await self.run.read(self.storage.head, self.keys.s3name(mkey))
            except NotFound:
                if not e.is_dir:
                    # Deleted since it was listed.
                    self.listings.remove_entry(self.keys.dir_key(dir_path), e.name)
                    raise ResourceNotFound(posixpath.join(dir_path, e.name)) from None
                meta = ObjectMeta()  # an implicit directory: no marker, no metadata
                self.cache.put(mkey, None, None, meta)
            else:
                meta = ObjectMeta(info.metadata, info.content_type)
                modified = info.last_modified.timestamp()
                self.cache.put(mkey, info.etag, modified, meta)
                if not e.is_dir:
                    e.size, e.etag, e.mtime = info.size, info.etag, modified
            e.meta = meta
        finally:
            del self._head_inflight[mkey]
            done.set()


def _fingerprint(listing: DirListing) -> str:
    """The names and ETags of a listing's files: another version of one, or one more,
    changes it."""
    h = hashlib.blake2b(digest_size=16)
    for name, e in sorted(listing.entries.items()):
        if not e.is_dir:
            h.update(f"{name}\0{e.etag}\n".encode())
    return h.hexdigest()


def _plain_if_all_known(listing: DirListing) -> None:
    """A listing whose entries all have their metadata (cached, or directories without a
    marker) is plain unless one of them carries POSIX metadata: no sample needed."""
    entries = listing.entries.values()
    if listing.plain is None and all(e.meta is not None or e.marker is False for e in entries):
        listing.plain = not any(e.meta and e.meta.has_posix for e in entries)
