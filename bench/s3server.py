"""moto's S3 server, patched to answer like real S3 where stock moto is unfairly slow.

Run it as ``python -m bench.s3server -H 127.0.0.1 -p PORT`` (the same arguments as
``python -m moto.server``).  Two patches, both applied before the server starts:

- **Ranged GETs read only the range.**  Stock moto builds the whole object in memory for
  every GET and slices the range out afterwards: a 4 KiB range of a 256 MiB object costs
  about 265 ms, and parallel ranged downloads of 1 GiB crawl.  Here a GET carrying a single
  ``Range: bytes=...`` header gets a lazy view of the stored buffer instead of its bytes;
  moto's own range code slices that view, which reads just the requested bytes.  Anything
  else (no range, several ranges, an unparsable one, an error) gets the full bytes, as
  before.
- **``versionId=null`` names the unversioned object**, as in real S3; stock moto answers
  400 for it.  (The HEAD path simply drops the parameter, so in a versioned bucket it would
  name the latest version: the benchmark uses no versioned bucket.)

Everything else is stock moto, so its per-request cost (4-6 ms of CPU, ``Connection:
close``) stays, and is the same for every client measured against it.

The server also counts the S3 requests it answers, by operation (``ListObjectsV2``,
``HeadObject``...), so that the harness can say what each client sent for each workload:
``GET /_bench/requests`` returns the counts since the last such GET, as JSON, and starts
again from zero.  Requests carrying the ``x-bench-harness`` header (the harness's own set-up
and its "is it in S3 yet" checks) are not counted.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

_SINGLE_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")
_NULL_VERSION = re.compile(r"([?&])versionId=null(&|$)")
_state = threading.local()
COUNTS_PATH = "/_bench/requests"
HARNESS_HEADER = "x-bench-harness"


class LazyValue:
    """A read-only view of a moto key's stored bytes: length, truthiness and slicing."""

    def __init__(self, key: Any) -> None:
        self._key = key
        self._size = int(key.size)

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __getitem__(self, item: slice) -> bytes:
        if not isinstance(item, slice):
            raise TypeError("LazyValue supports slices only")
        start, stop, step = item.indices(self._size)
        if step != 1:
            raise ValueError("LazyValue supports contiguous slices only")
        if stop <= start:
            return b""
        with self._key.lock:
            buf = self._key._value_buffer
            buf.seek(start)
            return buf.read(stop - start)

    def materialize(self) -> bytes:
        """All the bytes, as stock moto would have returned them."""
        return self[:]


def patch_moto() -> None:
    """Install both patches into the imported moto modules (idempotent)."""
    from moto.s3 import models, responses

    if getattr(responses.S3Response, "_bench_patched", False):
        return

    value_prop = models.FakeKey.value

    def value_get(self: Any) -> Any:
        if getattr(_state, "lazy", False):
            return LazyValue(self)
        return value_prop.fget(self)

    models.FakeKey.value = property(value_get, value_prop.fset)

    original_key_response = responses.S3Response.key_response

    def key_response(self: Any, request: Any, full_url: str, headers: Any) -> Any:
        full_url = _NULL_VERSION.sub(lambda m: m.group(1) if m.group(2) else "", full_url)
        rng = request.headers.get("range") or ""
        _state.lazy = request.method == "GET" and bool(_SINGLE_RANGE.match(rng))
        try:
            status, out_headers, content = original_key_response(self, request, full_url, headers)
        finally:
            _state.lazy = False
        if isinstance(content, LazyValue):  # the range was not applied: stock behaviour
            content = content.materialize()
        return status, out_headers, content

    responses.S3Response.key_response = key_response

    original_get_object = models.S3Backend.get_object

    def get_object(self: Any, bucket_name: str, key_name: str, *args: Any, **kwargs: Any) -> Any:
        version_id = kwargs.get("version_id")
        key = original_get_object(self, bucket_name, key_name, *args, **kwargs)
        if key is None and version_id == "null":
            kwargs["version_id"] = None
            key = original_get_object(self, bucket_name, key_name, *args, **kwargs)
            if key is not None and key.version_id != "null":
                key = None
        return key

    models.S3Backend.get_object = get_object
    responses.S3Response._bench_patched = True


_LIST_PARAMS = {"prefix", "delimiter", "marker", "max-keys", "encoding-type", "list-type",
                "continuation-token", "start-after", "fetch-owner"}  # fmt: skip
_KEY_PARAMS = {"partNumber", "uploadId", "uploads", "versionId", "x-id"}


def operation(method: str, path: str, query: str, copy_source: bool) -> str:
    """The S3 operation a path-style request asks for, as boto3 names it (a request on a
    sub-resource such as ``?tagging`` or ``?location``: the method and its name)."""
    q = parse_qs(query, keep_blank_values=True)
    on_key = "/" in path.strip("/")
    other = [k for k in q if k not in (_KEY_PARAMS if on_key else _LIST_PARAMS)]
    if other and other != ["delete"]:
        return f"{method} {'object' if on_key else 'bucket'} ?{other[0]}"
    if not on_key:
        if method == "GET":
            return "ListObjectsV2" if q.get("list-type") == ["2"] else "ListObjects"
        if method == "POST" and "delete" in q:
            return "DeleteObjects"
        return {"HEAD": "HeadBucket", "PUT": "CreateBucket", "DELETE": "DeleteBucket"}.get(
            method, f"{method} bucket"
        )
    if method == "PUT":
        if copy_source:
            return "UploadPartCopy" if "partNumber" in q else "CopyObject"
        return "UploadPart" if "partNumber" in q else "PutObject"
    if method == "POST":
        return "CreateMultipartUpload" if "uploads" in q else "CompleteMultipartUpload"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in q else "DeleteObject"
    return {"HEAD": "HeadObject", "GET": "GetObject"}.get(method, f"{method} object")


class RequestTally:
    """Requests answered since the last :meth:`take`, by operation (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def take(self) -> dict[str, int]:
        with self._lock:
            counts, self._counts = self._counts, Counter()
        return dict(sorted(counts.items()))


def counting(app_class: type, tally: RequestTally) -> type:
    """``app_class`` (a WSGI application class) that also counts requests, and answers
    ``GET /_bench/requests`` itself."""

    class Counting(app_class):  # type: ignore[misc, valid-type]
        def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            path = environ.get("PATH_INFO", "")
            if path == COUNTS_PATH:
                body = json.dumps(tally.take()).encode()
                start_response("200 OK", [("Content-Type", "application/json"),
                                          ("Content-Length", str(len(body)))])  # fmt: skip
                return [body]
            if "HTTP_" + HARNESS_HEADER.upper().replace("-", "_") not in environ:
                method = environ.get("REQUEST_METHOD", "")
                copy = "HTTP_X_AMZ_COPY_SOURCE" in environ
                tally.add(operation(method, path, environ.get("QUERY_STRING", ""), copy))
            return super().__call__(environ, start_response)

    return Counting


def main(argv: list[str] | None = None) -> None:
    """Patch moto, then run its server with moto's own command line."""
    patch_moto()
    from moto import server

    app = server.DomainDispatcherApplication
    server.DomainDispatcherApplication = counting(app, RequestTally())  # type: ignore[misc]

    server.main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
