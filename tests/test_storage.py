"""The storage layer against a real moto server process, over real HTTP."""

from __future__ import annotations

import contextlib
import errno
import http.client
import io
import math
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import new_bucket_name
from faultproxy import FaultProxy

from s3mount.storage import (
    BucketNotEmpty,
    BucketNotFound,
    ConnectionSettings,
    InvalidName,
    KeyTooLong,
    LocalFileError,
    MiB,
    NotFound,
    PreconditionFailed,
    RetryPolicy,
    S3Key,
    S3Name,
    Storage,
    StorageError,
    TransferSettings,
    Unreachable,
    WriteOptions,
)

SECRETS = ("testing-key-id", "testing-secret-key")
MULTIPART = TransferSettings(multipart_threshold=5 * MiB, part_size=5 * MiB)
BIG = 16 * MiB + 12345  # four 5 MiB parts, the last one short
FAST_RETRY = RetryPolicy(attempts=5, base_delay=0.01)


def check_message(exc: BaseException) -> str:
    """A storage error's message: one line, no credentials.  Returns it."""
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    for secret in SECRETS:
        assert secret not in text
        assert secret not in repr(exc.args)
    return text


def requests_since(st: Storage, before: dict) -> dict[str, int]:
    now = st.counter.snapshot()["requests"]
    return {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}


@pytest.fixture(scope="module")
def big_data() -> bytes:
    return os.urandom(BIG)


@pytest.fixture
def mp_storage(s3_server, bucket: str) -> Storage:
    """Storage with 5 MiB parts, on the fresh ``bucket`` by default."""
    return Storage(
        ConnectionSettings(endpoint_url=s3_server.endpoint),
        default_bucket=bucket,
        transfer=MULTIPART,
    )


@pytest.fixture
def proxy(s3_server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.port) as p:
        yield p


@pytest.fixture
def proxied(proxy: FaultProxy, bucket: str) -> Storage:
    """Storage talking to moto through the fault proxy, with a fast retry policy."""
    return Storage(
        ConnectionSettings(endpoint_url=proxy.endpoint, retry=FAST_RETRY),
        default_bucket=bucket,
        transfer=MULTIPART,
    )


class NonSeekable(io.RawIOBase):
    """A pipe-like binary stream: readable or writable, never seekable."""

    def __init__(self, data: bytes = b""):
        self._src = io.BytesIO(data)
        self.written = bytearray()

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, b) -> int:  # type: ignore[override]
        chunk = self._src.read(len(b))
        b[: len(chunk)] = chunk
        return len(chunk)

    def write(self, b) -> int:  # type: ignore[override]
        self.written += b
        return len(b)


# ---------------------------------------------------------------------------------------------
# Round trips


def payload(size_name: str, big_data: bytes) -> bytes:
    return {"empty": b"", "small": b"small object \x00\xff" * 70, "multipart": big_data}[size_name]


@pytest.mark.parametrize("size_name", ["empty", "small", "multipart"])
def test_file_round_trip(mp_storage: Storage, tmp_path: Path, big_data: bytes, size_name: str):
    data = payload(size_name, big_data)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    before = mp_storage.counter.snapshot()["requests"]
    info = mp_storage.write(str(src), "dir/object.bin")
    sent = requests_since(mp_storage, before)
    assert info.size == len(data)
    assert mp_storage.head("dir/object.bin").etag == info.etag
    if size_name == "multipart":
        assert sent["UploadPart"] == 4 and sent["CompleteMultipartUpload"] == 1
        assert info.etag.endswith("-4")
    else:
        assert sent.get("PutObject") == 1 and "UploadPart" not in sent

    dst = tmp_path / "dst.bin"
    before = mp_storage.counter.snapshot()["requests"]
    got = mp_storage.read("dir/object.bin", str(dst))
    received = requests_since(mp_storage, before)
    assert got.size == len(data) and got.etag == info.etag
    assert dst.read_bytes() == data
    if size_name == "multipart":
        assert received["GetObject"] >= 4  # parallel ranged parts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.bin", "src.bin"]  # no temp left


