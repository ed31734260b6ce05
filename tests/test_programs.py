"""Real programs on a real mount: tar, git, rsync, sqlite3, cp, mv, dd, editors, flock.

Each test runs the programs with subprocess, as a user would, against a real FUSE mount of a
moto server, and checks the result through the mount, on S3 and after a remount where that
matters. A failure message carries the tail of the daemon's log (``CACHE_DIR/s3mount.log``).
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import sysconfig
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import Mount, s3_bytes, s3_keys

from s3mount.storage import Storage

MiB = 1024 * 1024


def run(*cmd: object, timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
    """Run a program as a user would; never raises on a non-zero exit."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run([str(c) for c in cmd], timeout=timeout, **kw)


def log_tail(m: Mount, lines: int = 30) -> str:
    log = m.cache / "s3mount.log"
    try:
        text = log.read_text(errors="replace")
    except OSError as e:
        return f"(no daemon log: {e})"
    return "\n--- s3mount.log (tail) ---\n" + "\n".join(text.splitlines()[-lines:])


def explain(m: Mount, r: subprocess.CompletedProcess[str]) -> str:
    return (
        f"rc={r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}{log_tail(m)}"
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def s3_sha256(storage: Storage, bucket: str, key: str) -> str:
    h = hashlib.sha256()
    body = storage.client.get_object(Bucket=bucket, Key=key)["Body"]
    for chunk in body.iter_chunks(4 * MiB):
        h.update(chunk)
    return h.hexdigest()


def walk(root: Path) -> Iterator[Path]:
    """Every entry under root (not root itself), sorted, without following symlinks."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            yield Path(dirpath) / name


def meta(path: Path) -> tuple[str, int]:
    """The mode (with the file type) and the mtime in ns, as `stat` shows them."""
    st = os.lstat(path)
    return stat.filemode(st.st_mode), st.st_mtime_ns


def set_times(path: Path, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


# ---------------------------------------------------------------------------------------------
# 1. tar: a real source tree of thousands of files


def build_source_tarball(tarball: Path) -> None:
    """Most of the Python standard library (without tests, site-packages, caches and its
    biggest packages) and the system's zoneinfo tree without right/ (its hundreds of relative
    symlinks stay): about 1,200 entries."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    cmd: list[object] = ["tar", "-cf", tarball, "--hard-dereference"]
    for pattern in (
        "site-packages",
        "__pycache__",
        "test",
        "tests",
        "idle_test",
        "config-*",
        "lib-dynload",
        "ensurepip",
        "encodings",
        "idlelib",
        "lib2to3",
        "distutils",
        "tkinter",
        "turtledemo",
        "zoneinfo/right",
        "zoneinfo/localtime",  # an absolute symlink to /etc/localtime
    ):
        cmd.append(f"--exclude={pattern}")
    cmd += ["-C", stdlib.parent, stdlib.name]
    if Path("/usr/share/zoneinfo").is_dir():
        cmd += ["-C", "/usr/share", "zoneinfo"]
    r = run(*cmd)
    assert r.returncode == 0, r.stderr


