"""The core S3FS layer: path semantics over S3 keys, with its caches.  No FUSE in here.

The entry point is :class:`s3mount.core.s3fs.S3FS`.  This package imports nothing by itself, so
that a light module (``core.metadata`` for the configuration) can be used without trio.
"""