def test_a_multipart_file_upload_reads_the_file_as_opened(
    s3_server, bucket: str, tmp_path: Path, big_data: bytes
) -> None:
    # Big file uploads go to s3transfer by /proc/self/fd (so parts are read as they are
    # sent: the memory that saves is measured by the benchmark, not here).  One part at a
    # time here, so parts 2-4 are read after the name went: the opened file is still sent.
    st = Storage(
        ConnectionSettings(endpoint_url=s3_server.endpoint),
        default_bucket=bucket,
        transfer=TransferSettings(5 * MiB, 5 * MiB, max_concurrency=1),
    )
    src = tmp_path / "src.bin"
    src.write_bytes(big_data)
    info = st.write(str(src), "gone.bin", progress=lambda n: src.unlink(missing_ok=True))
    assert not src.exists()
    assert info.etag.endswith("-4")
    assert st.client.get_object(Bucket=bucket, Key="gone.bin")["Body"].read() == big_data


@pytest.mark.parametrize("size_name", ["empty", "small", "multipart"])
def test_stream_round_trip(mp_storage: Storage, big_data: bytes, size_name: str):
    data = payload(size_name, big_data)
    info = mp_storage.write_stream(io.BytesIO(data), S3Name("stream.bin"))
    assert info.size == len(data)
    out = io.BytesIO()
    got = mp_storage.read_stream("stream.bin", out)
    assert out.getvalue() == data
    assert got.etag == info.etag


def test_non_seekable_streams(mp_storage: Storage, big_data: bytes):
    info = mp_storage.write_stream(NonSeekable(big_data), "piped.bin")
    assert info.size == len(big_data)
    assert info.etag.endswith("-4")  # size unknown up front: still multipart
    sink = NonSeekable()
    mp_storage.read_stream("piped.bin", sink)
    assert bytes(sink.written) == big_data


def test_read_range(mp_storage: Storage, big_data: bytes):
    info = mp_storage.write_stream(io.BytesIO(big_data), "r.bin")
    assert mp_storage.read_range("r.bin", 0, 10) == big_data[:10]
    assert mp_storage.read_range("r.bin", 5 * MiB - 3, 7) == big_data[5 * MiB - 3 : 5 * MiB + 4]
    assert mp_storage.read_range("r.bin", BIG - 5, 100) == big_data[-5:]  # cut at the end
    assert mp_storage.read_range("r.bin", BIG + 10, 100) == b""  # past the end
    assert mp_storage.read_range("r.bin", 3, 0) == b""
    assert mp_storage.read_range("r.bin", 1, 4, etag=info.etag) == big_data[1:5]
    with pytest.raises(PreconditionFailed) as e:
        mp_storage.read_range("r.bin", 1, 4, etag="0" * 32)
    assert e.value.errno == errno.ESTALE
    check_message(e.value)


# ---------------------------------------------------------------------------------------------
# Metadata, copy


def test_metadata_round_trip(storage: Storage, bucket: str):
    name = S3Name("site/index.html", bucket)
    storage.write_stream(
        io.BytesIO(b"<html></html>"),
        name,
        WriteOptions(metadata={"color": "blue", "owner": "me"}),
    )
    info = storage.head(name)
    assert info.content_type == "text/html"  # from the name
    assert info.metadata == {"color": "blue", "owner": "me"}

    merged = storage.update_metadata(name, {"color": "red", "new": "1"})
    assert merged.metadata == {"color": "red", "owner": "me", "new": "1"}
    assert merged.content_type == "text/html"
    assert merged.etag != "" and merged.size == info.size

    replaced = storage.update_metadata(name, {"only": "this"}, replace=True)
    assert replaced.metadata == {"only": "this"}
    assert replaced.content_type == "text/html"

    typed = storage.update_metadata(name, {}, content_type="text/plain")
    assert typed.content_type == "text/plain" and typed.metadata == {"only": "this"}

    out = io.BytesIO()
    storage.read_stream(name, out)
    assert out.getvalue() == b"<html></html>"  # the data survived the copies onto itself

    explicit = S3Name("data.unknownext", bucket)
    storage.write_stream(io.BytesIO(b"x"), explicit)
    assert storage.head(explicit).content_type == "application/octet-stream"
    storage.write_stream(io.BytesIO(b"x"), explicit, WriteOptions(content_type="image/png"))
    assert storage.head(explicit).content_type == "image/png"


