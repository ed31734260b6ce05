"""The directory listing cache: one ListObjectsV2 (delimiter '/') per directory, kept for a TTL.

A listing gives every entry's name, type, size, mtime and ETag, so ``ls -l`` of a directory
costs one paginated LIST and no HEAD per entry.  Local changes (create, write, unlink, mkdir,
rename) update cached listings at once; a name missing from a fresh listing is a cached
negative answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from s3mount.core.metadata import ObjectMeta
from s3mount.storage import ListPage, S3Key

log = logging.getLogger(__name__)

NAME_MAX = 255


@dataclass
class Entry:
    """One name in a directory, as known from a listing or from a local change."""

    name: str
    is_dir: bool
    size: int = 0
    mtime: float = 0.0  # LastModified of the object (of the marker, for a directory)
    etag: str | None = None
    meta: ObjectMeta | None = None  # user metadata, once a HEAD or the cache told it
    # A directory: whether a marker object holds its metadata (False: a flat listing showed
    # none, it exists only as a key prefix; None: not known, as from a delimiter listing).
    marker: bool | None = None


@dataclass
class DirListing:
    entries: dict[str, Entry]
    fetched: float = field(default_factory=time.monotonic)
    hidden: int = 0  # keys (or prefixes) below the directory that cannot be shown as names
    plain: bool | None = None  # its objects carry no POSIX metadata (sampled; None: unknown)
    # Whether S3 held the directory's own marker object when it was listed (None: unknown).
    own_marker: bool | None = None

    def subdirs(self) -> int:
        return sum(1 for e in self.entries.values() if e.is_dir)


def usable_name(name: str) -> bool:
    """Whether a key component can be shown as a file name (others are skipped)."""
    return (
        name not in ("", ".", "..")
        and "\0" not in name
        and len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX
    )


def entries_from_pages(dir_key: str, pages: list[ListPage]) -> tuple[dict[str, Entry], int, bool]:
    """Build a directory's entries from its listing pages (keys under ``dir_key``); also
    return how many keys and prefixes were skipped as unusable names, and whether the
    directory's own marker object was listed."""
    entries: dict[str, Entry] = {}
    skipped = 0
    own_marker = False
    for page in pages:
        for k in page.keys:
            name = k.key[len(dir_key) :]
            if name == "":
                own_marker = True
                continue
            if not usable_name(name):
                skipped += 1
                continue
            entries[name] = Entry(
                name=name,
                is_dir=False,
                size=k.size,
                mtime=k.last_modified.timestamp(),
                etag=k.etag,
            )
        for p in page.prefixes:
            name = p[len(dir_key) : -1]
            if not usable_name(name):
                skipped += 1
                continue
            if name in entries:
                log.warning("key %s%s is hidden by the directory %s", dir_key, name, p)
            entries[name] = Entry(name=name, is_dir=True)  # a directory wins over a file
    return entries, skipped, own_marker


Gathered = tuple[str, dict[str, Entry], int, bool]


class TreeGatherer:
    """Builds the listings of every directory below ``root`` from one flat (no delimiter)
    listing of its keys, page by page.

    Keys come in UTF-8 order, so all keys of a directory are contiguous: once a page ends
    past a directory's range, its listing is complete.  ``feed`` returns the directories
    completed by a page, ``finish`` the rest, each as (dir key, entries, hidden names,
    whether its own marker object was listed); ``root`` itself is never returned: its own
    delimiter listing is what readers asked for.

    A flat listing also shows which subdirectories have a marker object (``Entry.marker``):
    those without one have no metadata to ask S3 for.
    """

    def __init__(self, root: str, sep: str = "/"):
        self.root = root
        self.sep = sep
        self._open: dict[str, tuple[dict[str, Entry], list[int]]] = {}  # dir key -> entries
        self._markers: set[str] = set()  # dir keys below root whose marker object was listed

    def _dir(self, dkey: str) -> tuple[dict[str, Entry], list[int]]:
        found = self._open.get(dkey)
        if found is None:
            found = self._open[dkey] = ({}, [0])
        return found

    def feed(self, keys: list[S3Key]) -> list[Gathered]:
        for k in keys:
            parts = k.key[len(self.root) :].split(self.sep)
            dkey = self.root
            for part in parts[:-1]:  # every directory on the way holds the next one
                entries, hidden = self._dir(dkey)
                if not usable_name(part):
                    hidden[0] += 1
                    break
                entries[part] = Entry(name=part, is_dir=True)
                dkey += part + self.sep
            else:
                entries, hidden = self._dir(dkey)
                name = parts[-1]
                if name == "":
                    self._markers.add(dkey)  # the directory's own marker object
                    continue
                if not usable_name(name):
                    hidden[0] += 1
                elif not (name in entries and entries[name].is_dir):  # a directory wins
                    entries[name] = Entry(name, False, k.size, k.last_modified.timestamp(),
                                          k.etag)  # fmt: skip
        if not keys:
            return []
        last = keys[-1].key
        done = [d for d in self._open if d != self.root and not last.startswith(d)]
        return self._close_all(done)

    def finish(self) -> list[Gathered]:
        return self._close_all([d for d in self._open if d != self.root])

    def _close_all(self, dkeys: list[str]) -> list[Gathered]:
        # Each one's own marker first: a parent closing in the same batch forgets it.
        own = {d: d in self._markers for d in dkeys}
        return [(*self._close(d), own[d]) for d in dkeys]

    def _close(self, dkey: str) -> tuple[str, dict[str, Entry], int]:
        entries, hidden = self._open.pop(dkey)
        for e in entries.values():  # every key below dkey has been seen: markers too
            if e.is_dir:
                sub = dkey + e.name + self.sep
                e.marker = sub in self._markers
                self._markers.discard(sub)
        return dkey, entries, hidden[0]


