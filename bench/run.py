"""Benchmark s3mount against s3fs-fuse, rclone mount and raw boto3 on one local S3 server.

    python -m bench.run                        # full sizes, 20 ms round trip, every tool
    python -m bench.run --scale tiny --rtt-ms 0 --tools s3mount,raw
    python -m bench.run --rounds 3 --workloads untar   # the median of 3 rounds

See docs/benchmarks.md for what is measured and how.  Writes ``results.json`` (raw),
``results.md`` (the tables) and ``results.png`` (the chart) into ``--out``.  Whatever
happens (an error, Ctrl-C, SIGTERM), every mount is unmounted and every process it
started is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from bench import report
from bench.s3server import COUNTS_PATH, HARNESS_HEADER
from bench.tools import (
    BUCKET,
    TOOL_NAMES,
    Janitor,
    MountTool,
    Raw,
    Rclone,
    S3fs,
    S3mount,
    S3mountWriteBack,
    peak_rss_kib,
)
from bench.workloads import (
    DESCRIPTIONS,
    SCALES,
    WORKLOAD_NAMES,
    WORKLOADS,
    Ctx,
    KiB,
    MountWorkloads,
    Outcome,
    RawWorkloads,
    delete_prefix,
    describe,
    find_items,
    ls_items,
    make_file,
    make_source_tree,
    put_many,
)

ROOT = Path(__file__).resolve().parent.parent
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench-key-id",
    "AWS_SECRET_ACCESS_KEY": "bench-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}
DROPPED_ENV = (
    "AWS_CA_BUNDLE",  # plain http here; rclone fails with it set
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "S3MOUNT_BUCKET",
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f} s")


def start_process(cmd: list[str], logfile: Path, janitor: Janitor) -> subprocess.Popen[bytes]:
    """A server in its own session (a terminal's Ctrl-C reaches only the harness)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(logfile, "ab") as f:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
    janitor.add_proc(proc)
    return proc


def s3_client(endpoint: str, harness: bool = False) -> Any:
    """A boto3 client; ``harness``: its requests are the harness's own, which the server
    leaves out of its counts (set-up, checks), unlike the raw client's."""
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        config=Config(
            s3={"addressing_style": "path"},
            max_pool_connections=32,
            retries={"mode": "standard", "max_attempts": 5},
        ),
    )
    if harness:

        def mark(request: Any, **_: Any) -> None:
            request.headers[HARNESS_HEADER] = "1"

        client.meta.events.register("before-sign.s3", mark)
    return client


def server_requests(endpoint: str) -> dict[str, int]:
    """The S3 requests the server answered since the last call, by operation (not counting
    the harness's own; see bench/s3server.py)."""
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with no_proxy.open(endpoint + COUNTS_PATH, timeout=30) as r:
        return json.loads(r.read())


