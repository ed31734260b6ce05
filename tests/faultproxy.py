"""A small fault-injecting HTTP proxy for tests, in front of the moto server.

It listens on a free loopback port and forwards each HTTP request on a new upstream
connection, relaying the response back until the upstream closes, then closes the client
connection (moto answers ``Connection: close`` anyway).  Faults are queued per request::

    with FaultProxy(s3_server.port) as proxy:
        proxy.fail_next(2, "503")      # the next two requests get 503 SlowDown
        proxy.fail_next(1, "reset")    # then one connection reset
        proxy.delay = 0.5              # every forwarded request waits half a second first
        proxy.down = True              # full outage: every connection is reset on accept
        proxy.hold("PUT")              # PUTs wait (counted in ``held``) until release()

Modes: ``"503"`` reads the whole request, then answers ``503 Slow Down`` with S3's XML error;
``"reset"`` reads the whole request, then closes with SO_LINGER 0 (the client sees a reset);
``"close"`` reads the whole request, then closes without answering.
``fail_next(n, mode, skip=k)`` lets ``k`` requests pass first.

Counters: ``requests`` (requests read, faulted ones included), ``forwarded``, ``faults``
(faults injected), ``refused`` (connections dropped while ``down``), ``held`` (requests
waiting now because of ``hold``), and ``seen``, a list of
``(method, path, outcome)`` for each request.
"""

from __future__ import annotations

import collections
import contextlib
import selectors
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import IO

MODES = ("503", "reset", "close")

SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>faultproxy</RequestId></Error>"
)

_MAX_HEADER_BYTES = 64 * 1024
_CHUNK = 64 * 1024


class _BadRequest(Exception):
    pass


class _Request:
    def __init__(self, method: str, target: str, version: str, headers: list[tuple[str, str]]):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = b""

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def encode_head(self, drop: tuple[str, ...] = (), add: tuple[str, ...] = ()) -> bytes:
        lines = [f"{self.method} {self.target} {self.version}"]
        lines += [f"{k}: {v}" for k, v in self.headers if k.lower() not in drop]
        lines += add
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _read_request(rfile: IO[bytes], on_expect: Callable[[], None]) -> _Request | None:
    """One request from the client, body included; None on a clean EOF before it starts."""
    line = rfile.readline(_MAX_HEADER_BYTES)
    while line in (b"\r\n", b"\n"):  # tolerate stray empty lines between requests
        line = rfile.readline(_MAX_HEADER_BYTES)
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3:
        raise _BadRequest(f"bad request line {line!r}")
    headers: list[tuple[str, str]] = []
    total = len(line)
    while True:
        h = rfile.readline(_MAX_HEADER_BYTES)
        total += len(h)
        if not h:
            raise _BadRequest("connection closed inside the headers")
        if total > _MAX_HEADER_BYTES:
            raise _BadRequest("headers too long")
        if h in (b"\r\n", b"\n"):
            break
        name, sep, value = h.decode("latin-1").partition(":")
        if not sep:
            raise _BadRequest(f"bad header line {h!r}")
        headers.append((name.strip(), value.strip()))
    req = _Request(parts[0], parts[1], parts[2], headers)
    if (req.header("Expect") or "").lower() == "100-continue":
        on_expect()
    if "chunked" in (req.header("Transfer-Encoding") or "").lower():
        req.body = _read_chunked(rfile)
    else:
        length = int(req.header("Content-Length") or 0)
        req.body = _read_exactly(rfile, length)
    return req


def _read_exactly(rfile: IO[bytes], n: int) -> bytes:
    data = rfile.read(n) if n else b""
    if len(data) != n:
        raise _BadRequest(f"body cut short: {len(data)} of {n} bytes")
    return data


def _read_chunked(rfile: IO[bytes]) -> bytes:
    """A chunked body, kept in its chunked encoding (sizes, extensions and trailers as sent)."""
    out = bytearray()
    while True:
        size_line = rfile.readline(_MAX_HEADER_BYTES)
        if not size_line.endswith(b"\n"):
            raise _BadRequest("chunked body cut short")
        out += size_line
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:  # trailer fields, up to the empty line
                t = rfile.readline(_MAX_HEADER_BYTES)
                if not t.endswith(b"\n"):
                    raise _BadRequest("chunked trailer cut short")
                out += t
                if t in (b"\r\n", b"\n"):
                    return bytes(out)
        out += _read_exactly(rfile, size + 2)  # data and its CRLF


