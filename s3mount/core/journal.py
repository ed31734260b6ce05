"""The on-disk journal: what must reach S3, and what was being written, across crashes.

Two tables in ``CACHE_DIR/journal.sqlite`` (WAL):

* ``pending``: uploads that ``close()`` promised (write-back mode).  Each row names an
  immutable data file in ``CACHE_DIR/pending/`` and the metadata to upload with it.  A row is
  deleted only after S3 accepted the upload.  What ``close()`` journals survives a crash of
  the daemon (the kernel keeps the file's pages); what ``fsync()`` journals (or makes
  durable) also survives a power loss: the data file and the directory are fsync'd and the
  row is committed with ``synchronous=FULL``.  A row not made durable carries the boot id of
  the machine: after a reboot its data may be incomplete, so it is never uploaded, only kept
  in the recovery folder (``take_unverified``).
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


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


BOOT_ID = _boot_id()


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
    head: int = 0  # bytes [0, head) are still those of version base_etag (copied in S3)
    attempts: int = 0
    next_try: float = field(default=0.0, compare=False)  # monotonic time of the next try
    durable: bool = True  # data file and row synced (survive a power loss)


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
        columns = [r[1] for r in self._db.execute("PRAGMA table_info(pending)")]
        if "boot" not in columns:  # a journal of an earlier version: every row was durable
            self._db.execute("ALTER TABLE pending ADD COLUMN boot TEXT")
        if "head" not in columns:
            self._db.execute("ALTER TABLE pending ADD COLUMN head INTEGER NOT NULL DEFAULT 0")

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
        head: int = 0,
        durable: bool = True,
    ) -> Record:
        """Record the file: when this returns, the upload is promised (``durable``: even
        across a power loss; the caller fsync'd ``fd`` then).

        The data file is a hard link to ``src_path`` (no copy); the caller must not change
        that file in place afterwards (see CachedFile.shared).
        """
        data = os.path.join(self.dir, uuid.uuid4().hex)
        os.link(src_path, data)
        if durable:
            _fsync(self.dir, os.O_DIRECTORY)
        created = time.time()
        try:
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            cur = self._db.execute(
                "INSERT INTO pending (key, data, size, headers, content_type, base_etag, "
                "created, boot, head) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, os.path.basename(data), size, json.dumps(headers), content_type,
                 base_etag, created, None if durable else BOOT_ID, head),
            )  # fmt: skip
        except sqlite3.Error as exc:  # nothing promised: the caller keeps its dirty file
            os.unlink(data)
            raise _journal_error(exc) from None
        return Record(
            int(cur.lastrowid or 0), key, data, size, headers, content_type, base_etag, created,
            head, durable=durable,
        )  # fmt: skip

    def make_durable(self, records: list[Record]) -> None:
        """fsync(2) of a file already journaled: its data and row survive a power loss now."""
        todo = [r for r in records if not r.durable]
        if not todo:
            return
        for r in todo:
            _fsync(r.data)
        _fsync(self.dir, os.O_DIRECTORY)
        try:
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executemany(
                "UPDATE pending SET boot = NULL WHERE id = ?", [(r.id,) for r in todo]
            )
        except sqlite3.Error as exc:
            raise _journal_error(exc) from None
        for r in todo:
            r.durable = True

    def take_unverified(self) -> list[Record]:
        """Rows journaled without fsync before the machine rebooted: their data may be
        incomplete.  They leave the journal (their data files stay, for the caller)."""
        rows = self._db.execute(
            "SELECT id FROM pending WHERE boot IS NOT NULL AND boot != ?", (BOOT_ID,)
        ).fetchall()
        ids = {r[0] for r in rows}
        found = [r for r in self.records() if r.id in ids]
        self._db.executemany("DELETE FROM pending WHERE id = ?", [(i,) for i in ids])
        return found

    def update_headers(self, record: Record, headers: dict[str, str]) -> None:
        """New metadata for a version not uploaded yet (chmod, utimens... after close)."""
        try:
            self._db.execute(
                "UPDATE pending SET headers = ? WHERE id = ?", (json.dumps(headers), record.id)
            )
        except sqlite3.Error as exc:
            raise _journal_error(exc) from None
        record.headers = headers

    def rebase(self, record: Record, etag: str, head: int) -> None:
        """An earlier version of the record's key is now ``etag`` in S3: the record builds
        on it, with its first ``head`` bytes still that version's.  Best effort: if SQLite
        fails, a restart takes the record for a conflict and keeps it in the recovery
        folder instead of uploading it; nothing is lost."""
        record.base_etag, record.head = etag, head
        self._best_effort(
            "UPDATE pending SET base_etag = ?, head = ? WHERE id = ?", (etag, head, record.id)
        )

    def records(self) -> list[Record]:
        rows = self._db.execute(
            "SELECT id, key, data, size, headers, content_type, base_etag, created, head, boot "
            "FROM pending ORDER BY id"
        ).fetchall()
        return [
            Record(r[0], r[1], os.path.join(self.dir, os.path.basename(r[2])), r[3],
                   json.loads(r[4]), r[5], r[6], r[7], r[8], durable=r[9] is None)
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


def _journal_error(exc: sqlite3.Error) -> OSError:
    """A failed journal write, as the errno the writer gets (a full disk: ENOSPC)."""
    return OSError(errno.ENOSPC if "full" in str(exc) else errno.EIO, f"journal: {exc}")


def _fsync(path: str, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