def test_copy_is_server_side(storage: Storage, bucket: str, other_bucket: str):
    src = S3Name("src/photo.jpg", bucket)
    storage.write_stream(io.BytesIO(b"jpeg bytes"), src, WriteOptions(metadata={"k": "v"}))

    before = storage.counter.snapshot()["requests"]
    same = storage.copy(src, S3Name("dst/photo-copy.jpg", bucket))
    other = storage.copy(src, S3Name("elsewhere.jpg", other_bucket))
    sent = requests_since(storage, before)
    assert sent.get("CopyObject") == 2
    assert not {"GetObject", "PutObject", "UploadPart"} & sent.keys()  # no data through us

    for info in (same, other):
        assert info.metadata == {"k": "v"} and info.content_type == "image/jpeg"
        assert info.size == len(b"jpeg bytes")
    out = io.BytesIO()
    storage.read_stream(S3Name("elsewhere.jpg", other_bucket), out)
    assert out.getvalue() == b"jpeg bytes"

    renamed = storage.copy(src, S3Name("new.txt", bucket), WriteOptions(metadata={"a": "b"}))
    assert renamed.metadata == {"a": "b"} and renamed.content_type == "text/plain"


def test_multipart_copy_keeps_metadata(s3_server, bucket: str, big_data: bytes):
    st = Storage(
        ConnectionSettings(endpoint_url=s3_server.endpoint),
        default_bucket=bucket,
        transfer=TransferSettings(
            multipart_threshold=5 * MiB, part_size=5 * MiB, copy_threshold=5 * MiB
        ),
    )
    st.write_stream(io.BytesIO(big_data), "big.dat", WriteOptions(metadata={"m": "1"}))
    before = st.counter.snapshot()["requests"]
    info = st.copy("big.dat", "big-copy.dat")
    sent = requests_since(st, before)
    assert sent.get("UploadPartCopy", 0) >= 4 and "UploadPart" not in sent
    assert info.metadata == {"m": "1"} and info.size == BIG
    assert st.read_range("big-copy.dat", BIG - 1000, 1000) == big_data[-1000:]


# ---------------------------------------------------------------------------------------------
# Delete, exists


def test_delete_and_exists(storage: Storage, bucket: str):
    name = S3Name("a/b.txt", bucket)
    assert storage.exists(name) == (False, None)
    storage.write_stream(io.BytesIO(b"12345"), name)
    found, info = storage.exists(name)
    assert found and info is not None
    assert info.key == "a/b.txt" and info.size == 5 and info.content_type == "text/plain"
    storage.delete(name)
    assert storage.exists(name) == (False, None)
    storage.delete(name)  # deleting what is gone is not an error in S3


def test_delete_many_batches(storage: Storage, bucket: str):
    n = 2345
    keys = [f"k/{i:05}" for i in range(n)]
    real = keys[::50]  # objects in every batch; the rest do not exist, which S3 allows
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: storage.client.put_object(Bucket=bucket, Key=k, Body=k), real))
    assert sum(1 for _ in storage.bucket_list_keys(bucket)) == len(real)

    before = storage.counter.snapshot()["requests"]
    assert storage.delete_many(keys, bucket) == n
    assert requests_since(storage, before) == {"DeleteObjects": math.ceil(n / 1000)}
    assert list(storage.bucket_list_keys(bucket)) == []

    before = storage.counter.snapshot()["requests"]
    assert storage.delete_many([], bucket) == 0
    assert storage.delete_many(iter(["one"]), bucket) == 1
    assert requests_since(storage, before) == {"DeleteObjects": 1}


# ---------------------------------------------------------------------------------------------
# Listing over several pages

TOP_KEYS = [f"a{i:04}" for i in range(1100)]
DIR_KEYS = [f"p{j:04}/x" for j in range(1000)]