def test_tar_extract_source_tree_and_diff(mount_factory, bucket: str, tmp_path: Path) -> None:
    # The default TTLs, as a user runs tar: nothing changes the bucket behind this mount, and
    # with 1 s TTLs most of the time went to re-listing directories tar was still filling.
    mnt = mount_factory(bucket)
    tarball = tmp_path / "tree.tar"
    build_source_tarball(tarball)
    ref = tmp_path / "ref"
    ref.mkdir()
    r = run("tar", "-xf", tarball, "-C", ref)
    assert r.returncode == 0, r.stderr
    entries = list(walk(ref))
    files = [p for p in entries if p.is_file() and not p.is_symlink()]
    links = [p for p in entries if p.is_symlink()]
    assert len(files) >= 700, f"source tree too small: {len(files)} files"

    dest = mnt / "tree"
    dest.mkdir()
    started = time.monotonic()
    r = run("tar", "-xf", tarball, "-C", dest, timeout=300)
    took = time.monotonic() - started
    # diff first, so that a failed extraction still says what is missing or different
    d = run("diff", "-r", "--no-dereference", ref, dest, timeout=300)
    assert r.returncode == 0 and d.returncode == 0, (
        f"tar -xf of {len(files)} files and {len(links)} symlinks in {took:.1f}s: "
        f"tar rc={r.returncode}, stderr (head):\n{r.stderr[:1500]}\n"
        f"diff -r rc={d.returncode}, {len(d.stdout.splitlines())} lines (head):\n"
        f"{d.stdout[:1500]}{d.stderr[:500]}{log_tail(mnt)}"
    )

    # tar sets modes (chmod) and mtimes (utimens); compare a sample: every directory, every
    # executable, every 20th regular file.
    sample = [
        p
        for i, p in enumerate(entries)
        if not p.is_symlink() and (p.is_dir() or os.lstat(p).st_mode & 0o111 or i % 20 == 0)
    ]
    assert any(os.lstat(p).st_mode & 0o100 for p in sample if p.is_file())
    wrong = {}
    for p in sample:
        rel = p.relative_to(ref)
        if meta(p) != meta(dest / rel):
            wrong[str(rel)] = (meta(p), meta(dest / rel))
    assert not wrong, f"{len(wrong)} of {len(sample)} differ (expected, actual): " + str(
        dict(list(wrong.items())[:10])
    )


# ---------------------------------------------------------------------------------------------
# 2. git


def test_git_init_add_commit_log_fsck(mnt: Mount, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Test Author",
        "GIT_AUTHOR_EMAIL": "author@example.com",
        "GIT_COMMITTER_NAME": "Test Committer",
        "GIT_COMMITTER_EMAIL": "committer@example.com",
    }
    repo = mnt / "repo"

    def git(*args: object, cwd: Path = repo) -> subprocess.CompletedProcess[str]:
        r = run("git", *args, cwd=cwd, env=env)
        assert r.returncode == 0, f"git {' '.join(map(str, args))}: {explain(mnt, r)}"
        return r

    git("init", "-q", "-b", "main", repo, cwd=mnt.path)
    (repo / "README.md").write_text("# project\n")
    (repo / "src").mkdir()
    (repo / "src" / "main.py").write_text("print('hello')\n" * 50)
    (repo / "src" / "data.bin").write_bytes(os.urandom(200_000))
    (repo / "run.sh").write_text("#!/bin/sh\necho run\n")
    os.chmod(repo / "run.sh", 0o755)
    git("add", ".")
    git("commit", "-q", "-m", "first")

    (repo / "README.md").write_text("# project\n\nmore text\n")
    (repo / "src" / "new.txt").write_text("new\n")
    git("rm", "-q", "src/data.bin")
    git("add", "-A")
    git("commit", "-q", "-m", "second")

    assert git("log", "--format=%s").stdout.split() == ["second", "first"]
    assert git("status", "--porcelain").stdout == ""
    # git probed chmod at init (core.filemode) and recorded the executable bit
    assert "100755" in git("ls-files", "-s", "run.sh").stdout
    r = git("fsck", "--full", "--strict")
    assert "error" not in r.stderr.lower() and "missing" not in r.stdout.lower(), r.stderr
    # gc packs the loose objects (new files, renames, unlinks) and the repository stays whole
    git("gc", "-q")
    git("fsck", "--full", "--strict")
    head = git("rev-parse", "HEAD").stdout.strip()

    clone = tmp_path / "clone"
    git("clone", "-q", repo, clone, cwd=tmp_path)
    assert git("rev-parse", "HEAD", cwd=clone).stdout.strip() == head
    d = run("diff", "-r", "--exclude=.git", repo, clone)
    assert d.returncode == 0, d.stdout


# ---------------------------------------------------------------------------------------------
# 3. rsync