def _reset(sock: socket.socket) -> None:
    """Close so that the peer sees a connection reset (RST), not an orderly end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultProxy:
    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        *,
        delay: float = 0.0,
        timeout: float = 60.0,
    ):
        self.upstream = (upstream_host, upstream_port)
        self.delay = delay  # seconds to wait before forwarding each request
        self.down = False  # True: every new connection is reset right away
        self.timeout = timeout
        self.requests = 0
        self.forwarded = 0
        self.faults = 0
        self.refused = 0
        self.held = 0
        self._hold: set[str] = set()
        self._released = threading.Condition()  # guards _hold and held
        self.seen: list[tuple[str, str, str]] = []
        self._queue: collections.deque[str | None] = collections.deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self.port = 0

    # -- control --------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, n: int, mode: str = "503", *, skip: int = 0) -> None:
        """Inject ``mode`` into each of the next ``n`` requests, after ``skip`` that pass.

        Calls queue up: the faults come after the ones already queued.
        """
        if mode not in MODES:
            raise ValueError(f"unknown fault mode {mode!r}; one of {MODES}")
        with self._lock:
            self._queue.extend([None] * skip + [mode] * n)

    def hold(self, *methods: str) -> None:
        """Keep requests of these HTTP methods waiting, unanswered, until ``release``."""
        with self._released:
            self._hold.update(methods)

    def release(self) -> None:
        """Forward the held requests, and hold no more."""
        with self._released:
            self._hold.clear()
            self._released.notify_all()

    def clear(self) -> None:
        """Drop the queued faults, and end an outage, a delay and a hold."""
        with self._lock:
            self._queue.clear()
        self.down = False
        self.delay = 0.0
        self.release()

    @property
    def pending(self) -> int:
        """Faults queued and not injected yet."""
        with self._lock:
            return sum(1 for m in self._queue if m)

    def start(self) -> FaultProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"faultproxy-{self.port}-accept", daemon=True
        )
        self._acceptor.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, break every open connection, and join every thread."""
        if self._acceptor is None:
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._acceptor.join(timeout)
        with self._lock:
            sockets = list(self._sockets)
            threads = list(self._threads)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(timeout)
        for s in (self._listener, self._wake_r, self._wake_w, *sockets):
            with contextlib.suppress(OSError):
                s.close()
        self._acceptor = None
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"fault proxy threads did not stop: {alive}")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj is not self._listener or self._stopping.is_set():
                        continue
                    try:
                        conn, _addr = self._listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        return
                    if self.down:
                        with self._lock:
                            self.refused += 1
                        _reset(conn)
                        continue
                    conn.setblocking(True)
                    t = threading.Thread(
                        target=self._serve, args=(conn,), name=f"faultproxy-{self.port}-conn"
                    )
                    with self._lock:
                        self._threads = {x for x in self._threads if x.is_alive()}
                        self._sockets.add(conn)
                        self._threads.add(t)
                    t.start()

    @contextlib.contextmanager
    def _tracked(self, sock: socket.socket) -> Iterator[socket.socket]:
        with self._lock:
            self._sockets.add(sock)
        try:
            yield sock
        finally:
            with self._lock:
                self._sockets.discard(sock)
            with contextlib.suppress(OSError):
                sock.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with self._tracked(conn):
                conn.settimeout(self.timeout)
                self._serve_one(conn)
        except (OSError, _BadRequest, ValueError):
            pass  # the client went away, or sent garbage: nothing to relay

    def _serve_one(self, conn: socket.socket) -> None:
        rfile = conn.makefile("rb")
        try:

            def send_continue() -> None:
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

            req = _read_request(rfile, send_continue)
        finally:
            rfile.close()
        if req is None:
            return
        with self._lock:
            self.requests += 1
            mode = self._queue.popleft() if self._queue else None
            if mode:
                self.faults += 1
            self.seen.append((req.method, req.target, mode or "forwarded"))
        if mode == "503":
            head = (
                "HTTP/1.1 503 Slow Down\r\n"
                "Content-Type: application/xml\r\n"
                f"Content-Length: {len(SLOW_DOWN_BODY)}\r\n"
                "x-amz-request-id: faultproxy\r\n"
                "Connection: close\r\n\r\n"
            ).encode("latin-1")
            conn.sendall(head if req.method == "HEAD" else head + SLOW_DOWN_BODY)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
            return
        if mode == "reset":
            _reset(conn)
            return
        if mode == "close":
            return
        if self.delay > 0 and self._stopping.wait(self.delay):
            return
        with self._released:
            if req.method in self._hold:
                self.held += 1
                while req.method in self._hold and not self._stopping.is_set():
                    self._released.wait(0.1)
                self.held -= 1
        if self._stopping.is_set():
            return
        self._forward(conn, req)

    def _forward(self, conn: socket.socket, req: _Request) -> None:
        up = socket.create_connection(self.upstream, timeout=self.timeout)
        with self._tracked(up):
            # The proxy answered any Expect: 100-continue itself and has the whole body;
            # one request per upstream connection.
            head = req.encode_head(drop=("expect", "connection"), add=("Connection: close",))
            up.sendall(head + req.body)
            with self._lock:
                self.forwarded += 1
            while True:
                data = up.recv(_CHUNK)
                if not data:
                    break
                conn.sendall(data)
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
