"""Hostile and odd input on a real mount.

- Keys that cannot be file names (``a//b``, ``./x``, ``../y``, over-long components, a key
  next to a prefix of the same name, a marker with a body, control characters...): the mount
  shows or skips each exactly as docs/semantics.md ("How keys become files") says, never
  fails a whole directory because of one odd key, and keeps answering.
- Names S3 cannot store: not UTF-8 (``EINVAL``), over 255 bytes or a key over 1,024 bytes
  (``ENAMETOOLONG``).
- Eight programs reading and writing at once, on eight files and on one shared file: no
  corruption, on the mount and in S3.

Failure messages carry the tail of the daemon's log (``CACHE_DIR/s3mount.log``).
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import urllib3
from conftest import Mount, s3_bytes, s3_keys

from s3mount.control import process_running
from s3mount.storage import Storage

MiB = 1024 * 1024


def log_text(m: Mount) -> str:
    try:
        return (m.cache / "s3mount.log").read_text(errors="replace")
    except OSError as e:
        return f"(no daemon log: {e})"


def log_tail(m: Mount, lines: int = 30) -> str:
    return "\n--- s3mount.log (tail) ---\n" + "\n".join(log_text(m).splitlines()[-lines:])


def ls_la(m: Mount, path: Path) -> subprocess.CompletedProcess[bytes]:
    r = subprocess.run(["ls", "-la", str(path)], capture_output=True, timeout=60)
    assert r.returncode == 0, f"ls -la {path}: {r.stderr!r}{log_tail(m)}"
    return r


def errno_of(action) -> int | None:
    """The errno an action fails with, or None when it succeeds."""
    try:
        action()
    except OSError as e:
        return e.errno
    return None


def create(path: Path | bytes, data: bytes = b"") -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        if data:
            os.write(fd, data)
    finally:
        os.close(fd)


def assert_alive(m: Mount) -> None:
    status = m.status()
    assert status["pid"] == m.pid, f"the daemon changed: {status}{log_tail(m)}"
    assert process_running(m.pid)
    os.listdir(m.path)


# -- keys that cannot be file names ---------------------------------------------------------

# Every key below is put with boto3.  SHOWN says what each directory of the mount must list
# (name -> body, or DIR); a key whose name is in no SHOWN entry must be skipped.
DIR = object()

# Names the docs call usable: shown as they are.
ODD_BUT_USABLE = [
    "sp ace",
    " lead",
    "two  spaces inside",
    "caf\u00e9 \u65e5\u672c \U0001f600",
    "e\u0301 combining",
    "\u202eright-to-left",
    "a%20b",
    "100%",
    "%2F",
    "%",
    "a+b",
    "+",
    "a*b",
    "*",
    "a?b",
    "?",
    "a\\b",
    "\\",
    "...",
    ".hidden",
    "-rf",
    "~",
    "#frag",
    "a&b=c",
    "<>|:\"'",
    "cr\rinside",
]
# Control characters: valid UTF-8, still usable names (only NUL is not).
CONTROL = ["a\x01b", "bell\x07", "esc\x1b[31mred", "tab\tinside", "del\x7f", "c1\u0085x"]

HOSTILE_KEYS: dict[str, bytes] = {
    # a "" component (double slash): skipped
    "a//b": b"double slash",
    "a/sibling": b"a sibling",
    # "." and ".." components: skipped, and everything below them too
    "./x": b"dot",
    "../y": b"dotdot",
    "root-sibling": b"root sibling",
    "dir/./z": b"dot inside",
    "dir/../w": b"dotdot inside",
    "dir/.": b"a key named .",
    "dir/..": b"a key named ..",
    "dir/sibling": b"dir sibling",
    "skip/../deeper/file": b"below a .. component",
    "skip/sibling": b"skip sibling",
    # names over 255 bytes: skipped; 255 bytes: shown
    "long/" + "L" * 256: b"256 bytes",
    "long/" + "\u00e9" * 128: b"128 two-byte characters: 256 bytes",
    "long/" + "M" * 300 + "/below": b"below an over-long component",
    "long/" + "L" * 255: b"255 bytes",
    "long/" + "\u00e9" * 127 + "e": b"255 bytes of UTF-8",
    "long/sibling": b"long sibling",
    # NUL in a name: skipped
    "nul/a\x00b": b"nul",
    "nul/sibling": b"nul sibling",
    # a key next to a prefix of the same name: the directory wins, the file is hidden
    "x": b"the file x",
    "x/child": b"x's child",
    # a directory marker with a body: the directory is shown, the body is not
    "withbody/": b"a marker with content",
    "withbody/inner": b"inner",
    "names/sibling": b"names sibling",
    "ctl/sibling": b"ctl sibling",
}
for _n in ODD_BUT_USABLE:
    HOSTILE_KEYS["names/" + _n] = f"body of {_n!r}".encode()
for _n in CONTROL:
    HOSTILE_KEYS["ctl/" + _n] = f"body of {_n!r}".encode()

SHOWN: dict[str, dict[str, object]] = {
    "": {
        "a": DIR,
        "dir": DIR,
        "skip": DIR,
        "long": DIR,
        "nul": DIR,
        "x": DIR,
        "withbody": DIR,
        "names": DIR,
        "ctl": DIR,
        "root-sibling": b"root sibling",
    },
    "a": {"sibling": b"a sibling"},
    "dir": {"sibling": b"dir sibling"},
    "skip": {"sibling": b"skip sibling"},
    "long": {
        "L" * 255: b"255 bytes",
        "\u00e9" * 127 + "e": b"255 bytes of UTF-8",
        "sibling": b"long sibling",
    },
    "nul": {"sibling": b"nul sibling"},
    "x": {"child": b"x's child"},
    "withbody": {"inner": b"inner"},
    "names": {"sibling": b"names sibling"}
    | {n: HOSTILE_KEYS["names/" + n] for n in ODD_BUT_USABLE},
    "ctl": {"sibling": b"ctl sibling"} | {n: HOSTILE_KEYS["ctl/" + n] for n in CONTROL},
}

# How many keys each listing skips (docs: one INFO line per listing with the number).
SKIPPED = {"/": 2, "a/": 1, "dir/": 4, "skip/": 1, "long/": 3, "nul/": 1}


def check_directory(m: Mount, rel: str, expected: dict[str, object]) -> None:
    d = m.path / rel if rel else m.path
    out = ls_la(m, d).stdout
    names = sorted(os.listdir(d))
    assert names == sorted(expected), f"{rel or '/'}: {names!r}{log_tail(m)}"
    for name, body in expected.items():
        p = d / name
        assert os.fsencode(name) in out, f"ls -la {rel}/ misses {name!r}"
        if body is DIR:
            assert p.is_dir(), f"{rel}/{name!r} is not a directory"
        else:
            assert p.is_file(), f"{rel}/{name!r} is not a file"
            assert p.read_bytes() == body, f"{rel}/{name!r} reads wrong data"
            assert os.stat(p).st_size == len(body)


def test_odd_keys_are_shown_or_skipped_as_documented(
    mount_factory, bucket: str, storage: Storage
) -> None:
    for key, body in HOSTILE_KEYS.items():
        storage.client.put_object(Bucket=bucket, Key=key, Body=body)
    assert s3_keys(storage, bucket) == set(HOSTILE_KEYS)  # moto stored every key as given

    m = mount_factory(bucket, "--listing-ttl", "1", "--attr-timeout", "0.5")
    for rel, expected in SHOWN.items():
        check_directory(m, rel, expected)
    assert_alive(m)

    # The hidden file x: the directory x wins, and the log says so.
    assert os.path.isdir(m / "x")
    log = log_text(m)
    assert "WARNING" in log and "key x is hidden by the directory x/" in log, log_tail(m)
    for dkey, n in SKIPPED.items():
        assert f"{dkey}: skipped {n} keys that cannot be file names" in log, (dkey, log_tail(m))

    # Names that are skipped cannot be reached by a path either.
    for bad in ("long/" + "L" * 256, "long/" + "\u00e9" * 128):
        assert errno_of(lambda b=bad: os.stat(m / b)) == errno.ENAMETOOLONG

    # Whatever the mount did, it did not touch the odd keys.
    assert s3_keys(storage, bucket) == set(HOSTILE_KEYS)

    # A second look, after the listings expired, and after a remount: the same.
    time.sleep(1.2)
    for rel, expected in SHOWN.items():
        check_directory(m, rel, expected)
    m.unmount()
    m.mount()
    for rel, expected in SHOWN.items():
        check_directory(m, rel, expected)
    assert_alive(m)
    assert s3_keys(storage, bucket) == set(HOSTILE_KEYS)


def test_key_next_to_prefix_shows_the_file_once_the_prefix_is_gone(
    mount_factory, bucket: str, storage: Storage
) -> None:
    storage.client.put_object(Bucket=bucket, Key="x", Body=b"the file x")
    storage.client.put_object(Bucket=bucket, Key="x/child", Body=b"child")
    m = mount_factory(bucket, "--listing-ttl", "1", "--attr-timeout", "0.5")
    assert os.path.isdir(m / "x")
    # Creating the file x through the mount is refused: the name is a directory.
    assert errno_of(lambda: create(m / "x", b"new")) == errno.EISDIR
    os.unlink(m / "x" / "child")
    assert os.listdir(m / "x") == []
    deadline = time.monotonic() + 10
    while not os.path.isfile(m / "x"):  # within the listing TTL plus the kernel's cache
        assert time.monotonic() < deadline, f"the file x never came back{log_tail(m)}"
        time.sleep(0.2)
    assert (m / "x").read_bytes() == b"the file x"
    assert s3_keys(storage, bucket) == {"x"}


def test_marker_with_a_body_keeps_its_body_through_rename(
    mount_factory, bucket: str, storage: Storage
) -> None:
    storage.client.put_object(Bucket=bucket, Key="withbody/", Body=b"marker body")
    storage.client.put_object(Bucket=bucket, Key="withbody/inner", Body=b"inner")
    m = mount_factory(bucket, "--listing-ttl", "1", "--attr-timeout", "0.5")
    assert os.listdir(m / "withbody") == ["inner"]
    assert os.stat(m / "withbody").st_size == 0
    os.rename(m / "withbody", m / "moved")
    assert os.listdir(m / "moved") == ["inner"]
    assert (m / "moved" / "inner").read_bytes() == b"inner"
    assert s3_keys(storage, bucket) == {"moved/", "moved/inner"}
    assert s3_bytes(storage, bucket, "moved/") == b"marker body"
    os.unlink(m / "moved" / "inner")
    os.rmdir(m / "moved")
    assert s3_keys(storage, bucket) == set()
    assert_alive(m)


def test_newline_in_a_key_does_not_hide_its_siblings(
    mount_factory, bucket: str, storage: Storage
) -> None:
    # moto's server routes no URL path with a newline in it: PUT gives 404.  A browser-form
    # POST carries the key in the body, so it can store one.  (GET and HEAD of it still give
    # 404 in moto, so the mount cannot show it here; on S3 it is a usable name.)
    post = storage.client.generate_presigned_post(bucket, "nl/a\nb")
    fields = dict(post["fields"])
    fields["file"] = ("f", b"newline")
    r = urllib3.PoolManager().request("POST", post["url"], fields=fields)
    assert r.status in (200, 201, 204), r.data
    storage.client.put_object(Bucket=bucket, Key="nl/sibling", Body=b"sibling")
    assert s3_keys(storage, bucket) == {"nl/a\nb", "nl/sibling"}

    m = mount_factory(bucket, "--listing-ttl", "1", "--attr-timeout", "0.5")
    ls_la(m, m / "nl")
    names = set(os.listdir(m / "nl"))
    assert "sibling" in names and names <= {"sibling", "a\nb"}, names
    assert (m / "nl" / "sibling").read_bytes() == b"sibling"
    assert_alive(m)


def test_odd_but_usable_names_created_through_the_mount(
    mount_factory, bucket: str, storage: Storage
) -> None:
    # Newline is left out: moto cannot store it through a PUT (see the test above).
    names = ODD_BUT_USABLE + CONTROL
    m = mount_factory(bucket, "--listing-ttl", "1", "--attr-timeout", "0.5")
    os.mkdir(m / "made")
    for n in names:
        create(m / "made" / n, n.encode() * 3)
        os.mkdir(m / "made" / ("dir " + n))
    expected = {n: n.encode() * 3 for n in names} | {"dir " + n: DIR for n in names}
    check_directory(m, "made", expected)
    keys = s3_keys(storage, bucket)
    assert keys == {"made/"} | {"made/" + n for n in names} | {f"made/dir {n}/" for n in names}
    for n in names:
        assert s3_bytes(storage, bucket, "made/" + n) == n.encode() * 3, n
    m.unmount()
    m.mount()
    check_directory(m, "made", expected)


def test_names_ending_in_whitespace(mount_factory, bucket: str, storage: Storage) -> None:
    storage.client.put_object(Bucket=bucket, Key="ws/trail ", Body=b"key with a trailing space")
    storage.client.put_object(Bucket=bucket, Key="ws/same", Body=b"without")
    storage.client.put_object(Bucket=bucket, Key="ws/same ", Body=b"with a space")
    m = mount_factory(bucket, "--listing-ttl", "1", "--attr-timeout", "0.5")

    # Made through the mount: "a" and "a " are two files.
    create(m / "a", b"plain")
    create(m / "a ", b"space")
    assert (m / "a").read_bytes() == b"plain", "writing 'a ' overwrote 'a'"
    assert sorted(os.listdir(m.path)) == ["a", "a ", "ws"]
    assert {"a", "a "} <= s3_keys(storage, bucket)
    for n in ("tab\t", "nbsp\u00a0", "cr\r", "ideographic\u3000", " "):
        create(m / n, n.encode())
        assert (m / n).read_bytes() == n.encode(), repr(n)
        assert n in s3_keys(storage, bucket), repr(n)

    # Put by another tool: listed, and each reads its own data.
    assert sorted(os.listdir(m / "ws")) == ["same", "same ", "trail "]
    assert (m / "ws" / "trail ").read_bytes() == b"key with a trailing space"
    assert (m / "ws" / "same ").read_bytes() == b"with a space"


def test_1024_byte_key_does_not_break_its_directory(
    mount_factory, bucket: str, storage: Storage
) -> None:
    parent = "deep/" + "/".join(["c" * 250] * 4)  # 1,008 bytes
    key = parent + "/" + "z" * (1024 - len(parent) - 1)
    assert len(key.encode()) == 1024
    storage.client.put_object(Bucket=bucket, Key=key, Body=b"1024")
    storage.client.put_object(Bucket=bucket, Key=parent + "/sibling", Body=b"sibling")
    m = mount_factory(bucket, "--listing-ttl", "1", "--attr-timeout", "0.5")
    d = m.path / parent
    try:
        r = subprocess.run(["ls", "-la", str(d)], capture_output=True, timeout=60)
        assert r.returncode == 0, f"ls -la: {r.stderr[-200:]!r}{log_tail(m)}"
        assert "sibling" in os.listdir(d)
        assert (d / "sibling").read_bytes() == b"sibling"
    finally:
        assert_alive(m)


def test_rmdir_of_a_directory_holding_only_odd_keys(
    mount_factory, bucket: str, storage: Storage
) -> None:
    storage.client.put_object(Bucket=bucket, Key="onlyodd//b", Body=b"hidden")
    m = mount_factory(bucket, "--listing-ttl", "1", "--attr-timeout", "0.5")
    assert os.listdir(m / "onlyodd") == []
    code = errno_of(lambda: os.rmdir(m / "onlyodd"))
    assert_alive(m)
    assert code in (None, errno.ENOTEMPTY)
    if code is None:
        time.sleep(1.5)  # listing TTL + kernel cache
        assert "onlyodd" not in os.listdir(m.path), "rmdir succeeded but the directory stays"
    else:
        assert "onlyodd//b" in s3_keys(storage, bucket)


# -- names S3 cannot store ------------------------------------------------------------------


def test_names_that_are_not_utf8_give_einval(mnt: Mount, storage: Storage) -> None:
    root = bytes(mnt.path)
    create(mnt / "good", b"good")
    os.mkdir(mnt / "gooddir")
    bad_names = [b"\xff\xfe", b"caf\xe9", b"\xed\xa0\x80surrogate", b"\xc0\xafoverlong"]
    for bad in bad_names:
        p = root + b"/" + bad
        assert errno_of(lambda p=p: os.close(os.open(p, os.O_CREAT | os.O_WRONLY))) == (
            errno.EINVAL
        ), bad
        assert errno_of(lambda p=p: os.mkdir(p)) == errno.EINVAL, bad
        assert errno_of(lambda p=p: os.stat(p)) == errno.EINVAL, bad
        assert errno_of(lambda p=p: os.rename(root + b"/good", p)) == errno.EINVAL, bad
        assert errno_of(lambda p=p: os.rename(root + b"/gooddir", p)) == errno.EINVAL, bad
        inner = root + b"/gooddir/" + bad
        assert errno_of(lambda p=inner: create(p, b"x")) == errno.EINVAL, bad
        assert_alive(mnt)
    assert sorted(os.listdir(mnt.path)) == ["good", "gooddir"]
    assert os.listdir(mnt / "gooddir") == []
    assert (mnt / "good").read_bytes() == b"good"
    assert s3_keys(storage, mnt.bucket) == {"good", "gooddir/"}
    assert "Traceback" not in log_text(mnt), log_tail(mnt)


def test_names_too_long_give_enametoolong(mnt: Mount, storage: Storage) -> None:
    # One component over 255 bytes: refused, whatever the path does.
    for n in (256, 300, 1100, 4000):
        long = mnt / ("n" * n)
        assert errno_of(lambda p=long: create(p)) == errno.ENAMETOOLONG, n
        assert errno_of(lambda p=long: os.mkdir(p)) == errno.ENAMETOOLONG, n
        assert errno_of(lambda p=long: os.stat(p)) == errno.ENAMETOOLONG, n
    assert errno_of(lambda: create(mnt / ("\u00e9" * 128))) == errno.ENAMETOOLONG  # 256 bytes
    create(mnt / ("n" * 255), b"255")
    create(mnt / ("\u00e9" * 127 + "e"), b"255 bytes of UTF-8")
    create(mnt / "short", b"short")
    assert errno_of(lambda: os.rename(mnt / "short", mnt / ("n" * 256))) == errno.ENAMETOOLONG

    # Keys over 1,024 bytes (S3's limit): five levels of 200-byte directories take 1,004.
    d = mnt.path
    for _ in range(5):
        d = d / ("d" * 200)
        os.mkdir(d)
    prefix = len(os.fsencode(os.path.relpath(d, mnt.path))) + 1  # 1,005 with the slash
    assert prefix == 1005
    assert errno_of(lambda: os.mkdir(d / ("d" * 200))) == errno.ENAMETOOLONG
    assert errno_of(lambda: create(d / ("f" * 200))) == errno.ENAMETOOLONG
    create(d / ("f" * (1024 - prefix)), b"a key of 1,024 bytes")
    assert errno_of(lambda: create(d / ("f" * (1025 - prefix)))) == errno.ENAMETOOLONG
    os.mkdir(d / ("m" * (1023 - prefix)))  # its marker takes the 1,024th byte
    assert errno_of(lambda: os.mkdir(d / ("m" * (1024 - prefix)))) == errno.ENAMETOOLONG
    assert errno_of(lambda: os.rename(mnt / "short", d / ("s" * 100))) == errno.ENAMETOOLONG
    assert (mnt / "short").read_bytes() == b"short"

    assert_alive(mnt)
    keys = s3_keys(storage, mnt.bucket)
    assert max(len(k.encode()) for k in keys) == 1024
    assert "f" * (1024 - prefix) in {k.rsplit("/", 1)[-1] for k in keys}
    r = subprocess.run(["ls", "-laR", str(mnt.path)], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr[-300:]
    assert (d / ("f" * (1024 - prefix))).read_bytes() == b"a key of 1,024 bytes"


def deep_tree(mnt: Mount) -> Path:
    """A directory whose deepest key is 1,023 bytes long: any longer name for it is too long."""
    top = mnt / ("t" * 200)
    d = top
    os.mkdir(d)
    for _ in range(4):
        d = d / ("d" * 200)
        os.mkdir(d)
    create(d / ("f" * 18), b"deepest")  # 5 * 200 + 5 + 18 = 1,023 bytes
    create(top / "near-the-top", b"top")
    return top


def test_rename_of_a_directory_whose_keys_would_get_too_long(mnt: Mount, storage: Storage) -> None:
    top = deep_tree(mnt)
    before = s3_keys(storage, mnt.bucket)
    assert max(len(k.encode()) for k in before) == 1023
    code = errno_of(lambda: os.rename(top, mnt / ("T" * 210)))
    assert code == errno.ENAMETOOLONG, f"rename gave {code}{log_tail(mnt)}"
    # Nothing was deleted: the tree is still there, whole.
    assert before <= s3_keys(storage, mnt.bucket)
    assert (top / "near-the-top").read_bytes() == b"top"
    deepest = top.joinpath(*["d" * 200] * 4, "f" * 18)
    assert deepest.read_bytes() == b"deepest"
    assert_alive(mnt)


def test_failed_rename_of_a_directory_leaves_no_partial_copy(mnt: Mount, storage: Storage) -> None:
    top = deep_tree(mnt)
    before = s3_keys(storage, mnt.bucket)
    assert errno_of(lambda: os.rename(top, mnt / ("T" * 210))) == errno.ENAMETOOLONG
    assert s3_keys(storage, mnt.bucket) == before
    time.sleep(1.5)  # listing TTL + kernel cache
    assert sorted(os.listdir(mnt.path)) == ["t" * 200]


# -- eight programs at once -------------------------------------------------------------------

# One program of the concurrency tests, run as `python -c CHILD MODE ...`.  Data is derived
# from seeds, so every process (and the test) knows what each byte must be.
CHILD = textwrap.dedent(
    r"""
    import os, random, sys, time

    def data(seed, n):
        return random.Random(seed).randbytes(n)

    def wait_for(path):
        deadline = time.monotonic() + 120
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                sys.exit(f"{path} never appeared")
            time.sleep(0.01)

    mode, path, ctl, me = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rng = random.Random(1000 + me)

    if mode == "own":  # write a whole file in random-sized chunks, then check it
        size = int(sys.argv[5])
        payload = data(me, size)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        open(f"{ctl}/ready-{me}", "w").close()
        wait_for(f"{ctl}/go")
        pos = 0
        while pos < size:
            n = rng.randint(1, 300_000)
            pos += os.write(fd, payload[pos : pos + n])
        os.close(fd)
        fd = os.open(path, os.O_RDONLY)
        back = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
        os.close(fd)
        if back != payload:
            sys.exit(f"{path}: read back {len(back)} bytes, not what was written")

    elif mode == "region":  # write my region of the shared file, in random chunks and order
        region, total = int(sys.argv[5]), int(sys.argv[6])
        new = data(me, region)
        start = me * region
        fd = os.open(path, os.O_RDWR)
        open(f"{ctl}/ready-{me}", "w").close()
        wait_for(f"{ctl}/go")
        chunks, pos = [], 0
        while pos < region:
            n = min(rng.randint(1, 20_000), region - pos)
            chunks.append((pos, n))
            pos += n
        rng.shuffle(chunks)
        for off, n in chunks:
            if os.pwrite(fd, new[off : off + n], start + off) != n:
                sys.exit("short pwrite")
        if os.pread(fd, region, start) != new:
            sys.exit(f"region {me}: my own writes do not read back before close")
        if os.fstat(fd).st_size != total:
            sys.exit(f"size changed to {os.fstat(fd).st_size}")
        os.close(fd)

    elif mode == "read":  # read ranges until told to stop; every byte is old or new
        region, total, writers = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
        old = data(-1, total)
        new = b"".join(data(w, region) for w in range(writers))
        fd = os.open(path, os.O_RDONLY)
        open(f"{ctl}/ready-{me}", "w").close()
        wait_for(f"{ctl}/go")
        reads = seen_new = mixed = 0
        while not os.path.exists(f"{ctl}/stop") or reads < 20:
            off = rng.randrange(total)
            n = rng.randint(1, 64 * 1024)
            got = os.pread(fd, n, off)
            if len(got) != min(n, total - off):
                sys.exit(f"short read at {off}: {len(got)} of {n}")
            if got == new[off : off + n]:
                seen_new += len(got)
            elif got != old[off : off + n]:  # a mix: check byte by byte
                mixed += 1
                for i, b in enumerate(got):
                    if b != old[off + i]:
                        if b != new[off + i]:
                            sys.exit(f"byte {off + i} is {b}: neither the old {old[off + i]} "
                                     f"nor the new {new[off + i]}")
                        seen_new += 1
            reads += 1
        os.close(fd)
        print(f"{reads} reads, {mixed} mixed, {seen_new} new bytes seen")
    """
)


def data(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def run_children(m: Mount, ctl: Path, children: list[list[str]], stop_after: int) -> None:
    """Start every child, let them all go at once, stop the readers when the first
    ``stop_after`` (the writers) are done, and require every child to succeed."""
    ctl.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in children
    ]
    try:
        deadline = time.monotonic() + 60
        while len(list(ctl.glob("ready-*"))) < len(procs):
            assert time.monotonic() < deadline, "children never got ready"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.02)
        (ctl / "go").touch()
        results = []
        for i, p in enumerate(procs):
            if i == stop_after:
                (ctl / "stop").touch()
            out, err = p.communicate(timeout=240)
            results.append((children[i][0], p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [r for r in results if r[1] != 0]
    assert not failed, f"{failed}{log_tail(m)}"


def test_eight_writers_on_eight_files(mnt: Mount, storage: Storage, tmp_path: Path) -> None:
    rng = random.Random(8)
    sizes = [rng.randint(2 * MiB, 5 * MiB) for _ in range(8)]
    os.mkdir(mnt / "eight")
    children = [
        ["own", str(mnt / "eight" / f"f{i}"), str(tmp_path / "ctl"), str(i), str(sizes[i])]
        for i in range(8)
    ]
    run_children(mnt, tmp_path / "ctl", children, stop_after=8)
    assert sorted(os.listdir(mnt / "eight")) == [f"f{i}" for i in range(8)]
    for i in range(8):
        payload = data(i, sizes[i])
        assert (mnt / "eight" / f"f{i}").read_bytes() == payload, f"f{i} on the mount"
        assert s3_bytes(storage, mnt.bucket, f"eight/f{i}") == payload, f"f{i} in S3"
    assert_alive(mnt)
    assert mnt.status()["dirty_files"] == 0


def test_eight_writers_and_readers_on_one_shared_file(
    mnt: Mount, storage: Storage, tmp_path: Path
) -> None:
    writers, readers, region = 8, 4, 512 * 1024 + 123  # regions straddle 1 MiB blocks
    total = writers * region
    old = data(-1, total)
    (mnt / "shared").write_bytes(old)
    assert s3_bytes(storage, mnt.bucket, "shared") == old
    time.sleep(0.6)  # let the kernel forget its attributes: the file is opened fresh
    ctl = tmp_path / "ctl"
    args = [str(mnt / "shared"), str(ctl)]
    children = [["region", *args, str(i), str(region), str(total)] for i in range(writers)]
    children += [
        ["read", *args, str(100 + i), str(region), str(total), str(writers)] for i in range(readers)
    ]
    run_children(mnt, ctl, children, stop_after=writers)

    def wrong_regions(got: bytes) -> list[int]:
        assert len(got) == total
        return [w for w in range(writers) if got[w * region : (w + 1) * region] != data(w, region)]

    bad = wrong_regions((mnt / "shared").read_bytes())
    assert not bad, f"regions {bad} are wrong on the mount{log_tail(mnt)}"
    bad = wrong_regions(s3_bytes(storage, mnt.bucket, "shared"))
    assert not bad, f"regions {bad} are wrong in S3{log_tail(mnt)}"
    assert_alive(mnt)
    assert mnt.status()["dirty_files"] == 0
