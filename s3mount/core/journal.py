"""The on-disk journal: what must reach S3, and what was being written, across crashes.

Two tables in ``CACHE_DIR/journal.sqlite`` (``synchronous=FULL``: a committed row survives a
power loss):

* ``pending``: uploads that ``close()`` promised (write-back mode).  Each row names an
  immutable data file in ``CACHE_DIR/pending/``, fsync'd before the row is committed, and the
  metadata to upload with it.  A row is deleted only after S3 accepted the upload.
* ``writing``: temp files of open files that hold changes not yet saved anywhere else.  After
  a crash their data is kept in the recovery folder, named by key, and never uploaded
  silently over the object.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Record:
    id: int
    key: str
    data: str  # path of the immutable data file
    size: int
    headers: dict[str, str]
    content_type: str
    base_etag: str | None  # the object version the change was made on (None: a new file)
    created: float
    attempts: int = 0
    next_try: float = field(default=0.0, compare=False)  # monotonic time of the next try


class Journal:
    def __init__(self, cache_dir: str):
        # Paths are stored relative to the cache directory, which may be moved or restored
        # from a copy.
        self.cache_dir = cache_dir
        self.dir = os.path.join(cache_dir, "pending")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        path = os.path.join(cache_dir, "journal.sqlite")
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS pending (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "key TEXT, data TEXT, size INTEGER, headers TEXT, content_type TEXT, "
            "base_etag TEXT, created REAL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS writing (path TEXT PRIMARY KEY, key TEXT)")

    # -- pending uploads -------------------------------------------------------------------

    def add(
        self,
        key: str,
        fd: int,
        src_path: str,
        size: int,
        headers: dict[str, str],
        content_type: str,
        base_etag: str | None,
    ) -> Record:
        """Make the file durable and record it: when this returns, the upload is promised.

        The data file is a hard link to ``src_path`` (no copy); the caller must not change
        that file in place afterwards (see CachedFile.shared).
        """
        os.fsync(fd)
        data = os.path.join(self.dir, uuid.uuid4().hex)
        os.link(src_path, data)
        _fsync_dir(self.dir)
        created = time.time()
        try:
            cur = self._db.execute(
                "INSERT INTO pending (key, data, size, headers, content_type, base_etag, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, os.path.basename(data), size, json.dumps(headers), content_type,
                 base_etag, created),
            )  # fmt: skip
        except sqlite3.Error as exc:  # nothing promised: the caller keeps its dirty file
            os.unlink(data)
            code = errno.ENOSPC if "full" in str(exc) else errno.EIO
            raise OSError(code, f"journal: {exc}") from None
        return Record(
            int(cur.lastrowid or 0), key, data, size, headers, content_type, base_etag, created
        )

    def update_headers(self, record: Record, headers: dict[str, str]) -> None:
        """New metadata for a version not uploaded yet (chmod, utimens... after close)."""
        try:
            self._db.execute(
                "UPDATE pending SET headers = ? WHERE id = ?", (json.dumps(headers), record.id)
            )
        except sqlite3.Error as exc:
            code = errno.ENOSPC if "full" in str(exc) else errno.EIO
            raise OSError(code, f"journal: {exc}") from None
        record.headers = headers

    def records(self) -> list[Record]:
        rows = self._db.execute(
            "SELECT id, key, data, size, headers, content_type, base_etag, created "
            "FROM pending ORDER BY id"
        ).fetchall()
        return [
            Record(r[0], r[1], os.path.join(self.dir, os.path.basename(r[2])), r[3],
                   json.loads(r[4]), r[5], r[6], r[7])
            for r in rows
        ]  # fmt: skip

    def done(self, record: Record) -> None:
        """S3 has it (or it was superseded or unlinked): forget the record and its data."""
        self._db.execute("DELETE FROM pending WHERE id = ?", (record.id,))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(record.data)

    # -- files being written ---------------------------------------------------------------

    def writing(self, path: str, key: str) -> None:
        """The temp file ``path`` (in CACHE_DIR/open) holds unsaved changes of ``key``.

        Best effort (like ``written``): if SQLite fails (a full disk), only the naming of
        the file in the recovery folder after a crash is lost, never the write itself.
        """
        name = os.path.basename(path)
        self._best_effort("INSERT OR REPLACE INTO writing VALUES (?, ?)", (name, key))

    def written(self, path: str) -> None:
        self._best_effort("DELETE FROM writing WHERE path = ?", (os.path.basename(path),))

    def _best_effort(self, sql: str, args: tuple) -> None:
        try:
            self._db.execute(sql, args)
        except sqlite3.Error as exc:
            log.warning("journal: %s", exc)

    def interrupted(self) -> list[tuple[str, str]]:
        """(temp path, key) of files a dead daemon was writing; the rows are removed."""
        rows = self._db.execute("SELECT path, key FROM writing").fetchall()
        self._db.execute("DELETE FROM writing")
        return [(os.path.join(self.cache_dir, "open", os.path.basename(p)), k) for p, k in rows]

    def close(self) -> None:
        self._db.close()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
