"""The workloads, their sizes and data, for a mount (through files) and for raw boto3."""

from __future__ import annotations

import concurrent.futures
import io
import os
import random
import subprocess
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig

MiB = 1 << 20
KiB = 1 << 10
BUCKET = "bench"
RAW_THREADS = 16
RAW_TRANSFER = TransferConfig(
    multipart_threshold=16 * MiB, multipart_chunksize=16 * MiB, max_concurrency=10
)


@dataclass(frozen=True)
class Sizes:
    """How big each workload is."""

    big_file: int  # sequential write / read
    small_files: int  # files created
    small_size: int
    ls_dirs: int  # ls -lR: dirs x objects per dir
    ls_per_dir: int
    find_shape: tuple[int, int, int]  # find: top dirs x sub dirs x files
    tar_files: int  # files in the source tree
    rand_file: int  # random reads: file size
    rand_reads: int  # number of 4 KiB reads
    rename_files: int
    rm_files: int

    @property
    def find_paths(self) -> int:
        a, b, c = self.find_shape
        return a * b * c


SCALES = {
    "full": Sizes(1024 * MiB, 1000, 4 * KiB, 100, 100, (10, 10, 10), 2000, 256 * MiB, 1000,
                  100, 1000),
    "small": Sizes(128 * MiB, 200, 4 * KiB, 20, 100, (4, 5, 10), 400, 64 * MiB, 300, 100, 200),
    "tiny": Sizes(4 * MiB, 20, 4 * KiB, 5, 10, (2, 2, 5), 30, 4 * MiB, 50, 10, 20),
}  # fmt: skip

# (name, phase, kind of rate) in the order they run.  Phase "write" runs on the first
# mount; "read" on a second, fresh one (new cache directory, page cache dropped).
WORKLOADS: list[tuple[str, str, str]] = [
    ("seq_write", "write", "MB/s"),
    ("small_create", "write", "files/s"),
    ("untar", "write", "files/s"),
    ("seq_read_cold", "read", "MB/s"),
    ("seq_read_warm", "read", "MB/s"),
    ("ls_cold", "read", "entries/s"),
    ("ls_warm", "read", "entries/s"),
    ("find_stat", "read", "paths/s"),
    ("random_read", "read", "reads/s"),
    ("rename_dir", "read", "files/s"),
    ("rm_rf", "read", "files/s"),
]
WORKLOAD_NAMES = [w[0] for w in WORKLOADS]
DESCRIPTIONS = {
    "seq_write": "sequential write of one {big} file (1 MiB writes), until close returns "
    "and until the object is in S3",
    "small_create": "{small_files} files of {small} created, until all are in S3",
    "untar": "tar -x of a {tar_files}-file source tree, then sync, until all are in S3",
    "seq_read_cold": "sequential read of the {big} file on a fresh mount (1 MiB reads)",
    "seq_read_warm": "the same read again, same mount",
    "ls_cold": "ls -lR over {ls_total} objects in {ls_dirs} directories, fresh mount",
    "ls_warm": "the same ls -lR again",
    "find_stat": "find -type f -exec stat over {find_paths} files in a two-level tree",
    "random_read": "{rand_reads} reads of 4 KiB at random offsets of a {rand} file",
    "rename_dir": "mv of a directory of {rename_files} files, until S3 shows it",
    "rm_rf": "rm -rf of a directory of {rm_files} files, until S3 shows it",
}


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def describe(name: str, sizes: Sizes) -> str:
    d = asdict(sizes)
    d.update(
        big=human(sizes.big_file), small=human(sizes.small_size), rand=human(sizes.rand_file),
        ls_total=sizes.ls_dirs * sizes.ls_per_dir, find_paths=sizes.find_paths,
    )  # fmt: skip
    return DESCRIPTIONS[name].format(**d)


# -- data ------------------------------------------------------------------------------------


def pattern(size: int, seed: int) -> bytes:
    """Deterministic incompressible bytes."""
    return random.Random(seed).randbytes(size)


