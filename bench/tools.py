"""The file systems measured, how each is mounted and unmounted, and the clean-up registry."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BUCKET = "bench"


def mounted_paths() -> set[str]:
    """Mount points in this mount namespace (from mountinfo, which never blocks on FUSE)."""
    out = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            raw = line.split()[4]
            out.add(raw.encode().decode("unicode_escape"))
    return out


def is_mounted(path: Path) -> bool:
    return str(path) in mounted_paths()


def peak_rss_kib(pid: int | None) -> int | None:
    """The process's peak resident set size (VmHWM), in KiB; None if it is gone."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Janitor:
    """Everything the benchmark started or mounted, undone by ``close`` whatever happened."""

    def __init__(self) -> None:
        self.mounts: list[Path] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pids: dict[int, str] = {}  # pid -> a word its command line must contain

    def add_mount(self, path: Path) -> None:
        self.mounts.append(path)

    def forget_mount(self, path: Path) -> None:
        with contextlib.suppress(ValueError):
            self.mounts.remove(path)

    def add_proc(self, proc: subprocess.Popen[bytes]) -> None:
        self.procs.append(proc)

    def add_pid(self, pid: int, marker: str) -> None:
        self.pids[pid] = marker

    def close(self) -> None:
        """Lazy-unmount every mount, then stop every process, newest first."""
        for path in reversed(self.mounts):
            subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
        self.mounts.clear()
        for pid, marker in list(self.pids.items()):
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if marker.encode() in cmdline:  # not a recycled pid
                    os.kill(pid, signal.SIGKILL)
        self.pids.clear()
        for proc in reversed(self.procs):
            stop_process(proc)
        self.procs.clear()


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def peer_env() -> dict[str, str]:
    """The environment for every child: no CA bundle (plain http), moto's credentials."""
    env = dict(os.environ)
    env.pop("AWS_CA_BUNDLE", None)
    return env


@dataclass
class MountTool:
    """A FUSE file system: subclasses say how to mount it."""

    name: str
    janitor: Janitor
    endpoint: str
    logdir: Path
    pid: int | None = None
    mnt: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)

    kind = "mount"
    binary = ""

    def missing(self) -> str | None:
        """Why this tool cannot run here, or None."""
        if self.binary and shutil.which(self.binary) is None:
            return f"{self.binary} is not installed"
        return None

    def mount(self, mnt: Path, cache: Path) -> None:
        raise NotImplementedError

    def unmount(self) -> None:
        """Unmount and wait for the daemon to exit (it must not be busy)."""
        assert self.mnt is not None
        mnt, self.mnt = self.mnt, None
        for attempt in range(20):
            r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True)
            if r.returncode == 0 or not is_mounted(mnt):
                break
            if attempt == 19:
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
            time.sleep(0.25)
        self.janitor.forget_mount(mnt)
        if self.proc is not None:
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)
        self.pid = None
        self.proc = None

    def settle(self) -> None:
        """Make everything written durable in S3 as far as the tool offers a way to."""

    def status(self) -> dict | None:
        """The tool's own counters, if it has any."""
        return None

    def _start_foreground(
        self, cmd: list[str], mnt: Path, log: Path, env: dict[str, str] | None = None
    ) -> None:
        """Start a daemon that stays in the foreground; wait until its mount is there."""
        with open(log, "ab") as logf:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                env={**peer_env(), **(env or {})}, start_new_session=True,
            )  # fmt: skip
        self.janitor.add_proc(proc)
        self.janitor.add_mount(mnt)
        self.proc, self.pid, self.mnt = proc, proc.pid, mnt
        deadline = time.monotonic() + 60
        while not is_mounted(mnt):
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not mount within 60 s; see {log}")
            time.sleep(0.05)
        os.stat(mnt)  # answers