@pytest.fixture(scope="module")
def listed_bucket(s3_server) -> Iterator[str]:
    """A bucket of 2,100 keys: 1,100 at the top, 1,000 each under its own prefix."""
    st = Storage(ConnectionSettings(endpoint_url=s3_server.endpoint))
    name = new_bucket_name()
    st.bucket_create(name)
    try:
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda k: st.client.put_object(Bucket=name, Key=k, Body=b""),
                    TOP_KEYS + DIR_KEYS,
                )
            )
        yield name
    finally:
        # Also a test of a forced delete over several listing pages.
        assert st.bucket_delete(name, force=True) == len(TOP_KEYS + DIR_KEYS)
        assert not st.bucket_exists(name)


def test_list_all_keys_over_pages(storage: Storage, listed_bucket: str):
    before = storage.counter.snapshot()["requests"]
    items = list(storage.bucket_list_keys(listed_bucket))
    assert requests_since(storage, before) == {"ListObjectsV2": 3}
    assert all(isinstance(i, S3Key) for i in items)
    assert [i.key for i in items] == sorted(TOP_KEYS + DIR_KEYS)
    assert all(i.size == 0 and i.etag for i in items)


def test_list_streams_lazily(storage: Storage, listed_bucket: str):
    it = storage.bucket_list_keys(listed_bucket)
    first = next(it)
    assert isinstance(first, S3Key) and first.key == "a0000"
    assert storage.counter.snapshot()["requests"] == {"ListObjectsV2": 1}  # one page so far


def test_list_with_delimiter(storage: Storage, listed_bucket: str):
    before = storage.counter.snapshot()["requests"]
    items = list(storage.bucket_list_keys(listed_bucket, delimiter="/"))
    assert requests_since(storage, before) == {"ListObjectsV2": 3}
    keys = [i for i in items if isinstance(i, S3Key)]
    prefixes = [i for i in items if isinstance(i, str)]
    assert items == keys + prefixes  # all keys first, then the common prefixes
    assert [k.key for k in keys] == TOP_KEYS
    assert prefixes == [f"p{j:04}/" for j in range(1000)]


def test_list_with_prefix(storage: Storage, listed_bucket: str):
    assert [i.key for i in storage.bucket_list_keys(listed_bucket, prefix="p0007/")] == ["p0007/x"]
    assert list(storage.bucket_list_keys(listed_bucket, prefix="p0007", delimiter="/")) == [
        "p0007/"
    ]
    assert [i.key for i in storage.bucket_list_keys(listed_bucket, prefix="a109")] == [
        f"a109{d}" for d in range(10)
    ]
    assert list(storage.bucket_list_keys(listed_bucket, prefix="zzz")) == []
    after = [i.key for i in storage.bucket_list_keys(listed_bucket, start_after="p0997/x")]
    assert after == ["p0998/x", "p0999/x"]


# ---------------------------------------------------------------------------------------------
# Buckets


def test_bucket_lifecycle(storage: Storage):
    name = new_bucket_name()
    assert not storage.bucket_exists(name)
    storage.bucket_create(name)
    try:
        assert storage.bucket_exists(name)
        assert name in [b.name for b in storage.bucket_list()]
        assert storage.bucket_delete(name) == 0
        assert not storage.bucket_exists(name)
    finally:
        with contextlib.suppress(StorageError):
            storage.bucket_delete(name, force=True)


def test_bucket_delete_refuses_non_empty_then_force(storage: Storage, bucket: str):
    storage.bucket_configure(bucket, versioning=True)
    for body in (b"v1", b"v2", b"v3"):
        storage.write_stream(io.BytesIO(body), S3Name("doc.txt", bucket))
    storage.write_stream(io.BytesIO(b"gone"), S3Name("gone.txt", bucket))
    storage.delete(S3Name("gone.txt", bucket))  # leaves a version and a delete marker
    storage.client.create_multipart_upload(Bucket=bucket, Key="unfinished")

    with pytest.raises(BucketNotEmpty) as e:
        storage.bucket_delete(bucket)
    assert e.value.errno == errno.ENOTEMPTY
    check_message(e.value)
    assert storage.bucket_exists(bucket)

    assert storage.bucket_delete(bucket, force=True) == 5  # 3 + 1 versions, 1 marker
    assert not storage.bucket_exists(bucket)


