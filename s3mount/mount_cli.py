"""The mount commands: ``mount`` (also ``s3mount BUCKET[:PREFIX] MOUNTPOINT``), ``unmount``,
``sync``, ``drop-cache``, ``status``, ``install-helper``.  The mount daemonizes by starting
itself again in the foreground, detached, and returns once the child says the mount answers."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import platformdirs

from s3mount import config
from s3mount.control import (
    INVALIDATE_XATTR,
    NO_WAIT_XATTR,
    STATUS_XATTR,
    SYNC_XATTR,
    process_running,
)
from s3mount.notify import JournalFormatter, stderr_is_journal
from s3mount.storage import MiB, TransferSettings

EXIT_OK, EXIT_FAILED = 0, 3
READY = b"READY\n"


class MountUsageError(Exception):
    pass


def _typed(name: str) -> Callable[[str], Any]:
    """An argparse ``type`` converting with the setting's own rules."""

    def conv(text: str) -> Any:
        try:
            return config.convert(name, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    conv.__name__ = name
    return conv


def add_mount_commands(
    sub: argparse._SubParsersAction, common: argparse.ArgumentParser, run: Callable
) -> None:
    p = sub.add_parser(
        "mount",
        parents=[common],
        argument_default=argparse.SUPPRESS,
        help="mount a bucket: s3mount [mount] BUCKET[:PREFIX]|NAME [MOUNTPOINT]",
        description="Mount BUCKET (or the sub-tree PREFIX of it), or the mount NAME of the "
        "config file, on MOUNTPOINT. Returns once the mount answers; with -f it stays in front "
        "and logs to stderr. Every option can also be set with -o NAME=VALUE, in the "
        "environment as S3MOUNT_NAME, or in the config file; the command line wins, then the "
        "environment, then the file (docs/configuration.md).",
    )
    p.add_argument("source", metavar="BUCKET[:PREFIX]|NAME", nargs="?", default=None)
    p.add_argument("mountpoint", nargs="?", default=None)
    p.add_argument("-f", "--foreground", action="store_true", help="stay in front")
    p.add_argument(
        "-o",
        dest="o",
        action="append",
        default=[],
        metavar="NAME=VALUE,FLAG,...",
        help="options in mount-helper form, e.g. -o ro,allow_other,uid=1000",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        default=False,
        help="print every setting and where it comes from, then exit",
    )
    bools = {"read_only", "allow_other"}
    for name in (
        "read_only", "allow_other", "uid", "gid", "umask", "cache_dir", "cache_size", "listing_ttl",
        "attr_timeout", "negative_timeout", "key_sync_timeout", "threads", "io_timeout",
        "write_back", "part_size", "log_level", "log_file", "metrics_port", "metrics_host",
        "metadata",
    ):  # fmt: skip
        setting = config.SETTINGS[name]
        flag = "--" + name.replace("_", "-")
        if name in bools:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=setting.help)
        else:
            p.add_argument(flag, type=_typed(name), metavar=_METAVAR.get(name), help=setting.help)
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run, needs_storage=False)

    p = sub.add_parser("unmount", parents=[common], help="upload dirty data, unmount, wait")
    p.add_argument("mountpoint")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait (600)")
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="do not wait for journaled uploads: they finish at the next mount",
    )
    p.set_defaults(func=cmd_unmount, needs_storage=False)

    p = sub.add_parser(
        "sync", parents=[common], help="return once everything written to the mount is in S3"
    )
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_sync, needs_storage=False)

    p = sub.add_parser(
        "drop-cache",
        parents=[common],
        help="forget what a mount cached at and below PATH (after changes behind its back)",
    )
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_drop_cache, needs_storage=False)

    p = sub.add_parser(
        "status",
        parents=[common],
        help="requests, bytes, cache hits, pending uploads, errors of a mount",
    )
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status, needs_storage=False)

    p = sub.add_parser(
        "install-helper",
        parents=[common],
        help="link the mount helper into /sbin (mount -t fuse.s3mount, fstab, systemd)",
        description="Link /sbin/mount.fuse.s3mount to this installation's helper, so that "
        "mount(8), /etc/fstab and systemd .mount units can mount s3mount file systems, and "
        "/usr/local/bin/s3mount to this s3mount (the path the systemd units use).",
    )
    p.add_argument("--remove", action="store_true", help="remove the links instead")
    p.add_argument("--sbin-dir", default="/sbin", help="where mount(8) looks (/sbin)")
    p.add_argument("--bin-dir", default="/usr/local/bin", help="for s3mount (/usr/local/bin)")
    p.set_defaults(func=cmd_install_helper, needs_storage=False)


