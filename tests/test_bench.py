"""The benchmark harness (bench/) runs end to end on tiny sizes and cleans up after itself.

Benchmarks are not tests: nothing here looks at a time.  The harness mounts for real
(s3mount, and s3fs-fuse / rclone when installed) against its own moto server behind its
delay proxy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(ROOT))

from bench.latencyproxy import LatencyProxy  # noqa: E402
from bench.tools import is_mounted, mounted_paths  # noqa: E402
from bench.workloads import WORKLOAD_NAMES  # noqa: E402
from s3mount.control import process_running  # noqa: E402

T = TypeVar("T")


def harness(*args: str, tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.run", "--scale", "tiny", "--workdir", str(tmp_path),
         *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def nothing_left(tmp_path: Path, pids: list[int]) -> None:
    assert not [m for m in mounted_paths() if m.startswith(str(tmp_path))]
    for pid in pids:
        assert not process_running(pid), f"pid {pid} still runs"
    for proc in Path("/proc").iterdir():  # no daemon still serving a mount point of ours
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            assert str(tmp_path).encode() not in cmdline, cmdline


def terminate_when(p: subprocess.Popen[str], ready: Callable[[], T], timeout: float,
                   ) -> tuple[T, str]:  # fmt: skip
    """SIGTERM the harness once ``ready()`` is true; return what it was, and the stderr."""
    try:
        deadline = time.monotonic() + timeout
        while not (value := ready()):
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.monotonic() < deadline, f"{ready} never came true"
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        _, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, stderr[-3000:]
    return value, stderr


def test_tiny_run_measures_everything(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # every tool installed here; rclone uploads at once instead of after 5 s, to stay fast
    p = harness("--rtt-ms", "2", "--out", str(out), "--rclone-args=--vfs-write-back 0s",
                tmp_path=tmp_path)  # fmt: skip
    stdout, stderr = p.communicate(timeout=240)
    assert p.returncode == 0, stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["rtt_ms"] == 2 and data["meta"]["scale"] == "tiny"
    assert list(data["workloads"]) == WORKLOAD_NAMES
    measured = [t for t, v in data["tools"].items() if "skipped" not in v]
    assert {"s3mount", "s3mount-wb", "raw"} <= set(measured)
    for tool in measured:
        entry = data["tools"][tool]
        assert "error" not in entry, entry
        assert set(entry["results"]) == set(WORKLOAD_NAMES), tool
        for name, r in entry["results"].items():
            assert r["error"] is None, (tool, name, r)
            assert r["seconds"] >= 0 and r["rate"] > 0 and r["amount"] > 0, (tool, name, r)
        if entry["kind"] == "mount":
            assert entry["peak_rss_kib"] > 1000, tool
    for name in ("seq_write", "small_create"):  # s3mount's own counters were read
        assert data["tools"]["s3mount"]["results"][name]["requests"]["PutObject"] >= 1
    # The server counted each workload's requests, and not the harness's own checks: the
    # raw client sends exactly these, and s3mount no more than its own counters say (the
    # harness polled S3 until each write was there, but none of it shows).
    sizes = data["meta"]["sizes"]
    raw = data["tools"]["raw"]["results"]
    assert raw["small_create"]["server_requests"] == {"PutObject": sizes["small_files"]}
    assert raw["rm_rf"]["server_requests"] == {"DeleteObjects": 1, "ListObjectsV2": 1}
    for name, r in data["tools"]["s3mount"]["results"].items():
        for op, n in r["server_requests"].items():
            assert n <= r["requests"].get(op, 0), (name, r["server_requests"], r["requests"])
    assert data["tools"]["s3mount"]["results"]["rm_rf"]["server_requests"]["DeleteObjects"] >= 1
    table = (out / "results.md").read_text()
    assert table == stdout.strip() + "\n" or table.strip() in stdout
    for name in WORKLOAD_NAMES:
        assert f"| {name} |" in table
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    nothing_left(tmp_path, list(data["meta"]["pids"].values()))


def test_rounds_report_the_median_of_fresh_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # One workload of each phase would mount twice a round: one is enough to show rounds.
    p = harness("--rtt-ms", "0", "--rounds", "3", "--tools", "s3mount",
                "--workloads", "rm_rf", "--out", str(out), tmp_path=tmp_path)  # fmt: skip
    stdout, stderr = p.communicate(timeout=240)
    assert p.returncode == 0, stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    entry = data["tools"]["s3mount"]
    assert entry["rounds"] == 3
    r = entry["results"]["rm_rf"]
    assert len(r["rounds"]) == 3 and r["seconds"] == sorted(r["rounds"])[1], r
    assert stderr.count("[s3mount] rm_rf:") == 3  # each round on its own mount
    assert "round 3" in stderr
    assert "3 rounds" in (out / "results.md").read_text()
    nothing_left(tmp_path, list(data["meta"]["pids"].values()))


def test_interrupted_run_cleans_up(tmp_path: Path) -> None:
    p = harness("--rtt-ms", "5", "--tools", "s3mount", "--workloads", "seq_write,ls_cold",
                "--out", str(tmp_path / "out"), tmp_path=tmp_path)  # fmt: skip

    def mounted() -> str | None:  # whatever the harness has mounted
        return next((m for m in mounted_paths() if m.startswith(str(tmp_path))), None)

    mnt, stderr = terminate_when(p, mounted, 60)
    assert "interrupted" in stderr
    assert not is_mounted(Path(mnt))
    pids = [int(x) for x in re.findall(r"(?:s3server|latencyproxy) pid (\d+)", stderr)]
    assert len(pids) == 2, stderr[-3000:]
    nothing_left(tmp_path, pids)


def test_interrupted_run_keeps_the_rounds_it_finished(tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = harness("--rtt-ms", "0", "--rounds", "50", "--tools", "s3mount",
                "--workloads", "rm_rf", "--out", str(out), tmp_path=tmp_path)  # fmt: skip
    _, stderr = terminate_when(p, (out / "results.json").exists, 120)  # written after a round
    data = json.loads((out / "results.json").read_text())
    done = data["meta"]["rounds_done"]["s3mount"]
    assert 1 <= done < 50
    assert len(data["tools"]["s3mount"]["results"]["rm_rf"].get("rounds", [None])) == done
    assert "Incomplete run" in (out / "results.md").read_text()


@pytest.mark.parametrize("rtt_ms", [0.0, 20.0])
def test_latency_proxy_adds_the_round_trip(rtt_ms: float) -> None:
    """One request/response through the proxy takes one added round trip, no less."""
    srv = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    proxy = LatencyProxy(srv.getsockname()[1], rtt_ms=rtt_ms).start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as c:
            payload = os.urandom(3 << 20)
            t0 = time.monotonic()
            c.sendall(b"ping")
            assert c.recv(4) == b"ping"
            assert time.monotonic() - t0 >= rtt_ms / 1000 * 0.95
            sender = threading.Thread(target=c.sendall, args=(payload,))
            sender.start()
            got = bytearray()
            while len(got) < len(payload):
                got += c.recv(1 << 20)
            sender.join()
            assert bytes(got) == payload
    finally:
        proxy.stop()
        srv.close()


def echo_server() -> socket.socket:
    """A local TCP server echoing every connection, one thread each; close it to stop."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=64)

    def echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_latency_proxy_keeps_concurrent_connections_apart() -> None:
    """Its one thread serves many connections at once; each gets back exactly its bytes,
    also when the other ends close or reset theirs meanwhile."""
    srv = echo_server()
    proxy = LatencyProxy(srv.getsockname()[1], rtt_ms=4).start()
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            payload = os.urandom((i + 1) * 300_000)
            with socket.create_connection(("127.0.0.1", proxy.port)) as c:
                if i % 4 == 3:  # a client that gives up early: reset its connection
                    c.sendall(payload[:1000])
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    return
                sender = threading.Thread(target=c.sendall, args=(payload,))
                sender.start()
                got = bytearray()
                while len(got) < len(payload):
                    chunk = c.recv(1 << 20)
                    assert chunk, "connection closed early"
                    got += chunk
                sender.join()
                c.shutdown(socket.SHUT_WR)
                assert c.recv(1) == b""  # the end of the stream comes through too
                assert bytes(got) == payload
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert not any(t.is_alive() for t in threads)
    finally:
        proxy.stop()
        srv.close()


def test_latency_proxy_waits_when_out_of_descriptors() -> None:
    """With its descriptors used up, the proxy stops polling its listener instead of
    spinning on it, and takes the waiting clients once connections close."""
    srv = echo_server()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "bench.latencyproxy", "--upstream",
         f"127.0.0.1:{srv.getsockname()[1]}", "--rtt-ms", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    clients: list[socket.socket] = []
    try:
        port = int(re.search(r"127\.0\.0\.1:(\d+)", proxy.stdout.readline()).group(1))
        resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (32, 32))  # before any client
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
        time.sleep(0.5)  # it accepts what it can: about a dozen connections
        before = cpu_seconds(proxy.pid)
        time.sleep(1.0)
        assert cpu_seconds(proxy.pid) - before < 0.3  # idle, not polling a listener it can't serve
        for c in clients[:25]:
            c.close()
        time.sleep(1.0)  # it drops their pairs, and takes the rest from the backlog
        for i, c in enumerate(clients[25:]):
            c.settimeout(10)
            c.sendall(b"ping %d" % i)
            assert c.recv(64) == b"ping %d" % i
        assert proxy.poll() is None
    finally:
        for c in clients:
            c.close()
        proxy.terminate()
        proxy.wait(10)
        srv.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
