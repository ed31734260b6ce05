"""The directory listing cache: one ListObjectsV2 (delimiter '/') per directory, kept for a TTL.

A listing gives every entry's name, type, size, mtime and ETag, so ``ls -l`` of a directory
costs one paginated LIST and no HEAD per entry.  Local changes (create, write, unlink, mkdir,
rename) update cached listings at once; a name missing from a fresh listing is a cached
negative answer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from s3mount.core.metadata import ObjectMeta
from s3mount.storage import ListPage

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


@dataclass
class DirListing:
    entries: dict[str, Entry]
    fetched: float = field(default_factory=time.monotonic)
    hidden: int = 0  # keys (or prefixes) below the directory that cannot be shown as names


def usable_name(name: str) -> bool:
    """Whether a key component can be shown as a file name (others are skipped)."""
    return (
        name not in ("", ".", "..")
        and "\0" not in name
        and len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX
    )


def entries_from_pages(dir_key: str, pages: list[ListPage]) -> tuple[dict[str, Entry], int]:
    """Build a directory's entries from its listing pages (keys under ``dir_key``); also
    return how many keys and prefixes were skipped as unusable names."""
    entries: dict[str, Entry] = {}
    skipped = 0
    for page in pages:
        for k in page.keys:
            name = k.key[len(dir_key) :]
            if name == "":
                continue  # the directory's own marker object
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
    if skipped:
        log.info("%s: skipped %d keys that cannot be file names", dir_key or "/", skipped)
    return entries, skipped


class ListingCache:
    def __init__(self, ttl: float):
        self.ttl = ttl
        self._dirs: dict[str, DirListing] = {}

    def get(self, dir_key: str) -> DirListing | None:
        listing = self._dirs.get(dir_key)
        if listing is None:
            return None
        if time.monotonic() - listing.fetched > self.ttl:
            del self._dirs[dir_key]
            return None
        return listing

    def put(self, dir_key: str, entries: dict[str, Entry], hidden: int = 0) -> DirListing:
        listing = DirListing(entries, hidden=hidden)
        self._dirs[dir_key] = listing
        return listing

    def set_entry(self, dir_key: str, entry: Entry) -> None:
        """Record a local change in the cached listing of ``dir_key`` (if any)."""
        listing = self._dirs.get(dir_key)
        if listing is not None:
            listing.entries[entry.name] = entry

    def remove_entry(self, dir_key: str, name: str) -> None:
        listing = self._dirs.get(dir_key)
        if listing is not None:
            listing.entries.pop(name, None)

    def invalidate(self, dir_key: str) -> None:
        self._dirs.pop(dir_key, None)

    def invalidate_tree(self, dir_key: str) -> None:
        for k in [k for k in self._dirs if k.startswith(dir_key)]:
            del self._dirs[k]
