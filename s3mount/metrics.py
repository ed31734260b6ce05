"""A mount's status as Prometheus text, an HTTP endpoint serving it, and an error counter.

The endpoint (``--metrics-port``) is a trio task the daemon starts and stops in its nursery.
It answers ``GET /metrics`` (and ``GET /``) with the text exposition format 0.0.4; it reads the
same status dict as ``s3mount status`` and costs no S3 request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MAX_REQUEST = 8192


class ErrorCounter(logging.Handler):
    """Counts the failure lines (WARNING and above) the file system layers log."""

    def __init__(self, prefixes: tuple[str, ...] = ("s3mount.fuse_ops", "s3mount.core")):
        super().__init__(logging.WARNING)
        self.prefixes = prefixes
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(self.prefixes):
            self.count += 1


def _label(value: object) -> str:
    s = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def render(st: dict[str, Any]) -> str:
    """The status dict of the daemon as Prometheus text."""
    out: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric(
        "s3mount_info",
        "gauge",
        "The mount: bucket, prefix and mount point.",
        [
            (
                f"{{bucket={_label(st.get('bucket', ''))},prefix={_label(st.get('prefix', ''))},"
                f"mountpoint={_label(st.get('mountpoint', ''))}}}",
                1,
            )
        ],
    )
    metric(
        "s3mount_requests_total",
        "counter",
        "S3 requests sent, by operation (retries included).",
        [(f"{{op={_label(op)}}}", n) for op, n in sorted(st.get("requests", {}).items())],
    )
    metric("s3mount_bytes_in_total", "counter", "Payload bytes downloaded from S3.",
           [("", st.get("bytes_in", 0))])  # fmt: skip
    metric("s3mount_bytes_out_total", "counter", "Payload bytes uploaded to S3.",
           [("", st.get("bytes_out", 0))])  # fmt: skip
    caches = cache_counters(st.get("cache", {}))
    metric(
        "s3mount_cache_hits_total",
        "counter",
        "Cache hits, by cache (listing, meta, block, kept).",
        [(f"{{cache={_label(c)}}}", hm[0]) for c, hm in sorted(caches.items())],
    )
    metric(
        "s3mount_cache_misses_total",
        "counter",
        "Cache misses, by cache (listing, meta, block, kept).",
        [(f"{{cache={_label(c)}}}", hm[1]) for c, hm in sorted(caches.items())],
    )
    gauges = [
        ("s3mount_open_files", "open_files", "Files open on the mount."),
        ("s3mount_dirty_files", "dirty_files", "Open files with data not uploaded yet."),
        ("s3mount_dirty_bytes", "dirty_bytes", "Bytes of the dirty open files."),
        ("s3mount_kept_bytes", "kept_bytes", "Disk used by closed files' data (--cache-size)."),
        ("s3mount_pending_uploads", "pending_uploads", "Journaled uploads not done yet."),
        ("s3mount_pending_bytes", "pending_bytes", "Bytes of the journaled uploads."),
        ("s3mount_uploads_in_flight", "uploading", "Journaled uploads running now."),
    ]
    for name, key, help in gauges:
        metric(name, "gauge", help, [("", st.get(key, 0) or 0)])
    metric("s3mount_upload_failures_total", "counter", "Failed tries of journaled uploads.",
           [("", st.get("upload_failures", 0) or 0)])  # fmt: skip
    metric("s3mount_errors_total", "counter",
           "Failed operations logged (S3 and local errors given to programs).",
           [("", st.get("errors", 0))])  # fmt: skip
    metric("s3mount_recovered_files", "gauge", "Files kept in unsaved/ at start.",
           [("", len(st.get("recovered", [])))])  # fmt: skip
    metric("s3mount_uptime_seconds", "gauge", "Seconds since the mount started.",
           [("", float(st.get("uptime", 0)))])  # fmt: skip
    return "\n".join(out) + "\n"


def cache_counters(cache: dict[str, int]) -> dict[str, tuple[int, int]]:
    """``{"listing_hits": 3, "listing_misses": 1}`` -> ``{"listing": (3, 1)}``."""
    out: dict[str, tuple[int, int]] = {}
    for key, n in cache.items():
        name, _, kind = key.rpartition("_")
        if kind not in ("hits", "misses") or not name:
            continue
        hits, misses = out.get(name, (0, 0))
        out[name] = (hits + n, misses) if kind == "hits" else (hits, misses + n)
    return out


async def serve_metrics(
    listeners: list[trio.SocketListener], status: Callable[[], dict[str, Any]]
) -> None:
    """Serve ``status()`` as Prometheus text on ``listeners`` until cancelled."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.fail_after(5):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < _MAX_REQUEST:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
                line = request.split(b"\r\n", 1)[0].decode("latin-1").split()
                if len(line) < 2 or line[0] not in ("GET", "HEAD"):
                    await _answer(stream, 405, "Method Not Allowed", b"GET only\n")
                elif line[1].split("?", 1)[0] not in ("/", "/metrics"):
                    await _answer(stream, 404, "Not Found", b"try /metrics\n")
                else:
                    body = render(status()).encode()
                    await _answer(stream, 200, "OK", body, head=line[0] == "HEAD")
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    await trio.serve_listeners(handle, listeners)


async def _answer(
    stream: trio.SocketStream, code: int, reason: str, body: bytes, head: bool = False
) -> None:
    content_type = CONTENT_TYPE if code == 200 else "text/plain; charset=utf-8"
    header = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    await stream.send_all(header + (b"" if head else body))
