"""Every CLI command, run as a subprocess (``python -m s3mount``) against the moto server."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MotoServer, new_bucket_name, run_cli
from faultproxy import FaultProxy

from s3mount.storage import S3Name, Storage, StorageError, WriteOptions

SECRET = "testing-secret-key"
KEY_ID = "testing-key-id"
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  +(\d+)  (.+)$")  # a `list` line


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert SECRET not in r.stdout + r.stderr
    return r


def failed(r: subprocess.CompletedProcess, exit_code: int = 3, *, contains: str = "") -> str:
    """Check a failure: the exit code and exactly one line on stderr.  Returns that line."""
    assert r.returncode == exit_code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("s3mount: error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert SECRET not in r.stderr + r.stdout and KEY_ID not in r.stderr
    assert contains in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def cli(s3_server: MotoServer):
    def run(*args: str, **kwargs):
        return run_cli(*args, endpoint=s3_server.endpoint, **kwargs)

    return run


def keys_of(storage: Storage, bucket: str) -> list[str]:
    return [k.key for k in storage.bucket_list_keys(bucket)]


def remote_bytes(storage: Storage, bucket: str, key: str) -> bytes:
    info = storage.head(S3Name(key, bucket))
    return storage.read_range(S3Name(key, bucket), 0, info.size)


# ---------------------------------------------------------------------------------------------
# Buckets


def test_bucket_commands(cli, storage: Storage):
    name = new_bucket_name()
    try:
        r = ok(cli("create-bucket", name))
        assert r.stdout == "" and r.stderr == ""
        assert storage.bucket_exists(name)

        r = ok(cli("list-buckets"))
        listed = [line.split()[-1] for line in r.stdout.splitlines()]
        assert name in listed
        assert all(
            re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  \S+$", x) for x in r.stdout.splitlines()
        )

        r = ok(cli("list-buckets", name))
        assert r.stdout.splitlines()[0].endswith(f"  {name}") and len(r.stdout.splitlines()) == 1

        missing = new_bucket_name()
        r = cli("list-buckets", missing)
        assert r.returncode == 1 and r.stdout == f"{missing} NOT FOUND\n" and r.stderr == ""

        ok(cli("delete-bucket", name))
        assert not storage.bucket_exists(name)
        assert cli("list-buckets", name).returncode == 1
    finally:
        with contextlib.suppress(StorageError):
            storage.bucket_delete(name, force=True)


def test_create_and_delete_default_bucket(cli, storage: Storage):
    name = new_bucket_name()
    ok(cli("create-bucket", "--bucket", name))
    assert storage.bucket_exists(name)
    ok(cli("delete-bucket", env={"S3MOUNT_BUCKET": name}))
    assert not storage.bucket_exists(name)


def test_delete_bucket_refuses_non_empty_and_force(cli, storage: Storage, tmp_path: Path):
    name = new_bucket_name()
    storage.bucket_create(name)
    try:
        storage.bucket_configure(name, versioning=True)
        f = tmp_path / "f.txt"
        for text in ("one", "two"):
            f.write_text(text)
            storage.write(str(f), S3Name("f.txt", name))
        failed(cli("delete-bucket", name), contains="bucket is not empty")
        assert storage.bucket_exists(name)
        r = ok(cli("delete-bucket", name, "--force"))
        assert r.stderr == "deleted 2 objects and versions\n"
        assert not storage.bucket_exists(name)
    finally:
        with contextlib.suppress(StorageError):
            storage.bucket_delete(name, force=True)


def test_configure_bucket(cli, storage: Storage, bucket: str):
    r = ok(cli("configure-bucket", bucket, "--versioning", "on", "--tag", "b=2", "--tag", "a=1"))
    assert r.stdout == "versioning: Enabled\ntag: a=1\ntag: b=2\n"
    assert storage.bucket_configuration(bucket) == {
        "versioning": "Enabled",
        "tags": {"a": "1", "b": "2"},
    }
    r = ok(cli("configure-bucket", "--versioning", "off", "--clear-tags", "-b", bucket))
    assert r.stdout == "versioning: Suspended\n"

    ok(cli("configure-bucket", bucket, "--block-public", "on"))
    conf = storage.client.get_public_access_block(Bucket=bucket)
    assert all(conf["PublicAccessBlockConfiguration"].values())

    r = ok(cli("configure-bucket", bucket))  # nothing to change: just show
    assert r.stdout == "versioning: Suspended\n"
    failed(cli("configure-bucket", bucket, "--tag", "novalue"), contains="NAME=VALUE")


# ---------------------------------------------------------------------------------------------
# put and get


def test_put_get_default_names(cli, storage: Storage, bucket: str, tmp_path: Path, monkeypatch):
    src = tmp_path / "src" / "notes.txt"
    src.parent.mkdir()
    src.write_bytes(b"some notes\n")

    r = ok(cli("put", str(src), "--bucket", bucket))  # the key defaults to the basename
    assert r.stdout == "" and r.stderr == ""  # no progress bar when stdout is not a terminal
    assert keys_of(storage, bucket) == ["notes.txt"]
    assert storage.head(S3Name("notes.txt", bucket)).content_type == "text/plain"

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the CLI runs in the test's working directory
    ok(cli("get", "notes.txt", "-b", bucket))  # the local name defaults to the basename
    assert (work / "notes.txt").read_bytes() == b"some notes\n"

    outdir = tmp_path / "out"
    outdir.mkdir()
    ok(cli("get", "notes.txt", str(outdir), "-b", bucket))  # into a directory
    assert (outdir / "notes.txt").read_bytes() == b"some notes\n"
    ok(cli("get", "notes.txt", str(outdir / "renamed.txt"), "-b", bucket))
    assert (outdir / "renamed.txt").read_bytes() == b"some notes\n"


def test_put_to_remote_name_and_bucket_sources(
    cli, storage: Storage, bucket: str, other_bucket: str, tmp_path: Path
):
    src = tmp_path / "data.json"
    src.write_bytes(b'{"a": 1}')
    ok(cli("put", str(src), "docs/v1/data.json", "-b", bucket))  # -b after the command
    ok(cli("--bucket", bucket, "put", str(src), "before.json"))  # --bucket before it
    ok(cli("put", str(src), "from-env.json", env={"S3MOUNT_BUCKET": bucket}))
    ok(cli("put", str(src), f"s3://{other_bucket}/x/elsewhere.json", "-b", bucket))
    # --bucket wins over the environment
    ok(cli("put", str(src), "flag-wins.json", "-b", other_bucket, env={"S3MOUNT_BUCKET": bucket}))

    assert keys_of(storage, bucket) == ["before.json", "docs/v1/data.json", "from-env.json"]
    assert keys_of(storage, other_bucket) == ["flag-wins.json", "x/elsewhere.json"]
    assert storage.head(S3Name("docs/v1/data.json", bucket)).content_type == "application/json"

    dst = tmp_path / "back.json"
    ok(cli("get", f"s3://{other_bucket}/x/elsewhere.json", str(dst)))  # no default bucket needed
    assert dst.read_bytes() == b'{"a": 1}'

    failed(cli("put", str(src), "k"), contains="no bucket given")


def test_put_options(cli, storage: Storage, bucket: str, tmp_path: Path):
    src = tmp_path / "blob"
    src.write_bytes(b"\x00\x01")
    ok(
        cli(
            "put",
            str(src),
            "blob.bin",
            "-b",
            bucket,
            "--content-type",
            "image/png",
            "--metadata",
            "owner=me",
            "--metadata",
            "color=blue",
        )
    )
    info = storage.head(S3Name("blob.bin", bucket))
    assert info.content_type == "image/png"
    assert info.metadata == {"owner": "me", "color": "blue"}
    failed(cli("put", str(src), "-b", bucket, "--metadata", "nope"), contains="NAME=VALUE")


@pytest.mark.parametrize("size", [0, 1500, 40 * 1024 * 1024 + 7])
def test_put_get_byte_for_byte(cli, storage: Storage, bucket: str, tmp_path: Path, size: int):
    data = os.urandom(size)
    src = tmp_path / "payload.bin"
    src.write_bytes(data)
    ok(cli("put", str(src), "p/payload.bin", "-b", bucket))
    info = storage.head(S3Name("p/payload.bin", bucket))
    assert info.size == size
    if size > 16 * 1024 * 1024:
        assert info.etag.endswith("-3")  # three 16 MiB parts (the CLI's default settings)
    dst = tmp_path / "copy.bin"
    r = ok(cli("get", "p/payload.bin", str(dst), "-b", bucket))
    assert r.stdout == ""
    assert dst.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.bin", "payload.bin"]


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "top.txt": b"top\n",
        "empty": b"",
        "a/one.bin": os.urandom(3000),
        "a/b/two.txt": b"two\n",
        "a/b/c/three.md": b"# three\n",
        "z/last": b"last",
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_recursive_put_and_get(cli, storage: Storage, bucket: str, tmp_path: Path):
    tree = tmp_path / "tree"
    files = make_tree(tree)

    failed(cli("put", str(tree), "-b", bucket), contains="is a directory (use --recursive)")

    r = ok(cli("put", "-r", str(tree), "-b", bucket))
    assert r.stderr == f"uploaded {len(files)} files\n"
    assert keys_of(storage, bucket) == sorted(f"tree/{k}" for k in files)

    ok(cli("put", "--recursive", str(tree), "backup/2024", "-b", bucket))
    assert sorted(k for k in keys_of(storage, bucket) if k.startswith("backup/")) == sorted(
        f"backup/2024/{k}" for k in files
    )

    out = tmp_path / "out"
    r = ok(cli("get", "-r", "tree", str(out), "-b", bucket))
    assert r.stderr == f"downloaded {len(files)} files\n"
    assert read_tree(out) == files

    out2 = tmp_path / "out2"
    ok(cli("get", "-r", "backup/2024/a/b/", str(out2), "-b", bucket))
    assert read_tree(out2) == {"two.txt": b"two\n", "c/three.md": b"# three\n"}

    failed(cli("get", "-r", "nothing-here", str(tmp_path / "o3"), "-b", bucket), contains="no keys")
    assert not (tmp_path / "o3").exists()


def test_progress_bar_only_on_a_terminal(s3_server, bucket: str, tmp_path: Path):
    src = tmp_path / "bar.bin"
    src.write_bytes(os.urandom(2 * 1024 * 1024))
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "s3mount", "--endpoint-url", s3_server.endpoint]
            + ["put", str(src), "-b", bucket],
            stdout=slave,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        os.close(slave)
        slave = -1
        out = b""
        with contextlib.suppress(OSError):  # EIO once the terminal's other end is closed
            while chunk := os.read(master, 65536):
                out += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0, proc.stderr
    text = out.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert "bar.bin" in text and "100%" in text and "2.00M" in text


# ---------------------------------------------------------------------------------------------
# list, delete, copy, metadata, exists, url, make-public


@pytest.fixture
def filled(storage: Storage, bucket: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``bucket`` with a few keys: a.txt (with metadata), dir/b.txt, dir/sub/c.txt, z.bin."""
    for key, body in {
        "a.txt": b"aaa",
        "dir/b.txt": b"bb",
        "dir/sub/c.txt": b"c",
        "z.bin": b"",
    }.items():
        p = tmp_path_factory.mktemp("filled") / "body"
        p.write_bytes(body)
        opts = WriteOptions(metadata={"color": "blue"}) if key == "a.txt" else None
        storage.write(str(p), S3Name(key, bucket), opts)
    return bucket