def test_bucket_configure_round_trip(storage: Storage, bucket: str):
    assert storage.bucket_configuration(bucket) == {"versioning": "Disabled", "tags": {}}
    storage.bucket_configure(bucket, versioning=True, tags={"team": "infra", "env": "test"})
    assert storage.bucket_configuration(bucket) == {
        "versioning": "Enabled",
        "tags": {"team": "infra", "env": "test"},
    }
    storage.bucket_configure(bucket, versioning=False, tags={})
    assert storage.bucket_configuration(bucket) == {"versioning": "Suspended", "tags": {}}

    storage.bucket_configure(bucket, block_public_access=True)
    block = storage.client.get_public_access_block(Bucket=bucket)
    assert all(block["PublicAccessBlockConfiguration"].values())
    storage.bucket_configure(bucket, block_public_access=False)
    block = storage.client.get_public_access_block(Bucket=bucket)
    assert not any(block["PublicAccessBlockConfiguration"].values())


# ---------------------------------------------------------------------------------------------
# URLs and ACLs


def test_presigned_get_and_put(storage: Storage, bucket: str):
    name = S3Name("shared/report.csv", bucket)
    storage.write_stream(io.BytesIO(b"a,b\n1,2\n"), name)
    url = storage.presigned_url(name, expires=60)
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=60" in url
    assert SECRETS[1] not in url
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.read() == b"a,b\n1,2\n"

    put_url = storage.presigned_url(S3Name("uploaded.bin", bucket), method="PUT")
    body = os.urandom(3000)
    # An explicit type: urllib's default (a form) makes moto's server parse the body as one.
    req = urllib.request.Request(
        put_url, data=body, method="PUT", headers={"Content-Type": "application/octet-stream"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    out = io.BytesIO()
    storage.read_stream(S3Name("uploaded.bin", bucket), out)
    assert out.getvalue() == body


def test_make_public(storage: Storage, bucket: str):
    name = S3Name("public.txt", bucket)
    storage.write_stream(io.BytesIO(b"hi"), name)
    all_users = "http://acs.amazonaws.com/groups/global/AllUsers"

    def public_grants() -> list[str]:
        acl = storage.client.get_object_acl(Bucket=bucket, Key="public.txt")
        return [g["Permission"] for g in acl["Grants"] if g["Grantee"].get("URI") == all_users]

    assert public_grants() == []
    storage.make_public(name)
    assert public_grants() == ["READ"]


# ---------------------------------------------------------------------------------------------
# Retries through the fault proxy


@pytest.mark.parametrize("mode", ["503", "reset", "close"])
@pytest.mark.parametrize("faults", [1, 4])
def test_retries_within_budget(proxied: Storage, proxy: FaultProxy, mode: str, faults: int):
    proxied.write_stream(io.BytesIO(b"payload"), "r.txt")
    start = proxy.requests
    proxy.fail_next(faults, mode)
    assert proxied.read_range("r.txt", 0, 7) == b"payload"
    assert proxy.requests - start == faults + 1
    assert proxy.faults == faults and proxy.pending == 0

    start = proxy.requests
    proxy.fail_next(faults, mode)
    proxied.write_stream(io.BytesIO(b"again"), "w.txt")  # a PUT with Expect: 100-continue
    assert proxy.requests - start == faults + 1
    assert proxied.read_range("w.txt", 0, 100) == b"again"


@pytest.mark.parametrize("mode", ["503", "reset"])
def test_retries_beyond_budget(proxied: Storage, proxy: FaultProxy, mode: str):
    proxied.write_stream(io.BytesIO(b"payload"), "r.txt")
    start = proxy.requests
    proxy.fail_next(FAST_RETRY.attempts + 2, mode)
    with pytest.raises(Unreachable) as e:
        proxied.read_range("r.txt", 0, 7)
    assert proxy.requests - start == FAST_RETRY.attempts  # gave up after the budget
    text = check_message(e.value)
    assert text.startswith(f"read s3://{proxied.default_bucket}/r.txt: ")
    if mode == "503":
        assert "Please reduce your request rate" in text
    else:
        assert proxy.endpoint in text
    assert e.value.errno == errno.EIO


def test_multipart_upload_retries_one_part(proxied: Storage, proxy: FaultProxy, big_data: bytes):
    proxy.fail_next(2, "503", skip=2)  # CreateMultipartUpload and one part pass, then faults
    info = proxied.write_stream(io.BytesIO(big_data), "big.bin")
    assert proxy.faults == 2
    assert info.etag.endswith("-4")
    assert proxied.counter.snapshot()["requests"]["UploadPart"] == 4 + 2
    out = io.BytesIO()
    proxied.read_stream("big.bin", out)
    assert out.getvalue() == big_data


def test_failed_download_leaves_nothing(proxied: Storage, proxy: FaultProxy, tmp_path: Path):
    proxied.write_stream(io.BytesIO(b"remote data"), "d.txt")
    dst = tmp_path / "d.txt"
    dst.write_bytes(b"local data")
    proxy.fail_next(FAST_RETRY.attempts, "reset", skip=1)  # the HEAD passes, the GET fails
    with pytest.raises(Unreachable):
        proxied.read("d.txt", str(dst))
    assert dst.read_bytes() == b"local data"
    assert [p.name for p in tmp_path.iterdir()] == ["d.txt"]  # no temporary file left


def test_outage_and_recovery(proxied: Storage, proxy: FaultProxy):
    proxy.down = True
    with pytest.raises(Unreachable) as e:
        list(proxied.bucket_list())
    assert proxy.refused == FAST_RETRY.attempts and proxy.requests == 0
    check_message(e.value)
    proxy.down = False
    assert proxied.default_bucket in [b.name for b in proxied.bucket_list()]


def test_latency_spike_times_out(proxy: FaultProxy, bucket: str):
    st = Storage(
        ConnectionSettings(
            endpoint_url=proxy.endpoint,
            retry=RetryPolicy(attempts=2, base_delay=0.01),
            read_timeout=0.3,
        ),
        default_bucket=bucket,
    )
    proxy.delay = 2.0
    t0 = time.monotonic()
    with pytest.raises(Unreachable) as e:
        st.exists("anything")
    assert "timed out" in check_message(e.value)
    assert proxy.requests == 2 and proxy.forwarded == 0
    assert time.monotonic() - t0 < 1.9  # the client gave up, it did not wait the delay out
    proxy.delay = 0.1
    t0 = time.monotonic()
    assert st.exists("anything") == (False, None)
    assert time.monotonic() - t0 >= 0.1


def test_unreachable_endpoint():
    st = Storage(
        ConnectionSettings(endpoint_url="http://127.0.0.1:1", retry=RetryPolicy(attempts=2)),
        default_bucket="some-bucket",
    )
    with pytest.raises(Unreachable) as e:
        st.head("k")
    expected = "s3://some-bucket/k: cannot reach the S3 endpoint http://127.0.0.1:1"
    assert check_message(e.value) == expected


# ---------------------------------------------------------------------------------------------
# The fault proxy itself


def test_proxy_relays_chunked_body_and_stops_cleanly(s3_server, storage: Storage, bucket: str):
    with FaultProxy(s3_server.port) as p:
        conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
        try:
            conn.request(
                "PUT",
                f"/{bucket}/chunked",
                body=iter([b"hello ", b"chunked ", b"world"]),
                encode_chunked=True,
            )
            assert conn.getresponse().status == 200
        finally:
            conn.close()
        assert p.seen == [("PUT", f"/{bucket}/chunked", "forwarded")]
        # A client that connects and never sends anything must not keep stop() waiting.
        idle = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
        idle.connect()
    idle.close()
    assert storage.read_range(S3Name("chunked", bucket), 0, 100) == b"hello chunked world"
    assert not [t for t in threading.enumerate() if t.name.startswith(f"faultproxy-{p.port}")]


def test_proxy_rejects_unknown_mode(s3_server):
    with FaultProxy(s3_server.port) as p, pytest.raises(ValueError):
        p.fail_next(1, "explode")


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_key(storage: Storage, bucket: str, tmp_path: Path):
    name = S3Name("no/such/key", bucket)
    for op in (
        lambda: storage.head(name),
        lambda: storage.read(name, str(tmp_path / "x")),
        lambda: storage.read_range(name, 0, 10),
        lambda: storage.read_stream(name, io.BytesIO()),
        lambda: storage.copy(name, S3Name("y", bucket)),
        lambda: storage.update_metadata(name, {"a": "b"}),
        lambda: storage.make_public(name),
    ):
        with pytest.raises(NotFound) as e:
            op()
        assert not isinstance(e.value, BucketNotFound)
        assert e.value.errno == errno.ENOENT
        assert "no/such/key" in check_message(e.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_bucket(storage: Storage):
    missing = new_bucket_name()
    name = S3Name("k", missing)
    for op in (
        lambda: list(storage.bucket_list_keys(missing)),
        lambda: storage.read_range(name, 0, 10),
        lambda: storage.write_stream(io.BytesIO(b"x"), name),
        lambda: storage.delete(name),
        lambda: storage.delete_many(["a", "b"], missing),
        lambda: storage.bucket_delete(missing),
        lambda: storage.bucket_configuration(missing),
    ):
        with pytest.raises(BucketNotFound) as e:
            op()
        assert e.value.errno == errno.ENOENT
        assert missing in check_message(e.value)
    # A HEAD can't tell a missing bucket from a missing key: still "not found".
    with pytest.raises(NotFound):
        storage.head(name)


def test_invalid_bucket_names(storage: Storage):
    for name in ["Bad_Name", "ab", "a..b", "-abc", "abc-", "192.168.1.1", "x" * 64, "UPPER"]:
        with pytest.raises(InvalidName) as e:
            storage.bucket_create(name)
        assert e.value.errno == errno.EINVAL
        assert repr(name) in check_message(e.value)
    assert storage.counter.snapshot()["requests"] == {}  # refused before any request


def test_invalid_names_and_paths(storage: Storage, bucket: str, tmp_path: Path):
    with pytest.raises(KeyTooLong) as e:
        storage.head(S3Name("k" * 1025, bucket))
    assert e.value.errno == errno.ENAMETOOLONG
    check_message(e.value)

    with pytest.raises(InvalidName, match="no bucket given"):
        storage.head("k")  # no default bucket

    with pytest.raises(LocalFileError) as e:
        storage.write(str(tmp_path / "missing.txt"), S3Name("k", bucket))
    assert e.value.errno == errno.ENOENT and "missing.txt" in check_message(e.value)

    with pytest.raises(LocalFileError) as e:
        storage.write(str(tmp_path), S3Name("k", bucket))
    assert e.value.errno == errno.EISDIR

    storage.write_stream(io.BytesIO(b"data"), S3Name("k", bucket))
    target = tmp_path / "no-such-dir" / "k"
    with pytest.raises(LocalFileError) as e:
        storage.read(S3Name("k", bucket), str(target))
    assert e.value.errno == errno.ENOENT and str(target) in check_message(e.value)
    assert not target.parent.exists()


def test_bucket_already_exists_is_not_an_error_in_us_east_1(storage: Storage, bucket: str):
    storage.bucket_create(bucket)  # S3's us-east-1 answers 200 to its owner, and so does moto
    assert storage.bucket_exists(bucket)


def test_no_credentials_in_errors(s3_server, bucket: str):
    st = Storage(
        ConnectionSettings(
            endpoint_url=s3_server.endpoint,
            access_key_id="AKIDEXPLICITKEY",
            secret_access_key="explicit-secret-value",
            retry=RetryPolicy(attempts=1),
        ),
        default_bucket=bucket,
    )
    errors: list[StorageError] = []
    for op in (
        lambda: st.head("missing"),
        lambda: st.bucket_create("Bad_Name"),
        lambda: list(st.bucket_list_keys(new_bucket_name())),
    ):
        with pytest.raises(StorageError) as e:
            op()
        errors.append(e.value)
    assert "explicit-secret-value" not in repr(st.settings)
    for err in errors:
        text = check_message(err)
        assert "explicit-secret-value" not in text and "AKIDEXPLICITKEY" not in text
