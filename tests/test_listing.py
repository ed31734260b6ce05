"""Unit tests of the directory listing cache (no S3, no FUSE): what a LIST answer that
crosses local changes keeps."""

from __future__ import annotations

from datetime import UTC, datetime

from s3mount.core.listing import Entry, ListingCache, TreeGatherer
from s3mount.storage import S3Key


def test_changes_made_while_a_list_is_in_flight_survive_its_answer() -> None:
    # tar's mkdir (or a create) lands while the directory's LIST is on the wire; the LIST
    # answer, taken before it, must not hide the new name nor bring back a removed one.
    cache = ListingCache(ttl=60)
    cache.begin_fetch("d/")
    cache.set_entry("d/", Entry("new", is_dir=True))
    cache.remove_entry("d/", "gone")
    listing = cache.put("d/", {"gone": Entry("gone", is_dir=False, size=3)})
    assert set(listing.entries) == {"new"}
    assert cache.get("d/") is listing


def test_an_invalidation_while_a_list_is_in_flight_expires_its_answer() -> None:
    cache = ListingCache(ttl=60)
    cache.begin_fetch("d/sub/")
    cache.invalidate_tree("d/")
    cache.put("d/sub/", {"a": Entry("a", is_dir=False)})
    assert cache.get("d/sub/") is None  # fetched again at the next lookup


def test_an_aborted_fetch_replays_nothing_later() -> None:
    cache = ListingCache(ttl=60)
    cache.begin_fetch("d/")
    cache.abort_fetch("d/")
    cache.set_entry("d/", Entry("x", is_dir=False))  # no cached listing: nothing to update
    assert set(cache.put("d/", {}).entries) == set()
    assert cache.changed_since("d/", 0)


def test_a_walk_tells_which_directories_have_their_own_marker() -> None:
    # One page can complete a directory and its parent at once; the parent must not take
    # the child's marker with it before the child's listing says it has one.
    now = datetime.now(UTC)
    keys = ["r/a/", "r/a/b/", "r/a/b/f", "r/a/g", "r/c/f", "r/z"]
    gatherer = TreeGatherer("r/")
    done = gatherer.feed([S3Key(k, 0, now, "e") for k in keys])
    own = {dkey: marker for dkey, _entries, _hidden, marker in done}
    assert own == {"r/a/": True, "r/a/b/": True, "r/c/": False}
    entries = {dkey: e for dkey, e, _hidden, _marker in done}
    assert entries["r/a/"]["b"].marker is True and set(entries["r/a/"]) == {"b", "g"}
    assert gatherer.finish() == []
