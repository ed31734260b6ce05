"""Paths of the file system and the S3 keys behind them, in one bucket under one prefix."""

from __future__ import annotations

import posixpath
from collections.abc import Callable

from s3mount.core.errors import InvalidPath, NameTooLong
from s3mount.core.listing import NAME_MAX
from s3mount.storage import S3Facts, S3Name

# Paths whose normal form and key are remembered: one FUSE request asks for the same path
# several times (tar's create, chown, chmod, utimens and close of one file: 36 times).
REMEMBERED_PATHS = 4096


class KeySpace:
    """``/a/b`` paths onto the keys ``PREFIX + "a" + SEP + "b"`` of ``bucket``.

    A file is the object at its key; a directory is the prefix ``key + SEP`` of its children
    (and may have an empty marker object at that prefix)."""

    def __init__(self, bucket: str, prefix: str = "", separator: str = "/"):
        if len(separator) != 1:
            raise ValueError("the separator must be one character")
        self.bucket = bucket
        self.sep = separator
        self.prefix = prefix.strip(separator) + separator if prefix.strip(separator) else ""
        self._normed: dict[str, str] = {}
        self._keys: dict[str, str] = {}

    def norm(self, path: str) -> str:
        """'/a/b' form of a path; refuses '..' above the root and bad names."""
        return _remembered(self._normed, path, self._normalize)

    def _normalize(self, path: str) -> str:
        p = posixpath.normpath("/" + path)  # no strip(): "a " and "a" are two names
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
        return _remembered(self._keys, path, self._key)

    def _key(self, path: str) -> str:
        p = self.norm(path)
        if p == "/":
            return self.prefix
        key = self.prefix + self.sep.join(p.split("/")[1:])
        try:
            raw = key.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidPath(f"{path}: not valid UTF-8, S3 cannot store it") from None
        if len(raw) > S3Facts.maximum_key_length:
            raise NameTooLong(f"{path}: key longer than S3's 1024 bytes")
        return key

    def dir_key(self, path: str) -> str:
        """The key prefix of a directory's children ('' or ending with the separator)."""
        k = self.key(path)
        if k == self.prefix:
            return k
        if len(k.encode()) + 1 > S3Facts.maximum_key_length:
            raise NameTooLong(f"{path}: a directory's key would pass S3's 1024 bytes")
        return k + self.sep

    def meta_key(self, path: str, is_dir: bool) -> str:
        """The key that holds a path's metadata: the object, or a directory's marker."""
        return self.dir_key(path) if is_dir else self.key(path)

    def s3name(self, key: str) -> S3Name:
        return S3Name(key, self.bucket)

    def path_of_dir_key(self, dkey: str) -> str:
        rel = dkey[len(self.prefix) :]
        return "/" + "/".join(rel[: -len(self.sep)].split(self.sep)) if rel else "/"

    def dir_key_of(self, key: str) -> tuple[str, str]:
        """The directory key above an object key, and the object's name in it."""
        head, _, name = key[len(self.prefix) :].rpartition(self.sep)
        return (self.prefix + head + self.sep if head else self.prefix), name

    @staticmethod
    def split(path: str) -> tuple[str, str]:
        """A normalized path's parent and name."""
        parent, name = posixpath.split(path)
        return parent or "/", name


def _remembered(memo: dict[str, str], path: str, compute: Callable[[str], str]) -> str:
    """``compute(path)``, remembered in ``memo`` (emptied when full); errors are not."""
    value = memo.get(path)
    if value is None:
        value = compute(path)
        if len(memo) >= REMEMBERED_PATHS:
            memo.clear()
        memo[path] = value
    return value
