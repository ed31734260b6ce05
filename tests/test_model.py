"""The mount against a local directory: random sequences of file operations, side by side.

A hypothesis state machine applies each operation with real syscalls (``os.*``) to a
directory on the mount and to a directory on the local disk, and requires the same
observable result from both: the same return value or the same errno, the same directory
listings, the same file contents. After every step the two trees are compared whole.

Operations: create (O_EXCL, O_TRUNC), write at offsets (past the end too, making holes),
append, truncate by path and ftruncate (shrink and grow), rename (files, and directories with
their contents), unlink, a rename or unlink while a file is open, mkdir, rmdir (ENOTEMPTY
too), read (whole and ranges), fsync (of a file and of a directory), stat, listdir, two
handles on one file, and remount (unmount + mount, which must keep everything). Names come
from a three-letter alphabet, so operations collide. Only what the mount promises to do like
a local file system is generated: no hard links, no special files, no chmod/chown/times
(docs/semantics.md, "Not supported" and "Attributes shown"); directory sizes and link counts
are not compared.

The default test runs a few examples (well under 90 s). The soak variant runs many more:

    .venv/bin/pytest tests/test_model.py --run-slow -k soak

A failure prints the shortest sequence of steps hypothesis found, and the tail of the
daemon's log (``CACHE_DIR/s3mount.log``).
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from pathlib import Path

import pytest
from conftest import Mount
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from s3mount.storage import Storage

MiB = 1024 * 1024

# Names from a three-letter alphabet; paths of one to three of them: "a", "b/c", "a/a/b", ...
NAMES = st.sampled_from("abc")
PATHS = st.lists(NAMES, min_size=1, max_size=3).map("/".join)
# Offsets and sizes: small ones, and some around the mount's 1 MiB blocks.
EDGES = [0, 1, 4095, 4096, 65536, MiB - 1, MiB, MiB + 1, 2 * MiB + 3]
OFFSETS = st.one_of(st.integers(0, 5000), st.sampled_from(EDGES))
SIZES = st.one_of(st.integers(0, 5000), st.sampled_from(EDGES))
DATA = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=4), st.integers(1, 50_000)),
)


def outcome(action) -> tuple[str, object]:
    """('ok', what the action returned) or ('err', the errno's name)."""
    try:
        return "ok", action()
    except OSError as e:
        return "err", errno.errorcode.get(e.errno, e.errno)


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, MiB):
        chunks.append(chunk)
    return b"".join(chunks)


