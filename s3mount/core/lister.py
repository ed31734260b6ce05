"""Directory listings as programs need them, fetched from S3.

One LIST (or run of pages) per stale directory however many programs ask; a background
**walk** of a subtree, flat, when a program looks like it is going through it (``ls -R``,
``find``, ``du``); and, for a lookup in a directory too big for one page, a probe of the one
name instead of the whole listing.  What is fetched goes into the :class:`ListingCache`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from s3mount.core.deletes import DeleteQueue
from s3mount.core.errors import first_leaf
from s3mount.core.keys import KeySpace
from s3mount.core.listing import (
    DirListing,
    Entry,
    Gathered,
    ListingCache,
    TreeGatherer,
    entries_from_pages,
)
from s3mount.core.metadata import MetaCache, ObjectMeta
from s3mount.core.resolver import MetadataResolver
from s3mount.core.runner import ThreadRunner
from s3mount.storage import ListPage, NotFound, ObjectInfo, Storage

log = logging.getLogger(__name__)

PRESAMPLE_MAX = 1000  # directories a walk samples in the background (it may list 50,000)
WALK_PAGES = 50  # a subtree's flat listing stops after this many pages (50,000 keys)
# A walk is a guess about where a program goes next: it lists at most WALK_LEAD pages
# beyond the last listing a program took from it, then waits WALK_PAUSE seconds for a
# program to want more, and stops.
WALK_LEAD = 3
WALK_PAUSE = 2.0


@dataclass(eq=False)  # compared by identity
class Walk:
    """A flat listing of the subtree below ``root`` in progress (see Lister._walk).  It goes
    on only while programs use what it lists: ``ls`` of a bucket's top, or lookups in two
    of its directories, must not list 50,000 keys no program asks for."""

    root: str
    last: str = ""  # the last key listed so far
    pages: int = 0  # pages listed so far
    budget: int = WALK_LEAD  # pages it may list
    outrun: bool = False  # programs went ahead of it: it stops
    stored: set[str] = field(default_factory=set)  # directories it cached
    presampled: int = 0  # directories whose metadata sample it started (PRESAMPLE_MAX)
    progress: trio.Event = field(default_factory=trio.Event)
    wanted: trio.Event = field(default_factory=trio.Event)  # set when the budget grows

    def step(self) -> None:
        self.progress.set()
        self.progress = trio.Event()

    def used(self, reached: bool = True) -> None:
        """A program took, or waits for, a listing this walk makes: it may go on WALK_LEAD
        pages further (one page, for a directory it has not got to yet)."""
        if not self.outrun:
            lead = WALK_LEAD if reached else 1
            self.budget = min(WALK_PAGES, max(self.budget, self.pages + lead))
            self.wanted.set()

    async def may_go_on(self) -> bool:
        """Whether to list another page (at the end of its budget, it waits a little for
        programs to want more)."""
        if self.pages < self.budget:
            return True
        if self.outrun or self.pages >= WALK_PAGES:
            return False
        self.wanted = trio.Event()
        with trio.move_on_after(WALK_PAUSE):
            await self.wanted.wait()
        return self.pages < self.budget

    def overtaken(self) -> None:
        """A walk of a subtree this walk has not got to starts (a program went there first):
        this one stops after the page it is listing, instead of listing that again."""
        self.outrun = True
        self.budget = min(self.budget, self.pages + 1)

    def will_list(self, dkey: str) -> bool:
        """Whether this walk is still to complete the listing of ``dkey``."""
        return (
            dkey.startswith(self.root)
            and dkey != self.root
            and (self.last < dkey or self.last.startswith(dkey))
        )

    def reached(self, dkey: str) -> bool:
        """Whether this walk's pages have got to ``dkey`` (a directory below its root)."""
        return self.last >= dkey


