"""The FUSE operations: a thin ``pyfuse3.Operations`` over the core S3FS layer.

This module owns the inode and handle tables and the lookup counts, and it is the one place
where errors become errnos (``FUSEError``).  It holds no S3 logic: every file system question
goes to :class:`s3mount.core.S3FS` by path.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3

from s3mount.control import (
    INFO_XATTRS,
    INVALIDATE_XATTR,
    NO_WAIT_XATTR,
    STATUS_XATTR,
    SYNC_XATTR,
)
from s3mount.core.errors import FSError, Stale, first_leaf
from s3mount.core.s3fs import S3FS, Info, OpenFile
from s3mount.storage import StorageError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def errno_of(exc: BaseException) -> int:
    """The errno for any exception a handler can meet (EIO for the unexpected)."""
    exc = first_leaf(exc)
    if isinstance(exc, FSError | StorageError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def fuse_errors(fn: F) -> F:
    """Let only FUSEError leave a handler: anything else would end the mount."""

    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except (FSError, StorageError, OSError, ExceptionGroup) as group:
            exc = first_leaf(group)
            code = errno_of(exc)
            if isinstance(exc, StorageError | OSError):
                # S3 and local-disk failures: once here (messages name the key or file).
                # FSErrors are answers (ENOENT, EEXIST, ...) or were logged by the core.
                log.warning("%s: %s (%s)", fn.__name__, exc, errno.errorcode.get(code, code))
            elif isinstance(exc, Stale):
                log.warning("%s: %s (ESTALE)", fn.__name__, exc)
            elif not isinstance(exc, FSError):
                log.error("%s failed unexpectedly", fn.__name__, exc_info=exc)
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("%s failed unexpectedly", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


@dataclass
class Inode:
    path: str | None  # None once unlinked (it may still be open)
    lookups: int = 0
    handles: set[int] = field(default_factory=set)
    direct: set[int] = field(default_factory=set)  # the handles that bypass the page cache


@dataclass
class DirHandle:
    inode: int
    entries: list[Info] | None = None


@dataclass
class MountOptions:
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    umask: int = 0o022
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0
    negative_timeout: float = 1.0


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: S3FS, options: MountOptions, status: Callable[[], dict] | None = None):
        super().__init__()
        self.fs = fs
        self.opt = options
        self._status = status
        self.inodes: dict[int, Inode] = {pyfuse3.ROOT_INODE: Inode("/", lookups=1)}
        self.by_path: dict[str, int] = {"/": pyfuse3.ROOT_INODE}
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self.handles: dict[int, OpenFile] = {}
        self._handle_inode: dict[int, int] = {}
        self.dirs: dict[int, DirHandle] = {}
        self._next_fh = 1
        self.no_wait = False  # the next unmount leaves journaled uploads for the next mount

    # -- inode table ------------------------------------------------------------------------

    def _inode_for(self, path: str) -> int:
        ino = self.by_path.get(path)
        if ino is None:
            ino = self._next_inode
            self._next_inode += 1
            self.inodes[ino] = Inode(path)
            self.by_path[path] = ino
        return ino

    def _path(self, inode: int) -> str:
        rec = self.inodes.get(inode)
        if rec is None or rec.path is None:
            # The name went away (unlink, or a rename over it) after the kernel found this
            # inode: ESTALE makes the kernel look the name up again (open, stat retry).
            raise pyfuse3.FUSEError(errno.ESTALE)
        return rec.path

    @staticmethod
    def _join(parent: str, name: bytes) -> str:
        n = os.fsdecode(name)
        if "/" in n:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return ("" if parent == "/" else parent) + "/" + n

    def _unlink_path(self, path: str) -> None:
        ino = self.by_path.pop(path, None)
        if ino is not None:
            self.inodes[ino].path = None
            self._maybe_drop(ino)

    def _move_paths(self, old: str, new: str) -> None:
        """After a rename: the inodes at and below ``old`` now live below ``new``."""
        self._unlink_path(new)
        for path in [p for p in self.by_path if p == old or p.startswith(old + "/")]:
            ino = self.by_path.pop(path)
            moved = new + path[len(old) :]
            self._unlink_path(moved)
            self.by_path[moved] = ino
            self.inodes[ino].path = moved

    def _maybe_drop(self, ino: int) -> None:
        rec = self.inodes.get(ino)
        if rec and ino != pyfuse3.ROOT_INODE and rec.lookups <= 0 and not rec.handles:
            del self.inodes[ino]
            if rec.path is not None and self.by_path.get(rec.path) == ino:
                del self.by_path[rec.path]

    # -- attributes -------------------------------------------------------------------------

    def _attr(self, ino: int, info: Info) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if info.is_dir:
            perm = info.mode if info.mode is not None else 0o777 & ~self.opt.umask
            a.st_mode = stat.S_IFDIR | perm
        elif info.is_symlink:
            a.st_mode = stat.S_IFLNK | 0o777
        else:
            perm = info.mode if info.mode is not None else 0o666 & ~self.opt.umask
            a.st_mode = stat.S_IFREG | perm
        a.st_nlink = 1
        a.st_uid = self.opt.uid if info.uid is None else info.uid
        a.st_gid = self.opt.gid if info.gid is None else info.gid
        a.st_size = info.size
        a.st_blksize = 128 * 1024
        a.st_blocks = (info.size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = info.mtime_ns or round(info.mtime * 1e9)
        a.st_ctime_ns = info.ctime_ns or a.st_mtime_ns
        a.attr_timeout = self.opt.attr_timeout
        a.entry_timeout = self.opt.entry_timeout
        return a

    async def _getattr_path(self, ino: int, path: str) -> pyfuse3.EntryAttributes:
        return self._attr(ino, await self.fs.getinfo(path))

    # -- lookups ----------------------------------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        path = self._join(self._path(parent_inode), name)
        try:
            info = await self.fs.getinfo(path)
        except FSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = self.opt.negative_timeout
            return neg
        ino = self._inode_for(path)
        self.inodes[ino].lookups += 1
        return self._attr(ino, info)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            rec = self.inodes.get(ino)
            if rec is not None:
                rec.lookups -= n
                self._maybe_drop(ino)

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        handle = self._unlinked_handle(inode)
        if handle is not None:
            return self._attr(inode, handle.info())
        return await self._getattr_path(inode, self._path(inode))

    def _unlinked_handle(self, inode: int) -> OpenFile | None:
        """An open handle of an inode whose name is gone (unlinked while open)."""
        rec = self.inodes.get(inode)
        if rec is not None and rec.path is None and rec.handles:
            return self.handles[next(iter(rec.handles))]
        return None

    @fuse_errors
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Any:
        handle = self._unlinked_handle(inode)
        if handle is not None:  # no name left: only the size can change
            if fields.update_size:
                await handle.truncate(attr.st_size)
            return self._attr(inode, handle.info())
        path = self._path(inode)
        if fields.update_size:
            if fh is not None and fh in self.handles:
                await self.handles[fh].truncate(attr.st_size)
            else:
                await self.fs.truncate(path, attr.st_size)
        if fields.update_mode or fields.update_uid or fields.update_gid or fields.update_mtime:
            info = await self.fs.set_attrs(
                path,
                mode=attr.st_mode if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            )
            return self._attr(inode, info)
        return await self._getattr_path(inode, path)

    # -- directories ------------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        path = self._path(inode)
        if not (await self.fs.getinfo(path)).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._new_fh()
        self.dirs[fh] = DirHandle(inode)
        return fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        d = self.dirs[fh]
        path = self._path(d.inode)
        if d.entries is None or start_id == 0:
            # A snapshot per handle keeps offsets stable; a rewind takes a fresh one.
            d.entries = await self.fs.listinfo(path)
        # Offsets: 1 and 2 are "." and "..", then 3 + the index in the snapshot.
        if start_id < 2:
            parent_ino = self.by_path.get(os.path.dirname(path), pyfuse3.ROOT_INODE)
            dots = [(b".", d.inode), (b"..", parent_ino)][start_id:]
            for n, (name, ino) in enumerate(dots, start=start_id + 1):
                attr = self._attr(ino, Info(path=path, is_dir=True))
                if not pyfuse3.readdir_reply(token, name, attr, n):
                    return  # no lookup count for dot entries
            start_id = 2
        for i in range(start_id - 2, len(d.entries)):
            info = d.entries[i]
            ino = self._inode_for(info.path)
            attr = self._attr(ino, info)
            if not pyfuse3.readdir_reply(token, os.fsencode(info.name), attr, i + 3):
                self._maybe_drop(ino)
                return
            self.inodes[ino].lookups += 1

    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        path = self._join(self._path(parent_inode), name)
        info = await self.fs.makedir(path, mode=mode & ~ctx.umask, uid=ctx.uid, gid=ctx.gid)
        ino = self._inode_for(path)
        self.inodes[ino].lookups += 1
        return self._attr(ino, info)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path = self._join(self._path(parent_inode), name)
        await self.fs.removedir(path)
        self._unlink_path(path)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path = self._join(self._path(parent_inode), name)
        await self.fs.remove(path)
        self._unlink_path(path)

    @fuse_errors
    async def rename(
        self,
        parent_old: int,
        name_old: bytes,
        parent_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)  # S3 cannot swap two keys atomically
        old = self._join(self._path(parent_old), name_old)
        new = self._join(self._path(parent_new), name_new)
        await self.fs.rename(old, new, replace_existing=not flags & pyfuse3.RENAME_NOREPLACE)
        self._move_paths(old, new)

    @fuse_errors
    async def link(self, inode: int, new_parent: int, new_name: bytes, ctx: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)  # S3 has no hard links

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        if not stat.S_ISREG(mode):
            raise pyfuse3.FUSEError(errno.EPERM)  # no device nodes, FIFOs or sockets on S3
        fi, attr = await self.create(parent_inode, name, mode, os.O_WRONLY, ctx)
        await self.release(fi.fh)
        return attr

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        path = self._join(self._path(parent_inode), name)
        info = await self.fs.symlink(path, os.fsdecode(target), uid=ctx.uid, gid=ctx.gid)
        ino = self._inode_for(path)
        self.inodes[ino].lookups += 1
        return self._attr(ino, info)

    @fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return os.fsencode(await self.fs.readlink(self._path(inode)))

    async def statfs(self, ctx: Any) -> Any:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 2**50 // 4096  # S3 has no size limit; say 1 PiB
        s.f_files = s.f_ffree = s.f_favail = 2**32
        s.f_namemax = 255
        return s

    # -- files ------------------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _add_handle(self, ino: int, handle: OpenFile, flags: int) -> pyfuse3.FileInfo:
        """Register ``handle``; a write-only open of a file no one else has open bypasses the
        kernel's page cache (``direct_io``), and so does every open of the file after it while
        it is open: a program streaming a file out fills no pages it will not read, and the
        kernel holds no page a direct write could leave stale (docs/semantics.md, open)."""
        rec = self.inodes[ino]
        direct = bool(rec.direct) or (flags & os.O_ACCMODE == os.O_WRONLY and not rec.handles)
        fh = self._new_fh()
        self.handles[fh] = handle
        self._handle_inode[fh] = ino
        rec.handles.add(fh)
        if direct:
            rec.direct.add(fh)
        # Without keep_cache the kernel drops the file's cached pages at this open.
        keep = handle.keep_cache and not direct
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=direct)

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        path = self._path(inode)
        write = flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
        handle = await self.fs.open_file(path, write=write, truncate=bool(flags & os.O_TRUNC))
        return self._add_handle(inode, handle, flags)

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        path = self._join(self._path(parent_inode), name)
        handle = await self.fs.open_file(
            path,
            write=True,
            create=True,
            exclusive=bool(flags & os.O_EXCL),
            truncate=bool(flags & os.O_TRUNC),
            mode=mode & ~ctx.umask,
            uid=ctx.uid,
            gid=ctx.gid,
        )
        info = handle.info()
        ino = self._inode_for(path)
        self.inodes[ino].lookups += 1
        return self._add_handle(ino, handle, flags), self._attr(ino, info)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        return await self.handles[fh].pread(off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.handles[fh].pwrite(off, buf)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        await self.handles[fh].flush()

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.handles[fh].fsync()

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        ino = self._handle_inode.pop(fh)
        rec = self.inodes.get(ino)
        if rec is not None:
            rec.handles.discard(fh)
            rec.direct.discard(fh)
            self._maybe_drop(ino)
        await handle.close()

    # -- extended attributes ----------------------------------------------------------------
    # user.*: stored on the object.  s3.*: read-only facts about the object.
    # user.s3mount.*: the daemon's control surface (status, cache invalidation).

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        n = os.fsdecode(name)
        path = self._path(inode)
        if n == STATUS_XATTR and inode == pyfuse3.ROOT_INODE and self._status:
            return json.dumps(self._status()).encode()
        if n == SYNC_XATTR and inode == pyfuse3.ROOT_INODE:
            await self.fs.sync()
            return b"synced"
        if n in INFO_XATTRS:
            if n == "s3.url":
                return (await self.fs.getpathurl(path)).encode()
            obj = await self.fs.object_info(path)
            value = getattr(obj, INFO_XATTRS[n])
            if value is None:
                raise pyfuse3.FUSEError(errno.ENODATA)
            return str(value).encode()
        if not n.startswith("user."):
            # Not ENODATA: on "not supported" ls stops asking for the security.* and
            # system.posix_acl_* of every file (it remembers the answer per device).
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        value = (await self.fs.getxattrs(path)).get(n)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        names = await self.fs.getxattrs(self._path(inode))
        return [os.fsencode(n) for n in names if n.startswith("user.")]

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        n = os.fsdecode(name)
        path = self._path(inode)
        if n == INVALIDATE_XATTR:
            self.fs.invalidate(path)
        elif n == NO_WAIT_XATTR and inode == pyfuse3.ROOT_INODE:
            self.no_wait = True
        elif n in INFO_XATTRS or n.startswith("user.s3mount."):
            raise pyfuse3.FUSEError(errno.EPERM)
        else:
            await self.fs.setxattr(path, n, value)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.removexattr(self._path(inode), os.fsdecode(name))