def tree(root: Path) -> dict[str, object]:
    """Every path below root: 'dir', or the file's size and content."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for d in dirnames:
            out[os.path.normpath(os.path.join(rel, d))] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            fd = os.open(p, os.O_RDONLY)
            try:
                out[os.path.normpath(os.path.join(rel, f))] = (os.fstat(fd).st_size, read_all(fd))
            finally:
                os.close(fd)
    return out


def log_tail(m: Mount, lines: int = 25) -> str:
    try:
        text = (m.cache / "s3mount.log").read_text(errors="replace")
    except OSError as e:
        return f"(no daemon log: {e})"
    return "\n--- s3mount.log (tail) ---\n" + "\n".join(text.splitlines()[-lines:])


class MountVersusLocal(RuleBasedStateMachine):
    """Each example works in a fresh directory on the mount and a fresh local one."""

    mount: Mount  # set by the test function before the machine runs
    local_base: Path
    runs = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        n = next(self.runs)
        self.on_mount = self.mount.path / f"run{n}"
        self.on_disk = self.local_base / f"run{n}"
        os.mkdir(self.on_mount)
        os.mkdir(self.on_disk)
        self.remounted = False

    def both(self, action, *paths: str) -> tuple[str, object]:
        """Run ``action`` on the mount and locally (on the same relative paths); they agree."""
        got = outcome(lambda: action(*(self.on_mount / p for p in paths)))
        want = outcome(lambda: action(*(self.on_disk / p for p in paths)))
        assert got == want, (
            f"{action.__name__}{paths}: mount gave {short(got)}, local gave {short(want)}"
            + log_tail(self.mount)
        )
        return got

    def pick(self, draw: st.DataObject, kind: str) -> str:
        """A path to work on: mostly an existing file or directory (``kind``: "file", "dir"
        or "any"), or a new name in an existing directory, or any path at all."""
        files, dirs = [], []
        for dirpath, dirnames, filenames in os.walk(self.on_disk):
            rel = os.path.relpath(dirpath, self.on_disk)
            dirs += [os.path.normpath(os.path.join(rel, d)) for d in dirnames]
            files += [os.path.normpath(os.path.join(rel, f)) for f in filenames]
        existing = {"file": files, "dir": dirs, "any": files + dirs}[kind]
        choices = [st.sampled_from(sorted(existing))] * 2 if existing else []
        choices.append(st.builds(os.path.join, st.sampled_from(["", *sorted(dirs)]), NAMES))
        choices.append(PATHS)
        return draw.draw(st.one_of(choices), label=f"{kind} path")

    @initialize(entries=st.lists(st.tuples(PATHS, st.booleans(), DATA), min_size=1, max_size=8))
    def populate(self, entries: list[tuple[str, bool, bytes]]) -> None:
        """Start from a small tree (directories and files), made on both sides alike."""

        def makedirs(p: Path) -> None:
            os.makedirs(p, exist_ok=True)

        def write_file(data: bytes):  # noqa: ANN202
            def write_file(p: Path) -> None:
                fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)

            return write_file

        for path, is_dir, data in entries:
            if os.path.dirname(path):
                self.both(makedirs, os.path.dirname(path))
            self.both(makedirs if is_dir else write_file(data), path)

    # -- files ------------------------------------------------------------------------------

    @rule(draw=st.data(), exclusive=st.booleans(), truncate=st.booleans())
    def create(self, draw: st.DataObject, exclusive: bool, truncate: bool) -> None:
        flags = os.O_CREAT | os.O_WRONLY
        flags |= (os.O_EXCL if exclusive else 0) | (os.O_TRUNC if truncate else 0)

        def create(p: Path) -> None:
            os.close(os.open(p, flags, 0o644))

        self.both(create, self.pick(draw, "file"))

    @rule(draw=st.data(), offset=OFFSETS, data=DATA, create=st.booleans())
    def write(self, draw: st.DataObject, offset: int, data: bytes, create: bool) -> None:
        def pwrite(p: Path) -> int:
            fd = os.open(p, os.O_WRONLY | (os.O_CREAT if create else 0), 0o644)
            try:
                return os.pwrite(fd, data, offset)
            finally:
                os.close(fd)

        self.both(pwrite, self.pick(draw, "file"))

    @rule(draw=st.data(), data=DATA)
    def append(self, draw: st.DataObject, data: bytes) -> None:
        def append(p: Path) -> tuple[int, int]:
            fd = os.open(p, os.O_WRONLY | os.O_APPEND)
            try:
                return os.write(fd, data), os.fstat(fd).st_size
            finally:
                os.close(fd)

        self.both(append, self.pick(draw, "file"))

    @rule(draw=st.data(), size=SIZES)
    def truncate(self, draw: st.DataObject, size: int) -> None:
        def truncate(p: Path) -> int:
            os.truncate(p, size)
            return os.stat(p).st_size

        self.both(truncate, self.pick(draw, "file"))

    @rule(draw=st.data(), size=SIZES, offset=OFFSETS, data=DATA)
    def ftruncate_then_write(
        self, draw: st.DataObject, size: int, offset: int, data: bytes
    ) -> None:
        def ftruncate(p: Path) -> tuple[int, bytes]:
            fd = os.open(p, os.O_RDWR)
            try:
                os.ftruncate(fd, size)
                os.pwrite(fd, data, offset)
                return os.fstat(fd).st_size, os.pread(fd, 64, max(size - 32, 0))
            finally:
                os.close(fd)

        self.both(ftruncate, self.pick(draw, "file"))

    @rule(draw=st.data(), offset=OFFSETS, length=st.integers(0, 70_000))
    def read_range(self, draw: st.DataObject, offset: int, length: int) -> None:
        def pread(p: Path) -> bytes:
            fd = os.open(p, os.O_RDONLY)
            try:
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)

        self.both(pread, self.pick(draw, "file"))

    @rule(draw=st.data())
    def read_whole(self, draw: st.DataObject) -> None:
        def read(p: Path) -> bytes:
            fd = os.open(p, os.O_RDONLY)
            try:
                return read_all(fd)
            finally:
                os.close(fd)

        self.both(read, self.pick(draw, "any"))

    @rule(draw=st.data(), offset=OFFSETS, data=DATA, create=st.booleans())
    def write_fsync_read(self, draw: st.DataObject, offset: int, data: bytes, create: bool) -> None:
        def fsync(p: Path) -> tuple[int, bytes]:
            fd = os.open(p, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
            try:
                n = os.pwrite(fd, data, offset)
                os.fsync(fd)
                os.pwrite(fd, b"after fsync", 3)
                os.fdatasync(fd)
                return n, read_all(fd)
            finally:
                os.close(fd)

        self.both(fsync, self.pick(draw, "file"))

    @rule(draw=st.data(), first=DATA, second=DATA, offset=OFFSETS)
    def two_handles(self, draw: st.DataObject, first: bytes, second: bytes, offset: int) -> None:
        def two(p: Path) -> tuple[bytes, int, bytes]:
            a = os.open(p, os.O_RDWR)
            try:
                b = os.open(p, os.O_RDWR)
                try:
                    os.pwrite(a, first, 0)
                    os.pwrite(b, second, offset)
                    seen = os.pread(a, len(second), offset)  # b's write, through a
                    os.close(a)  # uploads; b stays open and sees it all
                    a = -1
                    return seen, os.fstat(b).st_size, os.pread(b, 100, 0)
                finally:
                    os.close(b)
            finally:
                if a >= 0:
                    os.close(a)

        self.both(two, self.pick(draw, "file"))

    @rule(
        draw=st.data(),
        change=st.sampled_from(["rename", "unlink"]),
        before=DATA,
        after=DATA,
        offset=OFFSETS,
    )
    def change_names_while_open(
        self, draw: st.DataObject, change: str, before: bytes, after: bytes, offset: int
    ) -> None:
        """A file stays open (and written) across a rename or unlink of it, of a directory
        above it, or of something else: the handle follows the file, as locally."""
        path = self.pick(draw, "file")
        paths = [path, self.pick(draw, "any")]
        if change == "rename":
            paths.append(self.pick(draw, "any"))

        def while_open(p: Path, *names: Path) -> tuple[object, ...]:
            fd = os.open(p, os.O_RDWR)
            try:
                os.pwrite(fd, before, 0)
                done = outcome(
                    lambda: os.rename(*names) if change == "rename" else os.unlink(*names)
                )
                os.pwrite(fd, after, offset)
                return done, os.fstat(fd).st_size, read_all(fd)
            finally:
                os.close(fd)

        self.both(while_open, *paths)

    @rule(draw=st.data())
    def unlink(self, draw: st.DataObject) -> None:
        self.both(os.unlink, self.pick(draw, "any"))

    # -- directories ------------------------------------------------------------------------

    @rule(draw=st.data())
    def mkdir(self, draw: st.DataObject) -> None:
        self.both(os.mkdir, self.pick(draw, "dir"))

    @rule(draw=st.data())
    def rmdir(self, draw: st.DataObject) -> None:
        self.both(os.rmdir, self.pick(draw, "any"))

    @rule(draw=st.data())
    def fsync_dir(self, draw: st.DataObject) -> None:
        def fsync(p: Path) -> None:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        self.both(fsync, self.pick(draw, "dir"))

    @rule(draw=st.data())
    def rename(self, draw: st.DataObject) -> None:
        self.both(os.rename, self.pick(draw, "any"), self.pick(draw, "any"))

    # -- looking ----------------------------------------------------------------------------

    @rule(draw=st.data())
    def stat_path(self, draw: st.DataObject) -> None:
        def kind_and_size(p: Path) -> tuple[int, int]:
            s = os.stat(p)
            return stat.S_IFMT(s.st_mode), s.st_size if stat.S_ISREG(s.st_mode) else 0

        self.both(kind_and_size, self.pick(draw, "any"))

    @rule(draw=st.data())
    def listdir(self, draw: st.DataObject) -> None:
        def listdir(p: Path) -> list[str]:
            return sorted(os.listdir(p))

        self.both(listdir, draw.draw(st.booleans()) and "." or self.pick(draw, "dir"))

    # -- the mount itself -------------------------------------------------------------------

    @precondition(lambda self: not self.remounted)  # a remount takes seconds: one per example
    @rule()
    def remount(self) -> None:
        self.mount.unmount()
        self.mount.mount()
        self.remounted = True

    @invariant()
    def same_trees(self) -> None:
        got, want = tree(self.on_mount), tree(self.on_disk)
        if got != want:
            diff = {
                k: (short(got.get(k)), short(want.get(k)))
                for k in sorted(set(got) | set(want))
                if got.get(k) != want.get(k)
            }
            raise AssertionError(f"trees differ (mount, local): {diff}{log_tail(self.mount)}")


def short(value: object) -> object:
    """Long bytes, shortened for messages."""
    if isinstance(value, bytes) and len(value) > 40:
        return f"<{len(value)} bytes {value[:16]!r}...>"
    if isinstance(value, tuple):
        return tuple(short(v) for v in value)
    return value


def run_model(m: Mount, local: Path, **overrides: object) -> None:
    local.mkdir()
    MountVersusLocal.mount = m
    MountVersusLocal.local_base = local
    options = {
        "max_examples": 15,
        "stateful_step_count": 25,
        "deadline": None,
        "database": None,  # no .hypothesis directory in the work tree; failures print a blob
        "print_blob": True,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    } | overrides
    run_state_machine_as_test(MountVersusLocal, settings=settings(**options))
    m.status()  # the daemon is still there and answers


def test_rename_of_an_open_dirty_file_over_another_file(
    mount_factory, bucket: str, storage: Storage, tmp_path: Path
) -> None:
    m = mount_factory(bucket)
    local = tmp_path / "local"
    local.mkdir()

    def scenario(root: Path) -> tuple[object, ...]:
        for name, data in (("target", b"old target"), ("file", b"0123")):
            fd = os.open(root / name, os.O_CREAT | os.O_WRONLY, 0o644)
            os.write(fd, data)
            os.close(fd)
        fd = os.open(root / "file", os.O_RDWR)
        try:
            os.pwrite(fd, b"X", 0)  # unsaved when the rename comes
            os.rename(root / "file", root / "target")
            os.pwrite(fd, b"Y", 2)
            seen = os.fstat(fd).st_size, read_all(fd)
        finally:
            os.close(fd)
        return seen, sorted(os.listdir(root)), (root / "target").read_bytes()

    want = scenario(local)
    assert want == ((4, b"X1Y3"), ["target"], b"X1Y3")
    got = scenario(m.path)
    assert got == want, f"mount: {got}{log_tail(m)}"
    body = storage.client.get_object(Bucket=bucket, Key="target")["Body"].read()
    assert body == b"X1Y3", body
    assert not (m.cache / "unsaved").exists(), list((m.cache / "unsaved").rglob("*"))


def test_model(mount_factory, bucket: str, tmp_path: Path) -> None:
    run_model(mount_factory(bucket), tmp_path / "local")


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
def test_model_soak(mount_factory, bucket: str, tmp_path: Path) -> None:
    run_model(mount_factory(bucket), tmp_path / "local", max_examples=400, stateful_step_count=60)
