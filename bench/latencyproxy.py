"""A TCP proxy on loopback that adds a fixed network delay, for kernels without ``sch_netem``.

Every chunk of bytes is forwarded ``rtt/2`` after it arrived, in each direction, so one
request/response exchange costs one round trip more than it would directly.  Bandwidth is
not limited: each direction of each connection has a reader thread that timestamps the
chunks it receives (up to 1 MiB at a time) and a writer thread that sends each one when
it is due, so a long transfer keeps flowing at full speed with a constant delay.  At most
``MAX_BUFFERED`` bytes wait per direction; past that the reader stops reading and TCP's own
flow control pushes back.  A connection's set-up is not delayed: real S3 clients keep
connections alive, while moto closes each one after its response, so charging a handshake
round trip per request would punish moto's quirk, not the client.

The bytes never enter the proxy's memory: each chunk waits in a pipe, moved in and out with
``splice(2)``, so the proxy spends little CPU (a network would spend none of the machine's),
and leaves the two cores to the clients and the server being measured.

Run it alone::

    python -m bench.latencyproxy --listen-port 9001 --upstream 127.0.0.1:9000 --rtt-ms 20

or in-process with ``LatencyProxy(upstream_port, rtt_ms=20).start()``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import os
import signal
import socket
import threading
import time

CHUNK = 1 << 20
MAX_BUFFERED = 64 << 20
MAX_PIECES = 128  # pipes waiting per direction: 2 descriptors each


class _Piece:
    """A chunk of a stream waiting in a pipe of its own: ``n`` bytes."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # up to the unprivileged limit, 1 MiB by default
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, CHUNK)
        self.n = 0

    @classmethod
    def receive(cls, src: socket.socket) -> _Piece | None:
        """The next chunk of ``src`` in a pipe of its own (waiting for it); None at EOF.
        Whoever holds a piece closes it."""
        piece = cls()
        try:
            if piece.fill(src):
                return piece
        except BaseException:
            piece.close()
            raise
        piece.close()
        return None

    def fill(self, src: socket.socket) -> int:
        """Move what ``src`` has (at least 1 byte, waiting for it) into the pipe; 0 at EOF."""
        self.n = os.splice(src.fileno(), self.w, CHUNK)
        return self.n

    def drain(self, dst: socket.socket) -> None:
        while self.n:
            self.n -= os.splice(self.r, dst.fileno(), self.n)

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class _DelayLine:
    """Chunks in arrival order, each released at its due time; bounded in bytes."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._items: collections.deque[tuple[float, _Piece | None]] = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self.closed = False

    def put(self, data: _Piece | None) -> bool:
        """Queue a chunk (None: end of stream); False if the line was closed meanwhile."""
        due = time.monotonic() + self.delay
        with self._cond:
            while (
                data
                and not self.closed
                and (self._bytes > MAX_BUFFERED or len(self._items) >= MAX_PIECES)
            ):
                self._cond.wait()
            if self.closed:
                return False
            self._items.append((due, data))
            self._bytes += data.n if data else 0
            self._cond.notify_all()
            return True

    def get(self) -> _Piece | None:
        """The next chunk once it is due; None at the end of the stream or on close."""
        with self._cond:
            while not self._items and not self.closed:
                self._cond.wait()
            if self.closed:
                return None
            due, data = self._items[0]
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        with self._cond:
            if self.closed or not self._items:
                return None
            self._items.popleft()
            self._bytes -= data.n if data else 0
            self._cond.notify_all()
        return data

    def close(self) -> None:
        with self._cond:
            self.closed = True
            for _, piece in self._items:
                if piece is not None:
                    piece.close()
            self._items.clear()
            self._cond.notify_all()


class _Pair:
    """One proxied connection: a client socket, an upstream socket, two delayed directions."""

    def __init__(self, client: socket.socket, upstream: socket.socket, delay: float) -> None:
        self.socks = (client, upstream)
        self.delay = delay
        self.lines: list[_DelayLine] = []
        self._done = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        client, upstream = self.socks
        for src, dst in ((client, upstream), (upstream, client)):
            if self.delay > 0:
                line = _DelayLine(self.delay)
                self.lines.append(line)
                threading.Thread(target=self._read, args=(src, line), daemon=True).start()
                threading.Thread(target=self._write, args=(line, dst), daemon=True).start()
            else:
                threading.Thread(target=self._copy, args=(src, dst), daemon=True).start()

    def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        piece = _Piece()
        try:
            while piece.fill(src):
                piece.drain(dst)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            self._direction_done()
        except OSError:
            self.abort()
        finally:
            piece.close()

    def _read(self, src: socket.socket, line: _DelayLine) -> None:
        try:
            while (piece := _Piece.receive(src)) is not None:
                if not line.put(piece):
                    piece.close()
                    return
            line.put(None)
        except OSError:
            self.abort()

    def _write(self, line: _DelayLine, dst: socket.socket) -> None:
        try:
            while (piece := line.get()) is not None:
                try:
                    piece.drain(dst)
                finally:
                    piece.close()
            if line.closed:
                return
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            self._direction_done()
        except OSError:
            self.abort()

    def _direction_done(self) -> None:
        with self._lock:
            self._done += 1
            last = self._done == 2
        if last:
            self.close()

    def abort(self) -> None:
        """A reset or error on either side: drop everything and reset both ends."""
        for line in self.lines:
            line.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.close()

    def close(self) -> None:
        for line in self.lines:
            line.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


class LatencyProxy:
    """Listen on loopback and forward every connection to ``upstream`` with a delay."""

    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        *,
        rtt_ms: float = 20.0,
        listen_port: int = 0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay = rtt_ms / 2000.0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", listen_port))
        self._listener.listen(512)
        self.port = self._listener.getsockname()[1]
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LatencyProxy:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Accept connections until ``stop``."""
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _Pair(client, upstream, self.delay).start()

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        if self._thread is not None:
            self._thread.join(5)


def main(argv: list[str] | None = None) -> None:
    """Command line: run a proxy in the foreground until SIGTERM or SIGINT."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen-port", type=int, default=0)
    ap.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="round trip added (ms)")
    args = ap.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    proxy = LatencyProxy(int(port), host or "127.0.0.1", rtt_ms=args.rtt_ms,
                         listen_port=args.listen_port)  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    proxy.start()
    print(f"listening on 127.0.0.1:{proxy.port}", flush=True)
    stop.wait()
    proxy.stop()


if __name__ == "__main__":
    main()