def parse_list(stdout: str) -> list[tuple[int, str]]:
    out = []
    for line in stdout.splitlines():
        m = LINE.match(line)
        assert m, line
        out.append((int(m.group(1)), m.group(2)))
    return out


def test_list(cli, filled: str):
    r = ok(cli("list", "-b", filled))
    assert parse_list(r.stdout) == [
        (3, "a.txt"),
        (2, "dir/b.txt"),
        (1, "dir/sub/c.txt"),
        (0, "z.bin"),
    ]

    r = ok(cli("list", "--prefix", "dir/", "-b", filled))
    assert [k for _, k in parse_list(r.stdout)] == ["dir/b.txt", "dir/sub/c.txt"]

    r = ok(cli("list", "--dirs", "-b", filled))
    lines = r.stdout.splitlines()
    assert [k for _, k in parse_list("\n".join(lines[:2]))] == ["a.txt", "z.bin"]
    assert lines[2].split() == ["PRE", "dir/"]

    r = ok(cli("list", "a.txt", "-b", filled))
    fields = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    assert fields["key"] == "a.txt" and fields["size"] == "3"
    assert fields["content-type"] == "text/plain" and fields["meta"] == "color=blue"
    assert fields["storage-class"] == "STANDARD" and re.fullmatch(r"[0-9a-f]{32}", fields["etag"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", fields["last-modified"])

    r = ok(cli("list", f"s3://{filled}/dir/b.txt"))
    assert "key: dir/b.txt\nsize: 2\n" in r.stdout

    r = ok(cli("list", "--prefix", "nothing/", "-b", filled))
    assert r.stdout == ""


def test_delete(cli, storage: Storage, filled: str):
    ok(cli("delete", "a.txt", "-b", filled))
    assert keys_of(storage, filled) == ["dir/b.txt", "dir/sub/c.txt", "z.bin"]
    ok(cli("delete", "dir/b.txt", f"s3://{filled}/dir/sub/c.txt", "never-existed", "-b", filled))
    assert keys_of(storage, filled) == ["z.bin"]


def test_copy(cli, storage: Storage, filled: str, other_bucket: str):
    ok(cli("copy", "a.txt", "copies/a.txt", "-b", filled))
    ok(cli("copy", "a.txt", f"s3://{other_bucket}/from-other.txt", "-b", filled))
    ok(cli("copy", f"s3://{filled}/dir/b.txt", f"s3://{other_bucket}/b.txt"))
    assert remote_bytes(storage, filled, "copies/a.txt") == b"aaa"
    assert remote_bytes(storage, other_bucket, "from-other.txt") == b"aaa"
    assert remote_bytes(storage, other_bucket, "b.txt") == b"bb"
    assert storage.head(S3Name("from-other.txt", other_bucket)).metadata == {"color": "blue"}
    failed(cli("copy", "missing.txt", "x.txt", "-b", filled), contains="not found")


def test_update_metadata(cli, storage: Storage, filled: str):
    r = ok(cli("update-metadata", "a.txt", "owner=me", "color=red", "-b", filled))
    assert "meta: color=red\nmeta: owner=me\n" in r.stdout
    assert "content-type: text/plain\n" in r.stdout
    info = storage.head(S3Name("a.txt", filled))
    assert info.metadata == {"color": "red", "owner": "me"} and info.content_type == "text/plain"

    ok(cli("update-metadata", "a.txt", "only=this", "--replace", "-b", filled))
    assert storage.head(S3Name("a.txt", filled)).metadata == {"only": "this"}

    ok(cli("update-metadata", "a.txt", "x=1", "--content-type", "text/csv", "-b", filled))
    info = storage.head(S3Name("a.txt", filled))
    assert info.content_type == "text/csv" and info.metadata == {"only": "this", "x": "1"}
    assert remote_bytes(storage, filled, "a.txt") == b"aaa"

    failed(cli("update-metadata", "a.txt", "bad", "-b", filled), contains="NAME=VALUE")
    failed(cli("update-metadata", "nope.txt", "a=b", "-b", filled), contains="not found")


def test_exists(cli, filled: str):
    r = ok(cli("exists", "a.txt", "-b", filled))
    assert r.stdout == "" and r.stderr == ""
    r = cli("exists", "nope.txt", "-b", filled)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", "")
    assert cli("exists", "dir/", "-b", filled).returncode == 1  # a prefix is no key
    assert cli("exists", f"s3://{filled}/dir/b.txt").returncode == 0
    # A missing bucket is a failure, not a "no".
    failed(cli("exists", "a.txt", "-b", new_bucket_name()), contains="bucket does not exist")


def test_url(cli, storage: Storage, filled: str):
    r = ok(cli("url", "a.txt", "-b", filled, "--expires", "120"))
    url = r.stdout.strip()
    assert r.stdout.count("\n") == 1 and "X-Amz-Expires=120" in url
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == b"aaa"

    r = ok(cli("url", "up.bin", "--method", "PUT", "-b", filled))
    req = urllib.request.Request(
        r.stdout.strip(),
        data=b"uploaded",
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    assert remote_bytes(storage, filled, "up.bin") == b"uploaded"


def test_make_public(cli, storage: Storage, filled: str):
    ok(cli("make-public", "dir/b.txt", "-b", filled))
    acl = storage.client.get_object_acl(Bucket=filled, Key="dir/b.txt")
    uris = {(g["Grantee"].get("URI"), g["Permission"]) for g in acl["Grants"]}
    assert ("http://acs.amazonaws.com/groups/global/AllUsers", "READ") in uris
    failed(cli("make-public", "missing", "-b", filled), contains="not found")


# ---------------------------------------------------------------------------------------------
# Bad input


def test_get_missing_key_creates_nothing(cli, bucket: str, tmp_path: Path):
    target = tmp_path / "never.txt"
    line = failed(cli("get", "no/such.txt", str(target), "-b", bucket), contains="not found")
    assert f"s3://{bucket}/no/such.txt" in line
    assert not target.exists()

    existing = tmp_path / "keep.txt"
    existing.write_bytes(b"precious")
    failed(cli("get", "no/such.txt", str(existing), "-b", bucket))
    assert existing.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_missing_bucket(cli, tmp_path: Path):
    missing = new_bucket_name()
    failed(cli("list", "-b", missing), contains="bucket does not exist")
    f = tmp_path / "f"
    f.write_bytes(b"x")
    failed(cli("put", str(f), "-b", missing), contains="bucket does not exist")
    failed(cli("delete-bucket", missing), contains="bucket does not exist")
    failed(cli("get", "k", str(tmp_path / "out"), "-b", missing), contains="not found")
    assert not (tmp_path / "out").exists()


def test_unreachable_endpoint():
    r = run_cli("--retries", "1", "list-buckets", endpoint="http://127.0.0.1:1")
    failed(r, contains="cannot reach the S3 endpoint http://127.0.0.1:1")
    r = run_cli("exists", "k", "-b", "some-bucket", "--retries", "1", endpoint="http://127.0.0.1:1")
    failed(r, contains="cannot reach")


def test_invalid_bucket_name(cli):
    failed(cli("create-bucket", "Bad_Name"), contains="'Bad_Name' is not a valid bucket name")


def test_local_file_errors(cli, bucket: str, tmp_path: Path):
    failed(cli("put", str(tmp_path / "missing.txt"), "-b", bucket), contains="No such file")
    failed(cli("put", str(tmp_path), "-b", bucket), contains="is a directory")
    f = tmp_path / "plain"
    f.write_bytes(b"x")
    failed(cli("put", str(f / "below"), "-b", bucket), contains="Not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file anyway")
def test_unreadable_local_file(cli, bucket: str, tmp_path: Path):
    f = tmp_path / "secret.txt"
    f.write_bytes(b"x")
    f.chmod(0)
    failed(cli("put", str(f), "-b", bucket), contains="Permission denied")


def test_get_into_missing_directory(cli, storage: Storage, bucket: str, tmp_path: Path):
    src = tmp_path / "k.txt"
    src.write_bytes(b"data")
    storage.write(str(src), S3Name("k.txt", bucket))
    target = tmp_path / "no" / "such" / "dir" / "k.txt"
    line = failed(cli("get", "k.txt", str(target), "-b", bucket), contains="No such file")
    assert str(target) in line and ".part" not in line
    assert not (tmp_path / "no").exists()


def test_usage_errors(cli):
    r = cli()
    assert (
        r.returncode == 2 and r.stderr.splitlines()[-1] == "s3mount: error: a command is required"
    )
    r = cli("put")  # argparse: its usage line, then the error
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1].startswith("s3mount put: error: ")
    failed(cli("--retries", "0", "list-buckets"), exit_code=2, contains="--retries")


@pytest.fixture
def auth_server() -> Iterator[MotoServer]:
    """A second moto server that checks access keys (it knows none, so it rejects all)."""
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    try:
        server = MotoServer()
    finally:
        del os.environ["INITIAL_NO_AUTH_ACTION_COUNT"]
    yield server
    server.stop()


def test_bad_credentials(auth_server: MotoServer):
    r = run_cli("list-buckets", endpoint=auth_server.endpoint)
    failed(r, contains="credentials rejected (InvalidAccessKeyId)")
    r = run_cli("create-bucket", "some-bucket", endpoint=auth_server.endpoint)
    failed(r, contains="credentials rejected")


def test_no_credentials(cli, tmp_path: Path):
    env = {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    failed(cli("list-buckets", env=env), contains="no AWS credentials found")


# ---------------------------------------------------------------------------------------------
# Retries through the fault proxy


@pytest.fixture
def proxy(s3_server: MotoServer) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.port) as p:
        yield p


def test_retries_through_faults(proxy: FaultProxy, filled: str, tmp_path: Path):
    proxy.fail_next(2, "503")
    r = ok(run_cli("exists", "a.txt", "-b", filled, "--retries", "5", endpoint=proxy.endpoint))
    assert proxy.requests == 3 and proxy.faults == 2

    proxy.fail_next(2, "reset")
    dst = tmp_path / "a.txt"
    r = ok(
        run_cli("--retries", "5", "get", "a.txt", str(dst), "-b", filled, endpoint=proxy.endpoint)
    )
    assert dst.read_bytes() == b"aaa" and proxy.faults == 4 and r.stderr == ""


def test_retries_exhausted(proxy: FaultProxy, filled: str):
    proxy.fail_next(10, "503")
    r = run_cli("list", "-b", filled, "--retries", "3", endpoint=proxy.endpoint)
    line = failed(r)
    assert line == (
        f"s3mount: error: list s3://{filled}/: server kept failing: "
        "Please reduce your request rate."
    )
    assert proxy.requests == 3


def test_failed_get_keeps_existing_file(proxy: FaultProxy, filled: str, tmp_path: Path):
    existing = tmp_path / "a.txt"
    existing.write_bytes(b"local version")
    proxy.fail_next(10, "reset", skip=2)  # both HEADs pass, then every GET fails
    r = run_cli(
        "get", "a.txt", str(existing), "-b", filled, "--retries", "2", endpoint=proxy.endpoint
    )
    failed(r, contains="cannot reach the S3 endpoint")
    assert existing.read_bytes() == b"local version"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary file left behind