class Lister:
    """Fetches directory listings for the file system over ``keys``, into ``listings``."""

    def __init__(
        self,
        keys: KeySpace,
        storage: Storage,
        run: ThreadRunner,
        listings: ListingCache,
        deletes: DeleteQueue,
        resolver: MetadataResolver,
        meta_cache: MetaCache,
        stats: Counter[str],
    ):
        self.keys = keys
        self.storage = storage
        self.run = run
        self.listings = listings
        self.deletes = deletes
        self.resolver = resolver
        self.meta_cache = meta_cache
        self.stats = stats
        self.background: trio.Nursery | None = None  # walks and big listings; the daemon's
        self._listing_inflight: dict[str, trio.Event] = {}
        self._listing_big: set[str] = set()  # of those, directories of more than one page
        self._walks: dict[str, Walk] = {}  # flat listings of subtrees, by their root key
        self._lookups_below: dict[str, int] = {}  # dir key -> its subdirs listed for lookups
        # Directories whose tree a program is going through (readdir of one with subdirs)
        # -> when it was last read: the walked directories below them are presampled.
        self._enumerated: dict[str, float] = {}

    async def listing(self, path: str, readdir: bool = False) -> DirListing:
        listing = await self.listing_or_big(path, readdir)
        assert listing is not None
        return listing

    async def listing_or_big(
        self, path: str, readdir: bool = False, big_ok: bool = False
    ) -> DirListing | None:
        """The cached listing of a directory, fetched (once, however many ask) when stale.

        ``big_ok`` (a lookup): None when the directory takes more than one page to list and
        is not listed yet; the rest of its pages are then listed in the background, and the
        caller asks S3 about its one name (:meth:`probe`), instead of waiting for a listing
        of maybe a million keys.

        A walk of a subtree (:meth:`_walk`) starts when a program looks like it is going
        through it: a ``readdir`` of a directory with subdirectories (``ls -R``, ``find``),
        or lookups in a second subdirectory of one directory (``stat`` of many paths); a
        lookup along one path (``cat a/b/c``) lists only the directories on it.  A directory
        that a walk has got to waits for the walk to complete it; one the walk has not got
        to yet waits for one more page at most (the walk may be far behind: the walk of a
        whole bucket, pages away from the directory a program now reads)."""
        dkey = self.keys.dir_key(path)
        waited: list[Walk] = []
        while True:
            listing = self.listings.get(dkey)
            if listing is not None:
                self.stats["listing_hits"] += 1
                for w in self._walks.values():
                    if dkey in w.stored:
                        w.used()
                if readdir:
                    self._note_enumeration(dkey, listing)
                return listing
            pending = self._listing_inflight.get(dkey)
            if pending is not None:
                if big_ok and dkey in self._listing_big:
                    return None
                await pending.wait()
                continue
            walk = max((w for w in self._walks.values() if w.will_list(dkey)),
                       key=lambda w: len(w.root), default=None)  # fmt: skip
            reached = walk is not None and walk.reached(dkey)
            if walk is not None and (reached or walk not in waited):
                walk.used(reached)
                waited.append(walk)
                await walk.progress.wait()
                continue
            done = self._listing_inflight[dkey] = trio.Event()
            self.stats["listing_misses"] += 1
            handed_off = False
            try:
                await self.deletes.flush(dkey)  # S3's answer must not hold deleted keys
                self.listings.begin_fetch(dkey)  # local changes meanwhile are replayed on it
                try:
                    pages_left = self.storage.list_pages(
                        self.keys.bucket, dkey, delimiter=self.keys.sep
                    )
                    pages = [await self.run.read(next, pages_left)]
                    if pages[0].more and big_ok and self.background is not None:
                        self._listing_big.add(dkey)
                        self.background.start_soon(self._list_rest, dkey, pages_left, pages, done)
                        handed_off = True
                        return None
                    pages += await self.run.read(list, pages_left)
                except BaseException:
                    self.listings.abort_fetch(dkey)
                    raise
                listing = self.listings.put(dkey, *entries_from_pages(dkey, pages))
            finally:
                if not handed_off:
                    del self._listing_inflight[dkey]
                    done.set()
            if readdir:
                self._note_enumeration(dkey, listing)
                self._maybe_walk(dkey, listing)
            elif dkey != self.keys.prefix:
                parent = self.keys.dir_key_of(dkey[: -len(self.keys.sep)])[0]
                self._lookups_below[parent] = self._lookups_below.get(parent, 0) + 1
                above = self.listings.get(parent)
                if self._lookups_below[parent] >= 2 and above is not None:
                    self._maybe_walk(parent, above)
            return listing

    async def _list_rest(
        self, dkey: str, pages_left: Iterator[ListPage], pages: list[ListPage], done: trio.Event
    ) -> None:
        """The other pages of a big directory's listing, in the background (see
        :meth:`listing_or_big`); on failure, the next reader lists it again."""
        try:
            pages += await self.run.read(list, pages_left)
            self.listings.put(dkey, *entries_from_pages(dkey, pages))
        except BaseException as exc:
            self.listings.abort_fetch(dkey)
            if not isinstance(exc, Exception):
                raise
            log.debug("listing of %s failed: %s", dkey or "/", exc)
        finally:
            self._listing_big.discard(dkey)
            del self._listing_inflight[dkey]
            done.set()

    async def probe(self, path: str) -> Entry | None:
        """A lookup of ``path`` asked of S3 directly: a HEAD of its key (a file) and a
        one-key LIST below it (a directory), in parallel; for a name in a directory still
        being listed (:meth:`listing_or_big`).  The HEAD brings the file's metadata too."""
        key = self.keys.key(path)
        found: dict[str, ObjectInfo | bool] = {}

        async def file() -> None:
            if self.deletes.hides(key):
                return  # unlinked here, its delete not sent yet
            with contextlib.suppress(NotFound):
                found["file"] = await self.run.read(self.storage.head, self.keys.s3name(key))

        async def directory() -> None:
            below = key + self.keys.sep
            await self.deletes.flush(below)
            page = await self.run.read(
                next, self.storage.list_pages(self.keys.bucket, below, page_size=1), None
            )
            found["dir"] = page is not None and bool(page.keys or page.prefixes)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(file)
                nursery.start_soon(directory)
        except ExceptionGroup as group:
            raise first_leaf(group) from None
        self.stats["lookup_probes"] += 1
        name = self.keys.split(path)[1]
        if found.get("dir"):  # a directory wins over a file, as in a listing
            return Entry(name, True)
        info = found.get("file")
        if not isinstance(info, ObjectInfo):
            return None
        modified = info.last_modified.timestamp()
        meta = ObjectMeta(info.metadata, info.content_type)
        self.meta_cache.put(self.keys.meta_key(path, False), info.etag, modified, meta)
        return Entry(name, False, info.size, modified, info.etag, meta)

    def _enumeration(self, dkey: str) -> str | None:
        """The directory holding ``dkey`` whose tree a program is going through, if any."""
        now = time.monotonic()
        return next((root for root, at in self._enumerated.items()
                     if dkey.startswith(root) and now - at <= self.listings.ttl), None)  # fmt: skip

    def _note_enumeration(self, dkey: str, listing: DirListing) -> None:
        """A ``readdir`` of ``dkey``.  With subdirectories, a program may be going through
        its tree (``ls -R``, ``find``, ``du``) for the next listing TTL: the directories
        below that are listed already, and those a walk lists from now on, get their
        metadata sample ahead of it.  Only then: a walk of the whole bucket (``ls`` of the
        top, lookups in two top-level directories) must not sample 1,000 directories that
        no program visits, while a program works elsewhere."""
        if listing.subdirs() < 2:
            return
        now = time.monotonic()
        for root, at in list(self._enumerated.items()):
            if now - at > self.listings.ttl:
                del self._enumerated[root]
        root = self._enumeration(dkey)
        self._enumerated[root if root is not None else dkey] = now
        if root is None:
            for below in self.listings.unsampled_below(dkey)[:PRESAMPLE_MAX]:
                self._presample(below, dkey)

    def _presample(self, dkey: str, root: str) -> None:
        if self.resolver.mode == "auto" and self.background is not None:
            self.background.start_soon(self.resolver.presample, dkey, root)

    def _maybe_walk(self, dkey: str, listing: DirListing) -> None:
        """Start a walk of ``dkey``'s subtree unless it has < 2 subdirs or a walk covering
        it has got to it (one that has not, stops: this one lists the subtree now)."""
        if (
            listing.subdirs() > 1
            and self.background is not None
            and not any(
                dkey.startswith(w.root) and (w.root == dkey or w.reached(dkey))
                for w in self._walks.values()
            )
        ):
            self._lookups_below.pop(dkey, None)
            for w in self._walks.values():
                if dkey.startswith(w.root):  # it has not got here (tested above)
                    w.overtaken()
            self._walks[dkey] = walk = Walk(dkey)
            self.background.start_soon(self._walk, walk)

    async def _walk(self, walk: Walk) -> None:
        """List a subtree flat (no delimiter), and cache each directory's listing as soon as
        the pages have passed it: one request per 1,000 keys instead of one per directory,
        in the order ``find``, ``ls -R``, ``du`` or ``rsync`` visit them."""
        gatherer = TreeGatherer(walk.root, self.keys.sep)
        mark = self.listings.changes

        def store(done: list[Gathered]) -> None:
            for dkey, entries, hidden, own_marker in done:
                if (
                    not self.listings.cached(dkey)
                    and not self.listings.changed_since(dkey, mark)
                    and dkey not in self._listing_inflight  # its own LIST is on the way
                ):
                    self.listings.put(dkey, entries, hidden, own_marker)
                    self.stats["listing_walked"] += 1
                    walk.stored.add(dkey)
                    root = self._enumeration(dkey)
                    if root is not None and walk.presampled < PRESAMPLE_MAX:
                        walk.presampled += 1
                        self._presample(dkey, root)

        try:
            await self.deletes.flush(walk.root)
            pages = self.storage.list_pages(self.keys.bucket, walk.root)
            while await walk.may_go_on():
                page = await self.run.read(next, pages, None)
                walk.pages += 1
                if page is None:
                    store(gatherer.finish())
                    break
                store(gatherer.feed(page.keys))
                if page.keys:
                    walk.last = page.keys[-1].key
                walk.step()
        except Exception as exc:  # readers list what they need themselves
            log.debug("walk of %s failed: %s", walk.root or "/", exc)
        finally:
            del self._walks[walk.root]
            walk.step()