def make_tree(root: Path) -> None:
    """A small tree with varied sizes, modes and mtimes (with nanoseconds)."""
    root.mkdir()
    sizes = [0, 1, 100, 4095, 4096, 65_537, MiB + 7, 3 * MiB]
    modes = [0o644, 0o600, 0o755, 0o640, 0o444, 0o750]
    base = 1_500_000_000_000_000_000
    n = 0
    for d in ("", "a", "a/b", "c"):
        (root / d).mkdir(parents=True, exist_ok=True)
        for size in sizes:
            p = root / d / f"f{n:02d}_{size}.dat"
            p.write_bytes(os.urandom(size))
            os.chmod(p, modes[n % len(modes)])
            set_times(p, base + n * 86_400_123_456_789)
            n += 1
    for i, d in enumerate(("a/b", "a", "c")):  # directories last: their entries change them
        os.chmod(root / d, (0o755, 0o750, 0o700)[i])
        set_times(root / d, base - i * 3_600_000_000_000)


def compare_trees(src: Path, dst: Path) -> list[str]:
    """Differences in names, contents (SHA-256), modes and mtimes (seconds, as rsync sees)."""
    problems = []
    src_entries = [p.relative_to(src) for p in walk(src)]
    dst_entries = [p.relative_to(dst) for p in walk(dst)]
    if src_entries != dst_entries:
        problems.append(f"names differ: {set(src_entries) ^ set(dst_entries)}")
    for rel in src_entries:
        a, b = src / rel, dst / rel
        if not b.exists():
            continue
        sa, sb = os.lstat(a), os.lstat(b)
        if a.is_file() and sha256_file(a) != sha256_file(b):
            problems.append(f"{rel}: content differs")
        if (stat.filemode(sa.st_mode), int(sa.st_mtime)) != (
            stat.filemode(sb.st_mode),
            int(sb.st_mtime),
        ):
            problems.append(
                f"{rel}: {stat.filemode(sa.st_mode)} {int(sa.st_mtime)} != "
                f"{stat.filemode(sb.st_mode)} {int(sb.st_mtime)}"
            )
    return problems


def test_rsync_in_out_and_nothing_to_do_after_remount(
    mnt: Mount, storage: Storage, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    make_tree(src)
    dst = mnt / "dst"
    r = run("rsync", "-a", f"{src}/", f"{dst}/")
    assert r.returncode == 0, explain(mnt, r)
    out = tmp_path / "out"
    r = run("rsync", "-a", f"{dst}/", f"{out}/")
    assert r.returncode == 0, explain(mnt, r)
    assert compare_trees(src, dst) == []
    assert compare_trees(src, out) == []
    for p in walk(src):
        if p.is_file():
            key = f"dst/{p.relative_to(src)}"
            assert s3_sha256(storage, mnt.bucket, key) == sha256_file(p), key

    r = run("rsync", "-a", "--itemize-changes", f"{src}/", f"{dst}/")
    assert r.returncode == 0 and r.stdout == "", "same mount, second rsync: " + explain(mnt, r)

    mnt.unmount()
    mnt.mount()
    r = run("rsync", "-a", "--itemize-changes", f"{src}/", f"{dst}/")
    assert r.returncode == 0 and r.stdout == "", "after a remount: " + explain(mnt, r)


# ---------------------------------------------------------------------------------------------
# 4. sqlite3


def test_sqlite3_transaction_reopen_integrity(mnt: Mount, storage: Storage, tmp_path: Path) -> None:
    db = mnt / "app.db"
    script = ["CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT NOT NULL, payload BLOB);"]
    script.append("BEGIN;")
    script += [
        f"INSERT INTO t(name, payload) VALUES ('row {i}', zeroblob(100));" for i in range(1, 10_001)
    ]
    script.append("COMMIT;")
    r = run("sqlite3", "-bail", db, input="\n".join(script) + "\n")
    assert r.returncode == 0, explain(mnt, r)

    r = run("sqlite3", db, "SELECT count(*), sum(length(payload)), max(name) FROM t;")
    assert r.returncode == 0 and r.stdout.strip() == "10000|1000000|row 9999", explain(mnt, r)
    r = run("sqlite3", db, "PRAGMA integrity_check;")
    assert r.returncode == 0 and r.stdout.strip() == "ok", explain(mnt, r)
    assert not (mnt / "app.db-journal").exists()

    # the object on S3 is the whole database too
    assert s3_keys(storage, mnt.bucket) == {"app.db"}
    local = tmp_path / "from-s3.db"
    local.write_bytes(s3_bytes(storage, mnt.bucket, "app.db"))
    r = run("sqlite3", local, "PRAGMA integrity_check; SELECT count(*) FROM t;")
    assert r.stdout.split() == ["ok", "10000"], r.stderr


# ---------------------------------------------------------------------------------------------
# 5. cp -a and mv across the mount boundary


def make_small_tree(root: Path, seed: int) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(f"text {seed}\n" * 1000)
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "sub" / "b.bin").write_bytes(os.urandom(2 * MiB + seed))
    base = 1_000_000_000_123_456_789 + seed * 1_000_000_007
    for i, (name, mode) in enumerate(
        (("a.txt", 0o640), ("run.sh", 0o755), ("sub/b.bin", 0o600), ("sub", 0o750))
    ):
        os.chmod(root / name, mode)
        set_times(root / name, base + i * 1_111_111_111)


