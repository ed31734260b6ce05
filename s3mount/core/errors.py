"""Errors of the core file system layer.  Each carries the errno a file system reports."""

from __future__ import annotations

import errno


class FSError(Exception):
    errno = errno.EIO

    def __init__(self, message: str = ""):
        super().__init__(message or self.__class__.__name__)


class ResourceNotFound(FSError):
    errno = errno.ENOENT


class ResourceExists(FSError):
    errno = errno.EEXIST


class DirectoryNotEmpty(FSError):
    errno = errno.ENOTEMPTY


class NotADirectory(FSError):
    errno = errno.ENOTDIR


class IsADirectory(FSError):
    errno = errno.EISDIR


class ReadOnly(FSError):
    errno = errno.EROFS


class NameTooLong(FSError):
    errno = errno.ENAMETOOLONG


class InvalidPath(FSError):
    errno = errno.EINVAL


class Unsupported(FSError):
    errno = errno.EOPNOTSUPP


class NoSpace(FSError):
    errno = errno.ENOSPC


class NoAttribute(FSError):
    errno = errno.ENODATA


class Stale(FSError):
    """The object changed on the server while this handle was reading it."""

    errno = errno.ESTALE


class UploadFailed(FSError):
    """Dirty data could not be uploaded; it stays in the local cache."""

    errno = errno.EIO


def first_leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from trio nurseries."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