def drop_caches() -> bool:
    """Flush and drop the kernel's page, dentry and inode caches (root only)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _first_line(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (r.stdout or r.stderr).strip().splitlines()
    return out[0] if out else None


def machine_info() -> dict[str, Any]:
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f.readline().split(":", 1)[1].strip()
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "memory": mem,
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("s3mount", "moto", "boto3", "pyfuse3"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["s3mount_commit"] = _first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    out["s3fs"] = _first_line(["s3fs", "--version"]) if shutil.which("s3fs") else None
    out["rclone"] = _first_line(["rclone", "version"]) if shutil.which("rclone") else None
    out["fusermount3"] = _first_line(["fusermount3", "-V"])
    return out


def make_tool(name: str, args: argparse.Namespace, janitor: Janitor, endpoint: str,
              logdir: Path) -> MountTool | Raw:  # fmt: skip
    """The adapter for one tool name, with its extra options from the command line."""
    classes: dict[str, type[MountTool]] = {
        "s3mount": S3mount, "s3mount-wb": S3mountWriteBack, "s3fs": S3fs, "rclone": Rclone,
    }  # fmt: skip
    if name == "raw":
        return Raw(name)
    extra = shlex.split(getattr(args, name.replace("-", "_") + "_args") or "")
    return classes[name](name, janitor, endpoint, logdir, extra=extra)


def record(outcome: Outcome, unit: str) -> dict[str, Any]:
    seconds = max(outcome.seconds, 1e-9)
    rate = outcome.amount / seconds / 1e6 if unit == "MB/s" else outcome.amount / seconds
    return {
        "seconds": round(outcome.seconds, 4),
        "close_seconds": None if outcome.close_seconds is None else round(outcome.close_seconds, 4),
        "amount": outcome.amount,
        "rate": round(rate, 3),
        "unit": unit,
        "error": None,
    }


def median_entry(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One tool's rounds as one entry: each workload's median round (the lower middle one
    of an even number), with every round's seconds in ``rounds``; a failure in any round
    is the result.  Peak RSS is the highest of all rounds."""
    if len(rounds) == 1:
        return rounds[0]
    failed = next((r for r in rounds if r.get("error")), None)
    if failed is not None:
        return failed
    entry = {**rounds[0], "results": {}, "rounds": len(rounds)}
    for w in rounds[0]["results"]:
        runs = [r["results"][w] for r in rounds]
        if any(run.get("error") for run in runs):
            entry["results"][w] = next(run for run in runs if run.get("error"))
            continue
        ordered = sorted(runs, key=lambda run: run["seconds"])
        entry["results"][w] = {**ordered[(len(runs) - 1) // 2],
                               "rounds": [run["seconds"] for run in runs]}  # fmt: skip
    entry["peak_rss_kib"] = max((r["peak_rss_kib"] or 0 for r in rounds), default=0) or None
    entry["wall_seconds"] = round(sum(r["wall_seconds"] for r in rounds), 1)
    return entry


def _requests_delta(before: dict | None, after: dict | None) -> dict[str, int] | None:
    if not before or not after:
        return None
    b, a = before.get("requests", {}), after.get("requests", {})
    return {k: a[k] - b.get(k, 0) for k in sorted(a) if a[k] - b.get(k, 0)}


class Bench:
    """One benchmark run: server, proxy, data, then every tool in turn."""

    def __init__(self, args: argparse.Namespace, janitor: Janitor) -> None:
        self.args = args
        self.janitor = janitor
        self.sizes = SCALES[args.scale]
        self.selected = [w for w in WORKLOAD_NAMES if w in args.workloads]
        self.out: Path = args.out
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="s3bench-", dir=args.workdir))
        self.data: dict[str, Any] = {}
        self.drop_caches_ok = False
        self.pids: dict[str, int] = {}  # the servers started, for the record

    # -- set-up ---------------------------------------------------------------------------

    def start_servers(self) -> None:
        port = free_port()
        proc = start_process(
            [sys.executable, "-m", "bench.s3server", "-H", "127.0.0.1", "-p", str(port)],
            self.logs / "s3server.log", self.janitor,
        )  # fmt: skip
        wait_for_port(port, proc)
        self.pids["s3server"] = proc.pid
        self.direct_endpoint = f"http://127.0.0.1:{port}"
        self.endpoint = self.direct_endpoint
        if self.args.rtt_ms > 0:
            pport = free_port()
            proxy = start_process(
                [sys.executable, "-m", "bench.latencyproxy", "--listen-port", str(pport),
                 "--upstream", f"127.0.0.1:{port}", "--rtt-ms", str(self.args.rtt_ms)],
                self.logs / "latencyproxy.log", self.janitor,
            )  # fmt: skip
            wait_for_port(pport, proxy)
            self.pids["latencyproxy"] = proxy.pid
            self.endpoint = f"http://127.0.0.1:{pport}"
        pids = ", ".join(f"{k} pid {v}" for k, v in self.pids.items())
        log(f"S3 server {self.direct_endpoint}, clients use {self.endpoint} ({pids})")

    def prepare_shared(self) -> None:
        s = self.sizes
        self.direct = s3_client(self.direct_endpoint, harness=True)
        self.raw = s3_client(self.endpoint)
        self.direct.create_bucket(Bucket=BUCKET)
        big = self.work / "big.src"
        if {"seq_write", "seq_read_cold", "seq_read_warm"} & set(self.selected):
            make_file(big, s.big_file, seed=1)
        rand = self.work / "rand.src"
        tree = make_source_tree(self.work / "tree.tar", s.tar_files)
        t0 = time.monotonic()
        if "random_read" in self.selected:
            make_file(rand, s.rand_file, seed=2)
            self.direct.upload_file(str(rand), BUCKET, "shared/rand.bin")
        n = 0
        if {"ls_cold", "ls_warm"} & set(self.selected):
            n += put_many(self.direct, ls_items(s))
        if "find_stat" in self.selected:
            n += put_many(self.direct, find_items(s))
        log(f"shared data: {n} objects and the random-read file in {time.monotonic() - t0:.1f} s")
        self.ctx = Ctx(s, self.work, self.raw, self.direct, big, rand, tree, self.args.timeout)

    def prepare_tool(self, prefix: str, need_big: bool) -> None:
        """Fresh data for one tool's rename and rm (and its big file, if it writes none)."""
        s = self.sizes
        body = b"r" * (4 * KiB)
        items: list[tuple[str, bytes]] = []
        if "rename_dir" in self.selected:
            items += [(f"{prefix}/ren/src/f{i:04d}", body) for i in range(s.rename_files)]
        if "rm_rf" in self.selected:
            items += [(f"{prefix}/rm/f{i:05d}", body) for i in range(s.rm_files)]
        put_many(self.direct, items)
        if need_big:
            self.direct.upload_file(str(self.ctx.big_src), BUCKET, f"{prefix}/big.bin")

    # -- running --------------------------------------------------------------------------

    def run_tool(self, tool: MountTool | Raw, prefix: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"kind": tool.kind, "results": {}, "peak_rss_kib": None}
        if isinstance(tool, MountTool):
            entry["options"] = tool.extra
        reads_big = {"seq_read_cold", "seq_read_warm"} & set(self.selected)
        self.prepare_tool(prefix, bool(reads_big) and "seq_write" not in self.selected)
        units = {w: u for w, _, u in WORKLOADS}
        if isinstance(tool, Raw):
            raw = RawWorkloads(self.ctx, prefix)
            for phase in ("write", "read"):
                names = [w for w, p, _ in WORKLOADS if p == phase and w in self.selected]
                if names:
                    # As before each mount: the S3 server's own files leave the page cache
                    # too, so that every client reads the same cold server.
                    self.drop_caches_ok = drop_caches()
                for w in names:
                    entry["results"][w] = self._measure(tool.name, w, units[w], getattr(raw, w))
            return entry
        rss: dict[str, int | None] = {}
        for phase in ("write", "read"):
            names = [w for w, p, _ in WORKLOADS if p == phase and w in self.selected]
            if not names:
                continue
            mnt = self.work / f"mnt-{prefix}-{phase}"
            mnt.mkdir()
            self.drop_caches_ok = drop_caches()
            tool.mount(mnt, self.work / f"cache-{prefix}-{phase}")
            try:
                wl = MountWorkloads(self.ctx, mnt, prefix, tool.settle)
                for w in names:
                    warmup = {"seq_read_warm": "seq_read_cold", "ls_warm": "ls_cold"}.get(w)
                    if warmup and warmup not in self.selected:
                        getattr(wl, warmup)()  # untimed: warm needs a cold pass first
                    entry["results"][w] = self._measure(
                        tool.name, w, units[w], getattr(wl, w), tool
                    )
                rss[phase] = peak_rss_kib(tool.pid)
            except BaseException:
                # Interrupted (or failed) mid-workload, the mount may be busy: a failed
                # unmount must not hide why we stop (the janitor unmounts it lazily).
                with contextlib.suppress(Exception):
                    tool.unmount()
                raise
            tool.unmount()
        entry["rss_kib_by_phase"] = rss
        entry["peak_rss_kib"] = max((v for v in rss.values() if v), default=None)
        return entry

    def _measure(self, tool_name: str, name: str, unit: str, fn: Any,
                 tool: MountTool | None = None) -> dict[str, Any]:  # fmt: skip
        before = tool.status() if tool is not None else None
        server_requests(self.direct_endpoint)  # what came before is not this workload's
        try:
            result = record(fn(), unit)
        except Exception as e:  # one failed workload must not lose the others' results
            log(f"[{tool_name}] {name} FAILED: {e}")
            return {"seconds": None, "error": f"{type(e).__name__}: {e}", "unit": unit}
        result["server_requests"] = server_requests(self.direct_endpoint)
        if tool is not None:
            result["requests"] = _requests_delta(before, tool.status())
        closed = result["close_seconds"]
        extra = f" (close {closed:.2f} s)" if closed is not None else ""
        log(f"[{tool_name}] {name}: {result['seconds']:.2f} s{extra}, {result['rate']:,.1f} {unit}")
        return result

    def run(self) -> dict[str, Any]:
        started = datetime.datetime.now().astimezone()
        self.start_servers()
        self.prepare_shared()
        self.data = {
            "meta": {
                "date": started.isoformat(timespec="seconds"),
                "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
                "rtt_ms": self.args.rtt_ms,
                "scale": self.args.scale,
                "rounds": self.args.rounds,
                "sizes": self.sizes.__dict__,
                "machine": machine_info(),
                "versions": versions(),
                "server": "moto (bench.s3server: ranged GETs read only the range)",
                "pids": self.pids,
            },
            "workloads": {
                w: {"phase": p, "unit": u, "description": describe(w, self.sizes)}
                for w, p, u in WORKLOADS
                if w in self.selected
            },
            "tools": {},
        }
        tools = []
        for name in self.args.tools:
            tool = make_tool(name, self.args, self.janitor, self.endpoint, self.logs)
            reason = tool.missing()
            if reason:
                log(f"[{name}] skipped: {reason}")
                self.data["tools"][name] = {"skipped": reason, "results": {}}
            else:
                tools.append(tool)
        rounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in tools}
        for n in range(self.args.rounds):  # the tools take turns: a slow spell hits them all
            for tool in tools:
                prefix = f"t-{tool.name}" + (f"-r{n + 1}" if self.args.rounds > 1 else "")
                rounds[tool.name].append(self._run_round(tool, prefix, n))
                # Saved after every round: a run killed at hour two keeps what it measured.
                self.data["tools"][tool.name] = median_entry(rounds[tool.name])
                self.data["meta"]["rounds_done"] = {k: len(v) for k, v in rounds.items()}
                self.data["meta"]["drop_caches"] = self.drop_caches_ok
                self.data["meta"]["wall_seconds"] = round(
                    (datetime.datetime.now().astimezone() - started).total_seconds(), 1
                )
                self.save()
        return self.data

    def _run_round(self, tool: MountTool | Raw, prefix: str, n: int) -> dict[str, Any]:
        t0 = time.monotonic()
        log(f"[{tool.name}] start" + (f", round {n + 1}" if self.args.rounds > 1 else ""))
        try:
            entry = self.run_tool(tool, prefix)
        except Exception as e:
            log(f"[{tool.name}] FAILED: {type(e).__name__}: {e}")
            entry = {"error": f"{type(e).__name__}: {e}", "results": {}}
        entry["wall_seconds"] = round(time.monotonic() - t0, 1)
        if not self.args.keep_data:
            delete_prefix(self.direct, f"{prefix}/")
        return entry

    def save(self) -> str:
        """Write results.json and results.md as they stand; return the table's text."""
        (self.out / "results.json").write_text(json.dumps(self.data, indent=2) + "\n")
        text = report.document(self.data)
        (self.out / "results.md").write_text(text)
        return text

    def write_outputs(self) -> None:
        print(self.save())
        if report.chart(self.data, self.out / "results.png"):
            log(f"chart: {self.out / 'results.png'}")
        log(f"results: {self.out / 'results.json'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    ap.add_argument("--rtt-ms", type=float, default=20.0,
                    help="round trip added by the delay proxy; 0: no proxy")  # fmt: skip
    ap.add_argument("--scale", choices=sorted(SCALES), default="full", help="workload sizes")
    ap.add_argument("--tools", default=",".join(TOOL_NAMES),
                    help=f"comma-separated, from {','.join(TOOL_NAMES)}")  # fmt: skip
    ap.add_argument("--workloads", default=",".join(WORKLOAD_NAMES),
                    help=f"comma-separated, from {','.join(WORKLOAD_NAMES)}")  # fmt: skip
    ap.add_argument("--out", type=Path, help="result directory (default bench/results/STAMP)")
    ap.add_argument("--workdir", help="where mount points, caches and local data go (a new "
                    "temporary directory inside it)")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=1800.0,
                    help="seconds to wait for written data to reach S3")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every tool this many times, taking turns, and report each "
                    "workload's median")  # fmt: skip
    ap.add_argument("--keep-data", action="store_true",
                    help="keep each tool's objects in the server until the end")  # fmt: skip
    ap.add_argument("--s3mount-args", default="", help="extra options for s3mount mount")
    ap.add_argument("--s3mount-wb-args", default="--write-back 1",
                    help="options for s3mount in write-back mode")  # fmt: skip
    ap.add_argument("--s3fs-args", default="", help="extra options for s3fs")
    ap.add_argument("--rclone-args", default="", help="extra options for rclone mount")
    args = ap.parse_args(argv)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for t in args.tools:
        if t not in TOOL_NAMES:
            ap.error(f"unknown tool {t!r}; choose from {', '.join(TOOL_NAMES)}")
    for w in args.workloads:
        if w not in DESCRIPTIONS:
            ap.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOAD_NAMES)}")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.out = ROOT / "bench" / "results" / f"{stamp}-{args.scale}-rtt{args.rtt_ms:g}ms"
    return args


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 if every selected tool measured every workload, else 1."""
    args = parse_args(argv)
    for k in DROPPED_ENV:
        os.environ.pop(k, None)
    os.environ.update(CREDENTIALS)
    janitor = Janitor()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    bench = Bench(args, janitor)
    try:
        data = bench.run()
        bench.write_outputs()
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        janitor.close()
        shutil.rmtree(bench.work, ignore_errors=True)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
    failed = [
        f"{t}: {v.get('error') or w}"
        for t, v in data["tools"].items()
        for w in ([None] if v.get("error") else [w for w, r in v["results"].items() if r["error"]])
    ]
    if failed:
        log("some measurements failed: " + "; ".join(map(str, failed)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