def make_file(path: Path, size: int, seed: int) -> None:
    """A local file of ``size`` pseudo-random bytes (built from 16 MiB blocks)."""
    block = pattern(min(size, 16 * MiB), seed)
    with open(path, "wb") as f:
        left = size
        i = 0
        while left:
            piece = block[: min(left, len(block))]
            # stamp each block so no two blocks of the file are equal
            f.write(i.to_bytes(8, "little") + piece[8:] if len(piece) >= 8 else piece)
            left -= len(piece)
            i += 1


@dataclass
class SourceTree:
    """A tarball of a synthetic source tree and what it holds."""

    tarball: Path
    files: dict[str, int]  # relative path -> size

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def make_source_tree(path: Path, nfiles: int, seed: int = 7) -> SourceTree:
    """A tar of ``nfiles`` text files in nested directories, sized like a source tree.

    A new directory every 15 files while it stays within four levels (2,000 files land in
    74 directories); sizes are log-normal around 3 KiB (at most 256 KiB), like a typical
    C or Python project.  The same seed always gives the same tree.
    """
    rng = random.Random(seed)
    dirs = ["src"]
    files: dict[str, int] = {}
    words = [b"static ", b"int ", b"return ", b"if (x) {\n", b"}\n", b"# comment\n", b"def f():\n"]
    with tarfile.open(path, "w") as tar:
        for i in range(nfiles):
            if i % 15 == 14 or not dirs:
                parent = rng.choice(dirs)
                if parent.count("/") < 3:
                    dirs.append(f"{parent}/mod{len(dirs):03d}")
            d = rng.choice(dirs[-8:])
            name = f"{d}/file{i:04d}.{rng.choice(['c', 'h', 'py', 'txt', 'md'])}"
            size = min(int(rng.lognormvariate(8.0, 1.2)), 256 * KiB)
            body = b"".join(rng.choice(words) for _ in range(size // 5 + 1))[:size]
            info = tarfile.TarInfo(name)
            info.size = len(body)
            info.mode = 0o644
            info.mtime = 1_700_000_000 + i
            tar.addfile(info, io.BytesIO(body))
            files[name] = len(body)
    return SourceTree(path, files)


def put_many(client: Any, items: Iterable[tuple[str, bytes]], threads: int = RAW_THREADS) -> int:
    """PutObject each (key, body) with a thread pool; the count."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        futs = [pool.submit(client.put_object, Bucket=BUCKET, Key=k, Body=b) for k, b in items]
        for f in futs:
            f.result()
    return len(futs)


def list_keys(client: Any, prefix: str) -> dict[str, int]:
    """key -> size for every key under ``prefix``."""
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = o["Size"]
    return out


def delete_prefix(client: Any, prefix: str) -> None:
    keys = list(list_keys(client, prefix))
    for i in range(0, len(keys), 1000):
        client.delete_objects(
            Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]}
        )


def ls_items(sizes: Sizes) -> Iterator[tuple[str, bytes]]:
    for d in range(sizes.ls_dirs):
        for f in range(sizes.ls_per_dir):
            yield f"shared/ls/d{d:03d}/obj{f:05d}", b"x" * 100


def find_items(sizes: Sizes) -> Iterator[tuple[str, bytes]]:
    a, b, c = sizes.find_shape
    for i in range(a):
        for j in range(b):
            for k in range(c):
                yield f"shared/find/a{i:02d}/b{j:02d}/f{k:03d}", b"y" * 200


def small_body(i: int, size: int) -> bytes:
    return (f"{i:08d}".encode() * (size // 8 + 1))[:size]


# -- durability checks --------------------------------------------------------------------


def wait_until(check: Callable[[], bool], timeout: float) -> None:
    """Call ``check`` until it is true; between calls sleep at least 4x its own duration.

    The pause keeps the poll below a fifth of the server's time, so it barely slows the
    uploads it waits for.
    """
    deadline = time.monotonic() + timeout
    while True:
        t0 = time.monotonic()
        if check():
            return
        spent = time.monotonic() - t0
        if time.monotonic() > deadline:
            raise TimeoutError(f"not in S3 after {timeout:.0f} s")
        time.sleep(max(0.1, 4 * spent))


def object_has_size(client: Any, key: str, size: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return client.head_object(Bucket=BUCKET, Key=key)["ContentLength"] == size
        except client.exceptions.ClientError:
            return False

    return check


def prefix_holds(client: Any, prefix: str, want: dict[str, int]) -> Callable[[], bool]:
    """True once every wanted key (relative to ``prefix``) is there with its size."""

    def check() -> bool:
        have = list_keys(client, prefix)
        return all(have.get(prefix + k) == s for k, s in want.items())

    return check


def prefix_empty(client: Any, prefix: str) -> Callable[[], bool]:
    def check() -> bool:
        r = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix, MaxKeys=1)
        return r.get("KeyCount", 0) == 0

    return check


# -- what a workload returns ----------------------------------------------------------------


@dataclass
class Outcome:
    """One measurement: ``seconds`` is the headline (until in S3, for writes)."""

    seconds: float
    amount: float  # bytes for MB/s, a count otherwise
    close_seconds: float | None = None  # writes: until the program returned
    note: str = ""


@dataclass
class Ctx:
    """What the workloads need: sizes, local data, the S3 clients."""

    sizes: Sizes
    work: Path
    raw: Any  # boto3 client through the latency proxy: the client being measured
    direct: Any  # boto3 client straight to the server: set-up and durability checks
    big_src: Path
    rand_src: Path
    tree: SourceTree
    timeout: float


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    r = subprocess.run(cmd, capture_output=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({r.returncode}): {r.stderr[-500:]!r}")
    return r


def read_file_sequential(path: Path, src: Path) -> int:
    """Read the whole file in 1 MiB reads; check every 64th MiB against the source."""
    n = 0
    with open(path, "rb", buffering=0) as f, open(src, "rb") as ref:
        i = 0
        while chunk := f.read(MiB):
            if i % 64 == 0 or len(chunk) < MiB:
                ref.seek(n)
                if zlib.crc32(ref.read(len(chunk))) != zlib.crc32(chunk):
                    raise RuntimeError(f"{path}: wrong data at offset {n}")
            n += len(chunk)
            i += 1
    return n


def random_offsets(sizes: Sizes) -> list[int]:
    rng = random.Random(42)
    blocks = sizes.rand_file // (4 * KiB)
    return [rng.randrange(blocks) * 4 * KiB for _ in range(sizes.rand_reads)]


class MountWorkloads:
    """The workloads through a mounted file system (``root`` is the mount point)."""

    def __init__(self, ctx: Ctx, root: Path, prefix: str, settle: Callable[[], None]):
        self.ctx = ctx
        self.root = root
        self.prefix = prefix  # the tool's own top directory (key prefix) for fresh data
        self.settle = settle
        self.mine = root / prefix

    def _durable(self, t0: float, check: Callable[[], bool]) -> float:
        self.settle()
        wait_until(check, self.ctx.timeout)
        return time.monotonic() - t0

    def seq_write(self) -> Outcome:
        size = self.ctx.sizes.big_file
        self.mine.mkdir(exist_ok=True)
        t0 = time.monotonic()
        with open(self.ctx.big_src, "rb") as src, open(self.mine / "big.bin", "wb") as dst:
            while chunk := src.read(MiB):
                dst.write(chunk)
        closed = time.monotonic() - t0
        key = f"{self.prefix}/big.bin"
        total = self._durable(t0, object_has_size(self.ctx.direct, key, size))
        return Outcome(total, size, closed)

    def small_create(self) -> Outcome:
        s = self.ctx.sizes
        d = self.mine / "small"
        t0 = time.monotonic()
        d.mkdir(parents=True)
        for i in range(s.small_files):
            with open(d / f"f{i:05d}", "wb") as f:
                f.write(small_body(i, s.small_size))
        closed = time.monotonic() - t0
        want = {f"f{i:05d}": s.small_size for i in range(s.small_files)}
        total = self._durable(t0, prefix_holds(self.ctx.direct, f"{self.prefix}/small/", want))
        return Outcome(total, s.small_files, closed)

    def untar(self) -> Outcome:
        d = self.mine / "untar"
        t0 = time.monotonic()
        d.mkdir(parents=True)
        run(["tar", "-xf", str(self.ctx.tree.tarball), "-C", str(d)])
        run(["sync"])
        closed = time.monotonic() - t0
        check = prefix_holds(self.ctx.direct, f"{self.prefix}/untar/", self.ctx.tree.files)
        total = self._durable(t0, check)
        return Outcome(total, len(self.ctx.tree.files), closed)

    def _seq_read(self) -> Outcome:
        t0 = time.monotonic()
        n = read_file_sequential(self.mine / "big.bin", self.ctx.big_src)
        if n != self.ctx.sizes.big_file:
            raise RuntimeError(f"read {n} bytes of {self.ctx.sizes.big_file}")
        return Outcome(time.monotonic() - t0, n)

    seq_read_cold = _seq_read
    seq_read_warm = _seq_read

    def _ls(self) -> Outcome:
        t0 = time.monotonic()
        r = run(["ls", "-lR", str(self.root / "shared" / "ls")], env={**os.environ, "LC_ALL": "C"})
        seconds = time.monotonic() - t0
        files = sum(1 for line in r.stdout.splitlines() if line.startswith(b"-"))
        want = self.ctx.sizes.ls_dirs * self.ctx.sizes.ls_per_dir
        if files != want:
            raise RuntimeError(f"ls -lR showed {files} files of {want}")
        return Outcome(seconds, want)

    ls_cold = _ls
    ls_warm = _ls

    def find_stat(self) -> Outcome:
        t0 = time.monotonic()
        r = run(["find", str(self.root / "shared" / "find"), "-type", "f",
                 "-exec", "stat", "-c", "%s %Y %n", "{}", "+"])  # fmt: skip
        seconds = time.monotonic() - t0
        n = len(r.stdout.splitlines())
        if n != self.ctx.sizes.find_paths:
            raise RuntimeError(f"find/stat saw {n} paths of {self.ctx.sizes.find_paths}")
        return Outcome(seconds, n)

    def random_read(self) -> Outcome:
        offsets = random_offsets(self.ctx.sizes)
        with open(self.ctx.rand_src, "rb") as ref:
            expect = {o: zlib.crc32(os.pread(ref.fileno(), 4 * KiB, o)) for o in offsets[:20]}
        t0 = time.monotonic()
        fd = os.open(self.root / "shared" / "rand.bin", os.O_RDONLY)
        try:
            got = {}
            for o in offsets:
                data = os.pread(fd, 4 * KiB, o)
                if o in expect:
                    got[o] = zlib.crc32(data)
        finally:
            os.close(fd)
        seconds = time.monotonic() - t0
        if any(got[o] != c for o, c in expect.items()):
            raise RuntimeError("random reads returned wrong data")
        return Outcome(seconds, len(offsets))

    def rename_dir(self) -> Outcome:
        n = self.ctx.sizes.rename_files
        t0 = time.monotonic()
        os.rename(self.mine / "ren" / "src", self.mine / "ren" / "dst")
        closed = time.monotonic() - t0
        want = {f"f{i:04d}": 4 * KiB for i in range(n)}
        dst = prefix_holds(self.ctx.direct, f"{self.prefix}/ren/dst/", want)
        src = prefix_empty(self.ctx.direct, f"{self.prefix}/ren/src/")
        total = self._durable(t0, lambda: src() and dst())
        return Outcome(total, n, closed)

    def rm_rf(self) -> Outcome:
        t0 = time.monotonic()
        run(["rm", "-rf", str(self.mine / "rm")])
        closed = time.monotonic() - t0
        total = self._durable(t0, prefix_empty(self.ctx.direct, f"{self.prefix}/rm/"))
        return Outcome(total, self.ctx.sizes.rm_files, closed)


class _Sink(io.RawIOBase):
    """A write-only stream that only counts the bytes (the download is not kept)."""

    def __init__(self) -> None:
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.n += len(b)
        return len(b)


class RawWorkloads:
    """The same workloads as plain S3 calls with boto3 (threads, parallel transfers)."""

    def __init__(self, ctx: Ctx, prefix: str) -> None:
        self.ctx = ctx
        self.c = ctx.raw
        self.prefix = prefix

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(RAW_THREADS)

    def seq_write(self) -> Outcome:
        t0 = time.monotonic()
        self.c.upload_file(str(self.ctx.big_src), BUCKET, f"{self.prefix}/big.bin",
                           Config=RAW_TRANSFER)  # fmt: skip
        return Outcome(time.monotonic() - t0, self.ctx.sizes.big_file, time.monotonic() - t0)

    def _seq_read(self) -> Outcome:
        sink = _Sink()
        t0 = time.monotonic()
        self.c.download_fileobj(BUCKET, f"{self.prefix}/big.bin", sink, Config=RAW_TRANSFER)
        seconds = time.monotonic() - t0
        if sink.n != self.ctx.sizes.big_file:
            raise RuntimeError(f"downloaded {sink.n} bytes of {self.ctx.sizes.big_file}")
        return Outcome(seconds, sink.n)

    seq_read_cold = _seq_read
    seq_read_warm = _seq_read

    def small_create(self) -> Outcome:
        s = self.ctx.sizes
        t0 = time.monotonic()
        items = ((f"{self.prefix}/small/f{i:05d}", small_body(i, s.small_size))
                 for i in range(s.small_files))  # fmt: skip
        put_many(self.c, items)
        seconds = time.monotonic() - t0
        return Outcome(seconds, s.small_files, seconds)

    def untar(self) -> Outcome:
        t0 = time.monotonic()
        with tarfile.open(self.ctx.tree.tarball) as tar:
            items = [(f"{self.prefix}/untar/{m.name}", tar.extractfile(m).read())  # type: ignore[union-attr]
                     for m in tar.getmembers() if m.isfile()]  # fmt: skip
        put_many(self.c, items)
        seconds = time.monotonic() - t0
        return Outcome(seconds, len(items), seconds)

    def _ls(self) -> Outcome:
        t0 = time.monotonic()
        n = len(list_keys(self.c, "shared/ls/"))
        return Outcome(time.monotonic() - t0, n)

    ls_cold = _ls
    ls_warm = _ls

    def find_stat(self) -> Outcome:
        t0 = time.monotonic()
        n = len(list_keys(self.c, "shared/find/"))
        return Outcome(time.monotonic() - t0, n)

    def random_read(self) -> Outcome:
        offsets = random_offsets(self.ctx.sizes)
        t0 = time.monotonic()
        for o in offsets:
            r = self.c.get_object(Bucket=BUCKET, Key="shared/rand.bin",
                                  Range=f"bytes={o}-{o + 4 * KiB - 1}")  # fmt: skip
            r["Body"].read()
        return Outcome(time.monotonic() - t0, len(offsets))

    def rename_dir(self) -> Outcome:
        src, dst = f"{self.prefix}/ren/src/", f"{self.prefix}/ren/dst/"
        t0 = time.monotonic()
        keys = list(list_keys(self.c, src))
        with self._pool() as pool:
            futs = [pool.submit(self.c.copy_object, Bucket=BUCKET, Key=dst + k[len(src):],
                                CopySource={"Bucket": BUCKET, "Key": k}) for k in keys]  # fmt: skip
            for f in futs:
                f.result()
        self.c.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in keys]})
        seconds = time.monotonic() - t0
        return Outcome(seconds, len(keys), seconds)

    def rm_rf(self) -> Outcome:
        t0 = time.monotonic()
        keys = list(list_keys(self.c, f"{self.prefix}/rm/"))
        for i in range(0, len(keys), 1000):
            self.c.delete_objects(
                Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]}
            )
        seconds = time.monotonic() - t0
        return Outcome(seconds, len(keys), seconds)