_METAVAR = {
    "uid": "UID", "gid": "GID", "umask": "OCTAL", "cache_dir": "DIR", "cache_size": "MIB",
    "listing_ttl": "SECONDS",
    "attr_timeout": "SECONDS", "negative_timeout": "SECONDS", "key_sync_timeout": "SECONDS",
    "threads": "N", "io_timeout": "SECONDS", "write_back": "SECONDS", "part_size": "MIB",
    "log_level": "LEVEL", "log_file": "FILE", "metrics_port": "PORT", "metrics_host": "ADDRESS",
    "metadata": "MODE",
}  # fmt: skip


def mount_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line: ``-o`` items, then the long options."""
    try:
        flags = config.parse_o(args.o)
    except ValueError as exc:
        raise MountUsageError(str(exc)) from None
    for name in config.SETTINGS:
        if name in vars(args):
            flags[name] = getattr(args, name)
    return flags


def resolve_mount(args: argparse.Namespace) -> config.Resolved:
    """Every setting of this mount: flags > environment > config file > defaults."""
    res = config.resolve(args.source, args.mountpoint, mount_flags(args))
    if getattr(args, "debug", False):
        res.values["log_level"], res.origins["log_level"] = "DEBUG", "command line (--debug)"
    return res


def print_settings(res: config.Resolved) -> None:
    print(f"# config file: {res.config}" + (f" (mount {res.name})" if res.name else ""))
    names = [*config.IDENTITY, *config.SETTINGS]
    width = max(len(n) for n in names)
    for name in names:
        value = res.values.get(name)
        shown = oct(value).replace("0o", "0") if name == "umask" else value
        print(f"{name:<{width}} = {json.dumps(shown)}  # {res.origins.get(name, 'default')}")


def default_cache_dir(bucket: str, prefix: str) -> str:
    tag = bucket + ("-" + hashlib.sha256(prefix.encode()).hexdigest()[:8] if prefix else "")
    return os.path.join(platformdirs.user_cache_dir("s3mount"), tag)


def transfer_settings(part_mib: int) -> TransferSettings:
    if part_mib < 5:
        raise MountUsageError("--part-size must be at least 5 (MiB), S3's minimum part size")
    return TransferSettings(multipart_threshold=part_mib * MiB, part_size=part_mib * MiB)


def daemonize(argv: list[str], log_file: str | None, timeout: float = 120) -> int:
    """Start ``s3mount ... --foreground`` detached; return once it reports the mount ready.

    The daemon logs to ``log_file``; with None it keeps our stderr (journald's stream)."""
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "s3mount", *argv, "--foreground", "--ready-fd", str(w)]
    if log_file is None:
        child = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr, pass_fds=(w,), start_new_session=True
        )
    else:
        os.makedirs(os.path.dirname(log_file), mode=0o700, exist_ok=True)
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as log:
            child = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(w,),
                start_new_session=True,
            )
    os.close(w)
    deadline = time.monotonic() + timeout
    message = b""
    with os.fdopen(r, "rb", buffering=0) as pipe:
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([pipe], [], [], left)[0]:
                continue
            chunk = pipe.read(4096)
            if not chunk:
                break
            message += chunk
            if message.startswith(READY):
                break
    if message.startswith(READY):
        return EXIT_OK
    text = message.decode(errors="replace").strip()
    if not text:
        alive = child.poll() is None
        text = f"the mount did not answer within {timeout:g}s" if alive else "the daemon exited"
        text += f" (see {log_file or 'the journal'})"
    if child.poll() is None:
        child.terminate()
    print(f"s3mount: error: {text}", file=sys.stderr)
    return EXIT_FAILED


