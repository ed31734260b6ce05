"""POSIX metadata on objects, in s3fs-fuse's format, and a local cache of it.

Headers (user metadata, ``x-amz-meta-NAME``; boto3 shows them without the prefix):

=========  ===============================================================================
mode       decimal ``st_mode`` with the file-type bits (``S_IFREG``, ``S_IFDIR``, ``S_IFLNK``)
uid, gid   decimal
mtime      epoch seconds; fractional (rclone's form) when the time has a fraction
ctime      epoch seconds, like mtime (also atime, read but not written)
xattr      URL-encoded JSON object: attribute name -> base64 of its value (s3fs's form)
=========  ===============================================================================

A listing does not carry user metadata, so it takes a HEAD per object to learn it.  The
:class:`MetaCache` keeps what HEADs told, keyed by key and checked against the ETag and
LastModified the listing shows, in a SQLite file in the cache directory: it survives remounts.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sqlite3
import stat
from dataclasses import dataclass, field
from functools import cached_property
from urllib.parse import quote, unquote

log = logging.getLogger(__name__)

MODE, UID, GID, MTIME, CTIME, XATTR = "mode", "uid", "gid", "mtime", "ctime", "xattr"
MAX_METADATA = 2048  # S3 keeps at most 2 KiB of user metadata per object
# How entries get their POSIX metadata when the metadata cache does not know them (core.resolver).
METADATA_MODES = ("auto", "head", "listing")


def headers_size(headers: dict[str, str]) -> int:
    """Bytes of user metadata as S3 counts them (names and values)."""
    return sum(len(k.encode()) + len(v.encode()) for k, v in headers.items())


@dataclass(frozen=True)
class ObjectMeta:
    """What a HEAD told about an object, as far as the file system cares.

    Its headers are never changed in place (a change makes a new ObjectMeta), so the POSIX
    fields are parsed once, when first asked for."""

    headers: dict[str, str] = field(default_factory=dict)  # user metadata, all of it
    content_type: str = ""

    @cached_property
    def mode(self) -> int | None:
        return _int(self.headers.get(MODE))

    @cached_property
    def uid(self) -> int | None:
        return _int(self.headers.get(UID))

    @cached_property
    def gid(self) -> int | None:
        return _int(self.headers.get(GID))

    @cached_property
    def mtime_ns(self) -> int | None:
        return parse_ns(self.headers.get(MTIME))

    @cached_property
    def ctime_ns(self) -> int | None:
        return parse_ns(self.headers.get(CTIME))

    @property
    def has_posix(self) -> bool:
        """Whether the object carries any POSIX attribute (s3fs-fuse's or rclone's headers)."""
        return any(h in self.headers for h in (MODE, UID, GID, MTIME))

    @cached_property
    def is_symlink(self) -> bool:
        m = self.mode
        return m is not None and stat.S_ISLNK(m)

    @property
    def xattrs(self) -> dict[str, bytes]:
        return decode_xattrs(self.headers.get(XATTR, ""))


def _int(v: str | None) -> int | None:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def parse_ns(v: str | None) -> int | None:
    """Epoch nanoseconds, exactly, from '1700000000' or '1700000000.123456789'."""
    if not v:
        return None
    sec, _, frac = v.strip().partition(".")
    try:
        return int(sec) * 1_000_000_000 + (int(frac[:9].ljust(9, "0")) if frac else 0)
    except ValueError:
        return None


def format_ns(ns: int) -> str:
    """Whole seconds as s3fs writes them; with nanoseconds as rclone does when needed."""
    sec, frac = divmod(ns, 1_000_000_000)
    return str(sec) if frac == 0 else f"{sec}.{frac:09d}"


def decode_xattrs(value: str) -> dict[str, bytes]:
    if not value:
        return {}
    try:
        raw = json.loads(unquote(value))
        return {str(k): base64.b64decode(v) for k, v in raw.items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def encode_xattrs(xattrs: dict[str, bytes]) -> str:
    doc = {k: base64.b64encode(v).decode() for k, v in sorted(xattrs.items())}
    return quote(json.dumps(doc, separators=(",", ":")), safe="")


def with_posix(
    headers: dict[str, str],
    *,
    mode: int | None = None,
    uid: int | None = None,
    gid: int | None = None,
    mtime_ns: int | None = None,
    ctime_ns: int | None = None,
    xattrs: dict[str, bytes] | None = None,
) -> dict[str, str]:
    """A copy of ``headers`` with the given POSIX fields set."""
    out = dict(headers)
    for name, value in ((MODE, mode), (UID, uid), (GID, gid)):
        if value is not None:
            out[name] = str(value)
    if mtime_ns is not None:
        out[MTIME] = format_ns(mtime_ns)
    if ctime_ns is not None:
        out[CTIME] = format_ns(ctime_ns)
    if xattrs is not None:
        if xattrs:
            out[XATTR] = encode_xattrs(xattrs)
        else:
            out.pop(XATTR, None)
    return out


class MetaCache:
    """Object metadata learned from HEADs, persisted in ``metadata.sqlite``.

    An entry is valid for the object version it was read from: same ETag, and same
    LastModified when both are known.  Used from the trio thread only.  It is only a cache:
    when SQLite fails (a full disk, say), the entry is skipped and a HEAD asks again.

    It also keeps which directories a sample found plain (core.resolver), with a fingerprint
    of the files they held then: a later mount that lists the same files needs no sample.
    """

    def __init__(self, path: str):
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")  # a lost entry only costs a HEAD
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, etag TEXT, "
            "modified REAL, headers TEXT, content_type TEXT)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS plain_dirs (key TEXT PRIMARY KEY, fingerprint TEXT)"
        )

    def _execute(self, sql: str, args: tuple = (), many: bool = False) -> list[tuple]:
        try:
            if many:
                self._db.executemany(sql, args)
                return []
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            log.warning("metadata cache %s: %s", self.path, exc)
            return []

    def get(self, key: str, etag: str | None, modified: float | None) -> ObjectMeta | None:
        rows = self._execute(
            "SELECT etag, modified, headers, content_type FROM meta WHERE key = ?", (key,)
        )
        if not rows:
            return None
        c_etag, c_modified, headers, ctype = rows[0]
        if etag is not None and c_etag != etag:
            return None
        if modified is not None and c_modified is not None and abs(c_modified - modified) > 1:
            return None
        return ObjectMeta(json.loads(headers), ctype or "")

    def put(self, key: str, etag: str | None, modified: float | None, meta: ObjectMeta) -> None:
        self._execute(
            "INSERT OR REPLACE INTO meta VALUES (?, ?, ?, ?, ?)",
            (key, etag, modified, json.dumps(meta.headers), meta.content_type),
        )

    def delete(self, key: str) -> None:
        self._execute("DELETE FROM meta WHERE key = ?", (key,))

    def plain_fingerprint(self, dir_key: str) -> str | None:
        """The fingerprint of the files ``dir_key`` held when a sample found it plain."""
        rows = self._execute("SELECT fingerprint FROM plain_dirs WHERE key = ?", (dir_key,))
        return rows[0][0] if rows else None

    def set_plain(self, dir_key: str, fingerprint: str | None) -> None:
        """Remember ``dir_key`` as plain with these files (None: forget it)."""
        if fingerprint is None:
            self._execute("DELETE FROM plain_dirs WHERE key = ?", (dir_key,))
        else:
            self._execute("INSERT OR REPLACE INTO plain_dirs VALUES (?, ?)", (dir_key, fingerprint))

    def delete_tree(self, prefix: str) -> None:
        """Forget ``prefix`` itself and every key below it (and their plain verdicts)."""
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        for table in ("meta", "plain_dirs"):
            self._execute(
                f"DELETE FROM {table} WHERE key = ? OR key LIKE ? ESCAPE '\\'", (prefix, like)
            )

    def move_tree(self, src_prefix: str, dst_prefix: str) -> None:
        """After a directory rename: entries below ``src_prefix`` move below ``dst_prefix``.

        Their LastModified is forgotten (the copies have new ones); the ETag still decides.
        """
        like = src_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self._execute(
            "SELECT key, etag, headers, content_type FROM meta WHERE key LIKE ? ESCAPE '\\'",
            (like,),
        )
        self.delete_tree(src_prefix)
        self._execute(
            "INSERT OR REPLACE INTO meta VALUES (?, ?, NULL, ?, ?)",
            tuple((dst_prefix + k[len(src_prefix) :], e, h, c) for k, e, h, c in rows),
            many=True,
        )

    def close(self) -> None:
        self._db.close()