def tree_state(root: Path) -> dict[str, tuple[str, int, str]]:
    """rel path -> (mode, mtime ns, sha256 or '')."""
    return {
        str(p.relative_to(root)): (*meta(p), sha256_file(p) if p.is_file() else "")
        for p in walk(root)
    }


def test_cp_a_and_mv_across_the_mount_both_ways(mnt: Mount, tmp_path: Path) -> None:
    local = tmp_path / "local"
    make_small_tree(local / "tree", 1)
    want = tree_state(local / "tree")

    r = run("cp", "-a", local / "tree", mnt / "tree")
    assert r.returncode == 0, explain(mnt, r)
    assert tree_state(mnt / "tree") == want, "cp -a local -> mount"
    r = run("cp", "-a", mnt / "tree", local / "back")
    assert r.returncode == 0, explain(mnt, r)
    assert tree_state(local / "back") == want, "cp -a mount -> local"

    # mv of a file and of a directory: across file systems, mv copies (keeping mode and
    # mtime) and then removes the source
    make_small_tree(local / "mvdir", 2)
    want_dir = tree_state(local / "mvdir")
    f = local / "single.cfg"
    f.write_text("setting = 1\n")
    os.chmod(f, 0o604)
    set_times(f, 1_234_567_890_987_654_321)
    want_f = meta(f)

    for src, dst in ((local / "mvdir", mnt / "mvdir"), (f, mnt / "single.cfg")):
        r = run("mv", src, dst)
        assert r.returncode == 0, explain(mnt, r)
        assert not src.exists()
    assert tree_state(mnt / "mvdir") == want_dir, "mv local -> mount"
    assert meta(mnt / "single.cfg") == want_f
    assert (mnt / "single.cfg").read_text() == "setting = 1\n"

    for src, dst in ((mnt / "mvdir", local / "mvback"), (mnt / "single.cfg", local / "f.cfg")):
        r = run("mv", src, dst)
        assert r.returncode == 0, explain(mnt, r)
        assert not src.exists()
    assert tree_state(local / "mvback") == want_dir, "mv mount -> local"
    assert meta(local / "f.cfg") == want_f
    assert (local / "f.cfg").read_text() == "setting = 1\n"
    assert sorted(os.listdir(mnt.path)) == ["tree"]


# ---------------------------------------------------------------------------------------------
# 6. a log appended to with >>


def test_shell_append_loop_thousand_lines(mnt: Mount, storage: Storage) -> None:
    log = mnt / "app.log"
    r = run("bash", "-c", f'for i in $(seq 1000); do echo line $i >> "{log}"; done', timeout=180)
    assert r.returncode == 0, explain(mnt, r)
    want = "".join(f"line {i}\n" for i in range(1, 1001))
    got = log.read_text()
    assert got == want, f"{len(got.splitlines())} lines, last: {got.splitlines()[-3:]}"
    assert s3_bytes(storage, mnt.bucket, "app.log") == want.encode()


