"""The core S3FS layer: path semantics over S3 keys, with its caches.  No FUSE in here."""

from s3mount.core.errors import FSError
from s3mount.core.s3fs import S3FS, Info, OpenFile

__all__ = ["S3FS", "FSError", "Info", "OpenFile"]