def _expire(listing: DirListing) -> None:
    """A listing answered before an invalidation: used once by its asker, then fetched again."""
    listing.fetched = float("-inf")


class ListingCache:
    def __init__(self, ttl: float):
        self.ttl = ttl
        self._dirs: dict[str, DirListing] = {}
        # Whether a directory is plain outlives its listing's TTL (not an invalidation).
        self._plain: dict[str, bool] = {}
        # Local changes, counted: a listing fetched before one must not be stored after it.
        self.changes = 0
        self._changed_at: dict[str, int] = {}  # dir key -> `changes` at its last change
        self._tree_changed_at = 0  # `changes` at the last invalidate_tree
        # Local changes made while a directory's LIST is in flight, replayed on its answer.
        self._while_fetching: dict[str, list[Callable[[DirListing], None]]] = {}

    def begin_fetch(self, dir_key: str) -> None:
        self._while_fetching[dir_key] = []

    def abort_fetch(self, dir_key: str) -> None:
        self._while_fetching.pop(dir_key, None)

    def _replay(self, dir_key: str, op: Callable[[DirListing], None]) -> None:
        ops = self._while_fetching.get(dir_key)
        if ops is not None:
            ops.append(op)

    def _touch(self, dir_key: str) -> None:
        self.changes += 1
        self._changed_at[dir_key] = self.changes

    def changed_since(self, dir_key: str, mark: int) -> bool:
        """Whether ``dir_key`` changed locally after ``changes`` was ``mark``."""
        return self._changed_at.get(dir_key, 0) > mark or self._tree_changed_at > mark

    def get(self, dir_key: str) -> DirListing | None:
        listing = self._dirs.get(dir_key)
        if listing is None:
            return None
        if time.monotonic() - listing.fetched > self.ttl:
            del self._dirs[dir_key]
            if listing.plain is not None:
                self._plain[dir_key] = listing.plain
            return None
        return listing

    def cached(self, dir_key: str) -> bool:
        return self.get(dir_key) is not None

    def unsampled_below(self, dir_key: str) -> list[str]:
        """The cached listings below ``dir_key`` not yet found plain or not, in key order."""
        below = (k for k in self._dirs if k != dir_key and k.startswith(dir_key))
        return sorted(k for k in below if self._dirs[k].plain is None)

    def put(
        self,
        dir_key: str,
        entries: dict[str, Entry],
        hidden: int = 0,
        own_marker: bool | None = None,
    ) -> DirListing:
        if hidden:
            log.info("%s: skipped %d keys that cannot be file names", dir_key or "/", hidden)
        plain = self._plain.pop(dir_key, None)
        listing = DirListing(entries, hidden=hidden, plain=plain, own_marker=own_marker)
        for op in self._while_fetching.pop(dir_key, []):
            op(listing)
        self._dirs[dir_key] = listing
        return listing

    def set_entry(self, dir_key: str, entry: Entry) -> None:
        """Record a local change in the cached listing of ``dir_key`` (if any)."""
        self._touch(dir_key)
        listing = self._dirs.get(dir_key)
        if listing is not None:
            listing.entries[entry.name] = entry
        self._replay(dir_key, lambda listing: listing.entries.__setitem__(entry.name, entry))

    def remove_entry(self, dir_key: str, name: str) -> None:
        self._touch(dir_key)
        listing = self._dirs.get(dir_key)
        if listing is not None:
            listing.entries.pop(name, None)
        self._replay(dir_key, lambda listing: listing.entries.pop(name, None))

    def invalidate(self, dir_key: str) -> None:
        self._touch(dir_key)
        self._dirs.pop(dir_key, None)
        self._replay(dir_key, _expire)
        self._plain.pop(dir_key, None)

    def invalidate_tree(self, dir_key: str) -> None:
        self.changes += 1
        self._tree_changed_at = self.changes
        for k in [k for k in self._while_fetching if k.startswith(dir_key)]:
            self._replay(k, _expire)
        for k in [k for k in self._dirs if k.startswith(dir_key)]:
            del self._dirs[k]
        for k in [k for k in self._plain if k.startswith(dir_key)]:
            del self._plain[k]