# ---------------------------------------------------------------------------------------------
# 7. a 200 MB file with dd


def test_dd_200mb_roundtrip_sha256(mnt: Mount, storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "random.bin"
    r = run("dd", "if=/dev/urandom", f"of={src}", "bs=1M", "count=200", "status=none")
    assert r.returncode == 0, r.stderr
    want = sha256_file(src)
    r = run("dd", f"if={src}", f"of={mnt / 'big.bin'}", "bs=1M", "status=none", timeout=300)
    assert r.returncode == 0, explain(mnt, r)
    assert os.stat(mnt / "big.bin").st_size == 200 * MiB

    def sha256sum(path: Path) -> str:
        r = run("sha256sum", path, timeout=300)
        assert r.returncode == 0, explain(mnt, r)
        return r.stdout.split()[0]

    assert sha256sum(mnt / "big.bin") == want
    assert s3_sha256(storage, mnt.bucket, "big.bin") == want
    # after a remount nothing is in the page cache: every byte comes from S3 through the mount
    mnt.unmount()
    mnt.mount()
    assert sha256sum(mnt / "big.bin") == want


# ---------------------------------------------------------------------------------------------
# 8. editor-style saves

EDITOR_SAVE = textwrap.dedent(
    """
    import os, stat, sys
    path, text = sys.argv[1], sys.argv[2]
    mode = stat.S_IMODE(os.stat(path).st_mode)
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".swp-save")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, text.encode())
    os.fsync(fd)
    os.close(fd)
    os.chmod(tmp, mode)  # keep the original's mode, as editors do
    os.rename(tmp, path)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    """
)


def test_editor_style_save_keeps_mode_after_remount(mnt: Mount, storage: Storage) -> None:
    p = mnt / "settings.conf"
    p.write_text("version = 1\n")
    os.chmod(p, 0o640)

    r = run(sys.executable, "-c", EDITOR_SAVE, p, "version = 2\n")
    assert r.returncode == 0, explain(mnt, r)
    assert p.read_text() == "version = 2\n"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    assert sorted(os.listdir(mnt.path)) == ["settings.conf"]
    assert s3_bytes(storage, mnt.bucket, "settings.conf") == b"version = 2\n"

    # real programs that save the same way: sed -i (temp file, fchmod, rename) and vim
    # (backup by rename or copy, write, restore the mode, fsync)
    r = run("sed", "-i", "s/version = 2/version = 3/", p)
    assert r.returncode == 0, explain(mnt, r)
    assert p.read_text() == "version = 3\n"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    r = run("vim", "-u", "NONE", "-i", "NONE", "-n", "-Es", "-c", "%s/3/4/", "-c", "wq", p)
    assert r.returncode == 0, explain(mnt, r)
    assert p.read_text() == "version = 4\n"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    assert sorted(os.listdir(mnt.path)) == ["settings.conf"]
    assert s3_keys(storage, mnt.bucket) == {"settings.conf"}

    mnt.unmount()
    mnt.mount()
    assert p.read_text() == "version = 4\n"
    mode = stat.S_IMODE(os.stat(p).st_mode)
    assert mode == 0o640, f"mode after remount: {mode:o}"


# ---------------------------------------------------------------------------------------------
# 9. programs at the same time


def test_parallel_dd_reads_and_writes_of_different_files(
    mount_factory, bucket: str, storage: Storage, tmp_path: Path
) -> None:
    size = 24 * MiB
    for name in ("r1", "r2"):
        storage.client.put_object(Bucket=bucket, Key=name, Body=os.urandom(size))
    want_r = {n: s3_sha256(storage, bucket, n) for n in ("r1", "r2")}
    m = mount_factory(bucket)
    for name in ("w1", "w2"):
        run("dd", "if=/dev/urandom", f"of={tmp_path / name}", "bs=1M", "count=24", "status=none")
    want_w = {n: sha256_file(tmp_path / n) for n in ("w1", "w2")}

    procs = [
        subprocess.Popen(
            ["dd", f"if={tmp_path / n}", f"of={m / n}", "bs=128k", "status=none"],
            stderr=subprocess.PIPE,
        )
        for n in ("w1", "w2")
    ] + [
        subprocess.Popen(
            ["dd", f"if={m / n}", f"of={tmp_path / n}", "bs=128k", "status=none"],
            stderr=subprocess.PIPE,
        )
        for n in ("r1", "r2")
    ]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, f"{p.args}: {err!r}{log_tail(m)}"

    for n in ("r1", "r2"):
        assert sha256_file(tmp_path / n) == want_r[n], n
    for n in ("w1", "w2"):
        assert s3_sha256(storage, bucket, n) == want_w[n], n
        assert sha256_file(m / n) == want_w[n], n


WRITER = textwrap.dedent(
    """
    import os, sys
    path, versions, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    tmp = path + ".tmp"
    for v in range(1, versions + 1):
        with open(tmp, "wb") as f:
            f.write(bytes([v]) * size)
        os.rename(tmp, path)
    """
)

READER = textwrap.dedent(
    """
    import os, sys, time
    path, size, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    seen, reads = set(), 0
    while not os.path.exists(stop):
        with open(path, "rb") as f:
            chunks = []
            while chunk := f.read(256 * 1024):
                chunks.append(chunk)
                time.sleep(0.001)
        data = b"".join(chunks)
        values = set(data)
        if len(data) != size or len(values) != 1:
            print(f"BAD read {reads}: {len(data)} bytes, fill values {sorted(values)[:20]}")
            sys.exit(1)
        seen |= values
        reads += 1
    print(reads, len(seen))
    """
)


def test_reader_sees_whole_versions_while_writer_replaces(mnt: Mount, tmp_path: Path) -> None:
    # The writer replaces the file the way programs that want readers to see whole versions
    # do: a temp file renamed over it. (Rewriting in place with O_TRUNC lets a reader see a
    # short or mixed file on any file system, so there is nothing to assert about that.)
    # The reader opens the file afresh each time and reads it in 256 KiB pieces: every read
    # must be one version whole, from the right size down to the last byte, even when the
    # rename happens while the reader has the old version open.
    size, versions = 3 * MiB + 12345, 40
    p = mnt / "shared.bin"
    p.write_bytes(bytes([0]) * size)
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(p), str(size), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        w = run(sys.executable, "-c", WRITER, p, versions, size, timeout=240)
        time.sleep(0.5)  # a few reads of the last version too
    finally:
        stop.touch()
    out, err = reader.communicate(timeout=60)
    assert w.returncode == 0, explain(mnt, w)
    assert reader.returncode == 0, f"{out}{err}{log_tail(mnt)}"
    reads, distinct = map(int, out.split())
    assert reads >= 5 and distinct >= 2, out
    assert p.read_bytes() == bytes([versions]) * size


def test_flock_between_processes(mnt: Mount, tmp_path: Path) -> None:
    # flock(2) works on this mount between processes of this machine: the daemon implements
    # no lock operations, so the kernel keeps the locks itself (local to the machine; other
    # clients of the bucket do not see them). A second `flock -n` fails with exit 1 while the
    # first holds the lock, and a blocking `flock` waits until it is released.
    lock = mnt / "lockfile"
    held = tmp_path / "held"
    holder = subprocess.Popen(
        ["flock", str(lock), "sh", "-c", f"touch {held}; sleep 3"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not held.exists():
            assert holder.poll() is None, f"holder exited: {holder.stderr.read()}"
            assert time.monotonic() < deadline, "holder never took the lock"
            time.sleep(0.05)
        r = run("flock", "-n", lock, "true")
        assert r.returncode == 1, f"flock -n while held: {explain(mnt, r)}"
        started = time.monotonic()
        r = run("flock", lock, "true", timeout=30)
        waited = time.monotonic() - started
        assert r.returncode == 0, explain(mnt, r)
        assert waited > 1.0, f"blocking flock returned after {waited:.2f}s while the lock was held"
    finally:
        holder.wait(30)
    assert holder.returncode == 0
    r = run("flock", "-n", lock, "true")
    assert r.returncode == 0, explain(mnt, r)
