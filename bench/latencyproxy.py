"""A TCP proxy on loopback that adds a fixed network delay, for kernels without ``sch_netem``.

Every chunk of bytes is forwarded ``rtt/2`` after it arrived, in each direction, so one
request/response exchange costs one round trip more than it would directly.  Bandwidth is
not limited: chunks (up to 1 MiB each) are read as soon as they arrive and each is sent when
it is due, so a long transfer keeps flowing at full speed with a constant delay.  At most
``MAX_BUFFERED`` bytes (or ``MAX_PIECES`` chunks) wait per direction; past that the proxy
stops reading and TCP's own flow control pushes back.  A connection's set-up is not delayed:
real S3 clients keep connections alive, while moto closes each one after its response, so
charging a handshake round trip per request would punish moto's quirk, not the client.

The proxy spends little of the machine's CPU (a network would spend none), to leave the two
cores to the clients and the server being measured:

- the bytes never enter its memory: each chunk waits in a pipe, moved in and out with
  ``splice(2)``;
- one thread serves every connection (``epoll``, a heap of due times): moto opens a
  connection per request, and a thread pair per direction cost 1.35 ms of CPU per
  connection in thread start-up and switches, about a third of what moto spends on a small
  PUT.

Out of file descriptors, it stops taking new connections until one closes; the clients
wait in the listen backlog.  A chunk that finds no descriptor for its pipe resets its
connection (a client retries).

Run it alone::

    python -m bench.latencyproxy --listen-port 9001 --upstream 127.0.0.1:9000 --rtt-ms 20

or in-process with ``LatencyProxy(upstream_port, rtt_ms=20).start()``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import fcntl
import heapq
import itertools
import os
import selectors
import signal
import socket
import threading
import time

CHUNK = 1 << 20
MAX_BUFFERED = 64 << 20
MAX_PIECES = 128  # pipes waiting per direction: 2 descriptors each


_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _Piece:
    """A chunk of a stream waiting in a pipe of its own: ``n`` bytes."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        with contextlib.suppress(OSError):  # up to the unprivileged limit, 1 MiB by default
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, CHUNK)
        self.n = 0

    def fill(self, src: socket.socket) -> int:
        """Move what ``src`` has into the pipe: the count, 0 at EOF; BlockingIOError if
        nothing has come yet."""
        self.n = os.splice(src.fileno(), self.w, CHUNK, flags=os.SPLICE_F_NONBLOCK)
        return self.n

    def drain(self, dst: socket.socket) -> bool:
        """Send what is left to ``dst``; False if its buffer filled up first."""
        try:
            while self.n:
                self.n -= os.splice(self.r, dst.fileno(), self.n, flags=os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class _Direction:
    """One direction of a connection: the chunks read from ``src``, each sent to ``dst``
    once due, in order.  ``None`` in the queue marks the end of the stream."""

    def __init__(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        self.pair, self.src, self.dst = pair, src, dst
        self.queue: collections.deque[tuple[float, _Piece | None]] = collections.deque()
        self.buffered = 0
        self.eof = False  # src has ended
        self.blocked = False  # the head chunk waits for dst to take more
        self.done = False  # the end of the stream was passed on
        self.spare: _Piece | None = None  # a pipe the last read did not use

    @property
    def reading(self) -> bool:
        return not self.eof and self.buffered <= MAX_BUFFERED and len(self.queue) < MAX_PIECES

    def receive(self, due: float) -> bool:
        """Queue the next chunk of ``src`` (or its end), to be sent at ``due``; False if
        nothing had come after all."""
        piece = self.spare or _Piece()
        self.spare = None
        try:
            n = piece.fill(self.src)
        except BlockingIOError:
            self.spare = piece
            return False
        except BaseException:
            piece.close()
            raise
        if n == 0:
            piece.close()
            self.eof = True
            self.queue.append((due, None))
        else:
            self.queue.append((due, piece))
            self.buffered += n
        return True

    def send_due(self, now: float) -> None:
        """Send every chunk that is due, in order, as far as ``dst`` takes them."""
        while self.queue and self.queue[0][0] <= now:
            piece = self.queue[0][1]
            if piece is None:
                with contextlib.suppress(OSError):
                    self.dst.shutdown(socket.SHUT_WR)
                self.done = True
            else:
                size = piece.n
                self.blocked = not piece.drain(self.dst)
                self.buffered -= size - piece.n
                if self.blocked:
                    return
                piece.close()
            self.queue.popleft()

    def close(self) -> None:
        for _, piece in self.queue:
            if piece is not None:
                piece.close()
        self.queue.clear()
        if self.spare is not None:
            self.spare.close()
            self.spare = None


class _Pair:
    """One proxied connection: a client socket, an upstream socket, two delayed directions."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.socks = (client, upstream)
        self.up = _Direction(self, client, upstream)
        self.down = _Direction(self, upstream, client)
        self.closed = False

    def roles(self, sock: socket.socket) -> tuple[_Direction, _Direction]:
        """The direction ``sock`` is the source of, and the one it is the destination of."""
        return (self.up, self.down) if sock is self.socks[0] else (self.down, self.up)

    def events(self, sock: socket.socket) -> int:
        """What to wait for on ``sock``: data to read, room to write a blocked chunk."""
        as_src, as_dst = self.roles(sock)
        return (selectors.EVENT_READ if as_src.reading else 0) | (
            selectors.EVENT_WRITE if as_dst.blocked else 0
        )

    def close(self, reset: bool = False) -> None:
        self.closed = True
        self.up.close()
        self.down.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                if reset:
                    s.shutdown(socket.SHUT_RDWR)
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
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self._listening = False  # not while out of descriptors, until a connection closes
        self._unconnected: collections.deque[socket.socket] = collections.deque()
        self._thread: threading.Thread | None = None
        self._sel = selectors.DefaultSelector()
        self._watching: dict[socket.socket, int] = {}  # socket -> events registered
        self._timers: list[tuple[float, int, _Direction]] = []  # (due, tie-break, direction)
        self._seq = itertools.count()
        self._pairs: set[_Pair] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LatencyProxy:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._thread is None:
            self._close_all()
        else:
            os.write(self._wake_w, b"x")
            self._thread.join(5)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def serve_forever(self) -> None:
        """Forward connections until ``stop``; then close them all."""
        self._set_listening(True)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping:
                wait = self._timers[0][0] - time.monotonic() if self._timers else None
                for key, mask in self._sel.select(None if wait is None else max(wait, 0.0)):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif isinstance(key.data, _Pair) and not key.data.closed:
                        self._ready(key.data, key.fileobj, mask)  # type: ignore[arg-type]
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    direction = heapq.heappop(self._timers)[2]
                    if not direction.pair.closed and not direction.blocked:
                        self._send(direction, now)
        finally:
            self._close_all()

    def _close_all(self) -> None:
        for pair in list(self._pairs):
            pair.close()
        self._pairs.clear()
        while self._unconnected:
            self._unconnected.popleft().close()
        self._sel.close()
        self._listener.close()

    def _accept(self) -> None:
        while self._listening:
            try:
                client, _ = self._listener.accept()
            except BlockingIOError:  # none waiting
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self._set_listening(False)
                    return
                continue  # that client went away before we took it
            self._unconnected.append(client)
            self._connect_waiting()

    def _connect_waiting(self) -> None:
        """Connect accepted clients upstream; out of descriptors, stop listening (it would
        stay readable: a busy loop) until a connection closes.  Clients wait meanwhile."""
        while self._unconnected:
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self._set_listening(False)
                    return
                self._unconnected.popleft().close()
                continue
            pair = _Pair(self._unconnected.popleft(), upstream)
            for s in pair.socks:
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pairs.add(pair)
            self._watch(pair)

    def _set_listening(self, on: bool) -> None:
        if on != self._listening:
            if on:
                self._sel.register(self._listener, selectors.EVENT_READ)
            else:
                self._sel.unregister(self._listener)
            self._listening = on

    def _ready(self, pair: _Pair, sock: socket.socket, mask: int) -> None:
        now = time.monotonic()
        as_src, as_dst = pair.roles(sock)
        if mask & selectors.EVENT_WRITE and as_dst.blocked:
            as_dst.blocked = False
            self._send(as_dst, now)
        if mask & selectors.EVENT_READ and as_src.reading and not pair.closed:
            due = now + self.delay
            try:
                received = as_src.receive(due)
            except OSError:  # a reset: drop everything, reset the other end too
                self._drop(pair, reset=True)
                return
            if received:
                heapq.heappush(self._timers, (due, next(self._seq), as_src))
                self._watch(pair)

    def _send(self, direction: _Direction, now: float) -> None:
        pair = direction.pair
        try:
            direction.send_due(now)
        except OSError:
            self._drop(pair, reset=True)
            return
        if pair.up.done and pair.down.done:
            self._drop(pair)
        else:
            self._watch(pair)

    def _watch(self, pair: _Pair) -> None:
        """Register the pair's sockets for what each waits for now."""
        for s in pair.socks:
            events, before = pair.events(s), self._watching.get(s, 0)
            if events == before:
                continue
            if not before:
                self._sel.register(s, events, pair)
            elif not events:
                self._sel.unregister(s)
            else:
                self._sel.modify(s, events, pair)
            self._watching[s] = events

    def _drop(self, pair: _Pair, reset: bool = False) -> None:
        for s in pair.socks:
            if self._watching.pop(s, 0):
                self._sel.unregister(s)
        pair.close(reset)
        self._pairs.discard(pair)
        if not self._listening:
            self._connect_waiting()
            self._set_listening(not self._unconnected)


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