def read_status(mountpoint: str) -> dict[str, Any]:
    try:
        raw = os.getxattr(mountpoint, STATUS_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise MountUsageError(f"{mountpoint}: not on an s3mount mount") from None
        raise MountUsageError(f"{mountpoint}: {os.strerror(exc.errno or errno.EIO)}") from None
    return json.loads(raw)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def format_status(st: dict[str, Any]) -> str:
    """The status of a mount, for people."""
    from s3mount.metrics import cache_counters

    lines = [
        f"mount:     s3://{st['bucket']}/{st['prefix']} on {st['mountpoint']} (pid {st['pid']})",
        f"uptime:    {_duration(st['uptime'])} ({st['uptime']} s)",
        f"requests:  {sum(st['requests'].values())}",
    ]
    for name, n in sorted(st["requests"].items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {name:<24}{n}")
    lines.append(
        f"bytes:     in {st['bytes_in']} ({_size(st['bytes_in'])}), "
        f"out {st['bytes_out']} ({_size(st['bytes_out'])})"
    )
    caches = cache_counters(st.get("cache", {}))
    if caches:
        lines.append("cache:     " + ", ".join(
            f"{name} {hits} hits/{misses} misses" for name, (hits, misses) in sorted(caches.items())
        ))  # fmt: skip
    lines.append(
        f"files:     {st['open_files']} open, {st['dirty_files']} dirty "
        f"({_size(st['dirty_bytes'])} not uploaded), "
        f"{st.get('kept_files', 0)} closed kept ({_size(st.get('kept_bytes', 0))})"
    )
    lines.append(
        f"uploads:   {st.get('pending_uploads', 0)} pending "
        f"({_size(st.get('pending_bytes', 0) or 0)}), {st.get('uploading', 0)} in flight, "
        f"{st.get('upload_failures', 0)} failed tries"
        + ("" if st.get("write_back") is None else f" (write-back {st['write_back']:g} s)")
    )
    if st.get("last_upload_error"):
        lines.append(f"last upload error: {st['last_upload_error']}")
    lines.append(f"errors:    {st.get('errors', 0)} (see the log)")
    if st.get("metrics"):
        lines.append(f"metrics:   http://{st['metrics']}/metrics")
    lines += [f"recovered (not uploaded): {path}" for path in st.get("recovered", [])]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace, _st: None) -> int:
    st = read_status(args.mountpoint)
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        print(format_status(st))
    return EXIT_OK


def mount_root(path: str) -> str:
    """The mount point of the s3mount mount that holds ``path`` (else a usage error)."""
    p = os.path.realpath(path)
    while not os.path.ismount(p) and p != "/":
        p = os.path.dirname(p)
    read_status(p)  # raises unless p is an s3mount mount
    return p


def cmd_drop_cache(args: argparse.Namespace, _st: None) -> int:
    for path in args.paths:
        mount_root(path)
        try:
            os.setxattr(path, INVALIDATE_XATTR, b"1")
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise MountUsageError(f"{path}: not on an s3mount mount") from None
            raise MountUsageError(f"{path}: {os.strerror(exc.errno or errno.EIO)}") from None
    return EXIT_OK


def cmd_sync(args: argparse.Namespace, _st: None) -> int:
    read_status(args.mountpoint)
    try:
        os.getxattr(args.mountpoint, SYNC_XATTR)
    except OSError as exc:
        raise MountUsageError(
            f"{args.mountpoint}: some uploads failed: {os.strerror(exc.errno or errno.EIO)}"
        ) from None
    return EXIT_OK


def cmd_unmount(args: argparse.Namespace, _st: None) -> int:
    mnt = args.mountpoint
    pid = read_status(mnt)["pid"]
    if args.no_wait:
        os.setxattr(mnt, NO_WAIT_XATTR, b"1")
    r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
    if r.returncode != 0:
        msg = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "fusermount3 failed"
        print(f"s3mount: error: {msg}", file=sys.stderr)
        return EXIT_FAILED
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if not process_running(pid):
            return EXIT_OK
        time.sleep(0.05)
    print(
        f"s3mount: error: the daemon (pid {pid}) is still running after {args.timeout}s",
        file=sys.stderr,
    )
    return EXIT_FAILED


def setup_daemon_logging(level: str, log_file: str | None = None) -> None:
    """Log to ``log_file``, else to stderr: without timestamps, with priorities, when stderr
    is journald's stream."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), mode=0o700, exist_ok=True)
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)
        handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    if not log_file and stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s s3mount[%(process)d] %(levelname)s %(name)s: %(message)s"
            )
        )
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def cmd_install_helper(args: argparse.Namespace, _st: None) -> int:
    from s3mount.install import InstallError, install, remove

    try:
        lines = (remove if args.remove else install)(args.sbin_dir, args.bin_dir)
    except InstallError as exc:
        print(f"s3mount: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for line in lines:
        print(line)
    return EXIT_OK