class S3mount(MountTool):
    """s3mount through its own command line, as a user runs it."""

    write_back = False

    def missing(self) -> str | None:
        return None

    def _cli(self, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "s3mount", *args], capture_output=True, text=True,
            timeout=timeout, env=peer_env(),
        )  # fmt: skip

    def mount(self, mnt: Path, cache: Path) -> None:
        self.janitor.add_mount(mnt)
        r = self._cli(
            "--endpoint-url", self.endpoint, "mount", BUCKET, str(mnt), "--cache-dir", str(cache),
            "--log-file", str(self.logdir / f"{self.name}.log"), *self.extra,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"s3mount mount failed: {r.stderr.strip()}")
        self.mnt = mnt
        self.pid = int(self.status()["pid"])
        self.janitor.add_pid(self.pid, "s3mount")

    def status(self) -> dict | None:
        """The daemon's status: the xattr ``s3mount status`` reads (no S3 request)."""
        assert self.mnt is not None
        with contextlib.suppress(OSError, ValueError):
            return json.loads(os.getxattr(self.mnt, "user.s3mount.status"))
        r = self._cli("status", "--json", str(self.mnt), timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"s3mount status failed: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def settle(self) -> None:
        if self.write_back:
            assert self.mnt is not None
            r = self._cli("sync", str(self.mnt))
            if r.returncode != 0:
                raise RuntimeError(f"s3mount sync failed: {r.stderr.strip()}")

    def unmount(self) -> None:
        assert self.mnt is not None
        mnt, pid = self.mnt, self.pid
        r = self._cli("unmount", str(mnt))
        if r.returncode != 0:
            raise RuntimeError(f"s3mount unmount failed: {r.stderr.strip()}")
        self.janitor.forget_mount(mnt)
        if pid is not None:
            self.janitor.pids.pop(pid, None)
        self.mnt = self.pid = None


class S3mountWriteBack(S3mount):
    """s3mount in write-back mode; ``s3mount sync`` waits until the data is in S3."""

    write_back = True


class S3fs(MountTool):
    """s3fs-fuse with its defaults, plus what a local endpoint needs."""

    binary = "s3fs"

    def mount(self, mnt: Path, cache: Path) -> None:
        cache.mkdir(parents=True, exist_ok=True)
        passwd = cache / "passwd"
        passwd.write_text(
            f"{os.environ['AWS_ACCESS_KEY_ID']}:{os.environ['AWS_SECRET_ACCESS_KEY']}"
        )
        passwd.chmod(0o600)
        cmd = [
            "s3fs", BUCKET, str(mnt), "-f", "-o", f"passwd_file={passwd}",
            "-o", f"url={self.endpoint}", "-o", "use_path_request_style", *self.extra,
        ]  # fmt: skip
        self._start_foreground(cmd, mnt, self.logdir / f"{self.name}.log")


class Rclone(MountTool):
    """rclone mount with ``--vfs-cache-mode writes``."""

    binary = "rclone"

    def mount(self, mnt: Path, cache: Path) -> None:
        cmd = [
            "rclone", "mount", f"bench:{BUCKET}", str(mnt), "--vfs-cache-mode", "writes",
            "--cache-dir", str(cache), *self.extra,
        ]  # fmt: skip
        remote = {
            "RCLONE_CONFIG_BENCH_TYPE": "s3",
            "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
            "RCLONE_CONFIG_BENCH_ENDPOINT": self.endpoint,
            "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
            "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
            "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true",
            "RCLONE_CONFIG_BENCH_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        }
        self._start_foreground(cmd, mnt, self.logdir / f"{self.name}.log", remote)


class Raw:
    """boto3 itself, with parallel transfers: the limit for what any mount can reach."""

    kind = "raw"

    def __init__(self, name: str) -> None:
        self.name = name

    def missing(self) -> str | None:
        return None


TOOL_NAMES = ("s3mount", "s3mount-wb", "s3fs", "rclone", "raw")
PEERS = ("s3fs", "rclone")
OURS = ("s3mount", "s3mount-wb")
